"""AttnLRP (Achtibat et al., ICML 2024) and CP-LRP (Ali et al., ICML 2022) in the Gradient x
Input form: the functional forward pass is run once more with ops whose values are the
model's and whose backward implements an LRP rule; the relevance of the pixels is
``input * d(logit_t)/d(input)``, summed over colour channels.

A rule set is a table of per-layer rules (``GradientRuleSet``); ``RULE_SETS`` holds
``attnlrp`` and ``cp_lrp``. The rules are exactly those of LXT 2.1's efficient
implementation with zennit 0.5.1's Gamma rule (patched by LXT for Gradient x Input):

- Linear / Conv2d (the patch embedding): gamma rule (``GammaLinear``, ``GammaConv``);
- LayerNorm: ``(x - mean) / stop_gradient(std) * w + b`` (identity rule on the scale);
- GELU (QuickGELU, SiLU): identity rule, ``gradient = gelu(x) / (x + 1e-10) * g``;
- element-wise product of two activations (SwiGLU's gate): uniform rule, each factor's
  gradient halved (``GradientRuleSet.product``), as AttnLRP's rule for ``attn @ v``;
- attention: ``attnlrp``: q and k gradients / 4, v gradient / 2 (uniform rule at both
  matmuls), the softmax by its plain gradient; ``cp_lrp``: q and k detached;
- residual adds, LayerScale, token pooling, position embedding: plain gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from vitlens.relevance.forward import Embedding, gelu
from vitlens.relevance.weights import Backbone, BlockWeights, Linear, Norm

ZENNIT_EPS = 1e-6  # zennit's default stabiliser of the gamma rule's denominators
INPUT_EPS = 1e-10  # LXT's stabiliser when it turns relevance back into a gradient


def _sign0(z: torch.Tensor) -> torch.Tensor:
    """zennit's stabiliser sign: +1 for z >= 0, -1 for z < 0."""
    return (z == 0).to(z.dtype) + z.sign()


def _gamma_backward(g, x, y, a, gamma, back, back_abs):
    """The generalised gamma rule (zennit ``Gamma``) as a gradient.

    With ``W1 = W + gamma W+``, ``W2 = W + gamma W-`` (biases likewise), zennit's
    denominators are ``z+ = x+ W1 + x- W2 + b1`` (for outputs y > 0) and
    ``z- = x+ W2 + x- W1 + b2`` (y < 0). Since ``z+ + z- = (2 + gamma) y`` and
    ``z+ - z- = gamma (|x| |W| + |b|) = gamma a``, both come from ``y`` and one matmul ``a``;
    and ``R_x = x+ (S+ W1 + S- W2) + x- (S+ W2 + S- W1)
    = (1 + gamma/2) x (S W) + gamma/2 |x| (D |W|)`` with ``S = S+ + S-``, ``D = S+ - S-``
    (two matmuls instead of eight). The relevance at the output is ``g y``; the gradient
    returned is ``R_x / (x +- 1e-10)`` (LXT's patched zennit hook)."""
    # sign(z) = sign(y) where y != 0 (a >= 0), so zennit's stabilised denominator is
    # z + s eps with s = sign0(y); where y == 0 the numerator g y is 0 (no branch: no relevance)
    s = _sign0(y)
    den = s * ZENNIT_EPS
    if gamma == 0:
        den.add_(y)
    else:
        den.addcmul_(s, a, value=gamma / 2).add_(y, alpha=1 + gamma / 2)
    S = torch.mul(g, y).div_(den)
    Rx = back(S)
    if gamma != 0:
        Rx = Rx.mul_(1 + gamma / 2).mul_(x).addcmul_(x.abs(), back_abs(S.mul_(s)), value=gamma / 2)
    else:
        Rx = Rx.mul_(x)
    return Rx.div_(_sign0(x).mul_(INPUT_EPS).add_(x))


def _save_gamma_context(ctx, inputs, output):
    """What the gamma rule's backward reads (GammaLinear and GammaConv alike)."""
    x, weight, bias, gamma = inputs
    ctx.save_for_backward(x, weight, bias, output)
    ctx.gamma = gamma


class GammaLinear(torch.autograd.Function):
    """``F.linear`` whose backward is the gamma rule (zennit ``Gamma(gamma)``, LXT form)."""

    @staticmethod
    def forward(x, weight, bias, gamma):
        return F.linear(x, weight, bias)

    setup_context = staticmethod(_save_gamma_context)

    @staticmethod
    def backward(ctx, g):
        x, W, b, y = ctx.saved_tensors
        gamma = ctx.gamma
        a = None
        if gamma != 0:
            Wabs = W.abs()
            a = F.linear(x.abs(), Wabs, None if b is None else b.abs())
        else:
            Wabs = None
        grad = _gamma_backward(g, x, y, a, gamma, lambda S: S @ W, lambda D: D @ Wabs)
        return grad, None, None, None


class GammaConv(torch.autograd.Function):
    """The non-overlapping patch convolution with the gamma rule as its backward."""

    @staticmethod
    def forward(x, weight, bias, gamma):
        return F.conv2d(x, weight, bias, stride=weight.shape[-2:])

    setup_context = staticmethod(_save_gamma_context)

    @staticmethod
    def backward(ctx, g):
        x, W, b, y = ctx.saved_tensors
        gamma, stride = ctx.gamma, tuple(W.shape[-2:])
        pad = (x.shape[-2] - y.shape[-2] * stride[0], x.shape[-1] - y.shape[-1] * stride[1])

        def back(S, w):
            return F.conv_transpose2d(S, w, stride=stride, output_padding=pad)

        Wabs = W.abs()
        a = None if gamma == 0 else F.conv2d(x.abs(), Wabs, None if b is None else b.abs(), stride=stride)
        grad = _gamma_backward(g, x, y, a, gamma, lambda S: back(S, W), lambda D: back(D, Wabs))
        return grad, None, None, None


class LayerNormConstantScale(torch.autograd.Function):
    """LayerNorm with its scale ``1/std`` treated as a constant in the backward (identity rule)."""

    @staticmethod
    def forward(x, weight, bias, eps):
        out, _, rstd = torch.native_layer_norm(x, x.shape[-1:], weight, bias, eps)
        return out, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1], output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, g, _):
        weight, rstd = ctx.saved_tensors
        gw = g if weight is None else g * weight
        return (gw - gw.mean(-1, keepdim=True)) * rstd, None, None, None


class IdentityRuleGELU(torch.autograd.Function):
    """GELU whose backward is ``gelu(x) / (x + 1e-10) * g`` (LXT ``identity_rule_implicit``)."""

    @staticmethod
    def forward(x, approximate):
        return gelu(x, approximate)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output / (inputs[0] + INPUT_EPS))

    @staticmethod
    def backward(ctx, g):
        return ctx.saved_tensors[0] * g, None


class ScaleGradient(torch.autograd.Function):
    """Identity whose gradient is multiplied by ``factor`` (LXT ``divide_gradient``: 1/factor)."""

    @staticmethod
    def forward(x, factor):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.factor = inputs[1]

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def _uniform_attention(q, k, v):
    """AttnLRP: the uniform rule at both attention matmuls (q, k: 1/4; v: 1/2)."""
    return ScaleGradient.apply(q, 0.25), ScaleGradient.apply(k, 0.25), ScaleGradient.apply(v, 0.5)


def _conservative_attention(q, k, v):
    """CP-LRP: no relevance through the attention scores."""
    return q.detach(), k.detach(), v


@dataclass(frozen=True)
class GradientRuleSet:
    """Per-layer rules in the Gradient x Input form: each entry is the op the forward uses."""

    name: str
    attention_operands: Callable  # (q, k, v) -> (q, k, v) before the attention
    linear_gamma_option: str = "gamma_linear"
    conv_gamma_option: str = "gamma_conv"

    def linear(self, x: torch.Tensor, layer: Linear, gamma: float) -> torch.Tensor:
        return GammaLinear.apply(x, layer.weight, layer.bias, gamma)

    def patch_embedding(self, images, weight, bias, gamma):
        return GammaConv.apply(images, weight, bias, gamma)

    def layer_norm(self, x: torch.Tensor, norm: Norm | None) -> torch.Tensor:
        if norm is None:
            return x
        return LayerNormConstantScale.apply(x, norm.weight, norm.bias, norm.eps)[0]

    def activation(self, x: torch.Tensor, approximate: str) -> torch.Tensor:
        return IdentityRuleGELU.apply(x, approximate)

    def product(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a * b`` with the uniform rule: each factor's gradient halved, so that
        ``a g_a + b g_b = (a b) g`` (relevance split 1/2 and 1/2; AttnLRP's product rule)."""
        return ScaleGradient.apply(a, 0.5) * ScaleGradient.apply(b, 0.5)

    def attention_pool(self, bb: Backbone, tokens: torch.Tensor, gamma: float) -> torch.Tensor:
        """timm ``AttentionPoolLatent`` (one latent query) with the rule set's ops: (B, D)."""
        pw = bb.attn_pool
        B, M, _ = tokens.shape
        H, d = pw.num_heads, pw.head_dim
        if pw.pos_embed is not None:
            tokens = tokens + pw.pos_embed
        latent = pw.latent.expand(B, -1, -1)  # a parameter: no relevance flows to it
        q = latent if pw.q is None else F.linear(latent, pw.q.weight, pw.q.bias)
        q = self.layer_norm(q.view(B, 1, H, d).transpose(1, 2), pw.q_norm)
        k, v = self.linear(tokens, pw.kv, gamma).view(B, M, 2, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        q, k, v = self.attention_operands(q, self.layer_norm(k, pw.k_norm), v)
        heads = F.scaled_dot_product_attention(q, k, v, scale=pw.scale)
        y = self.linear(heads.transpose(1, 2).reshape(B, H * d), pw.proj, gamma)
        f = self.activation(self.linear(self.layer_norm(y, pw.norm), pw.fc1, gamma), pw.gelu_approximate)
        return y + self.linear(self.layer_norm(f, pw.mlp_norm), pw.fc2, gamma)


RULE_SETS = {
    "attnlrp": GradientRuleSet("attnlrp", _uniform_attention),
    "cp_lrp": GradientRuleSet("cp_lrp", _conservative_attention),
}


def _embed(bb: Backbone, rs: GradientRuleSet, images: torch.Tensor, gamma_conv: float) -> torch.Tensor:
    from timm.layers import resample_abs_pos_embed

    H, W = images.shape[-2:]
    ph, pw = bb.patch_size
    if bb.dynamic_img_pad:
        images = F.pad(images, (0, (pw - W % pw) % pw, 0, (ph - H % ph) % ph))
    x = rs.patch_embedding(images, bb.patch_weight, bb.patch_bias, gamma_conv)
    grid = tuple(x.shape[-2:])
    patches = rs.layer_norm(x.flatten(2).transpose(1, 2), bb.patch_norm)
    B = patches.shape[0]
    pos = bb.pos_embed
    if pos is not None and grid != bb.grid_size:
        pos = resample_abs_pos_embed(pos, new_size=grid, old_size=bb.grid_size,
                                     num_prefix_tokens=0 if bb.no_embed_class else bb.num_prefix_tokens)
    prefix = [] if bb.prefix_tokens is None else [bb.prefix_tokens.expand(B, -1, -1)]
    if pos is None:
        return torch.cat(prefix + [patches], dim=1)
    if bb.no_embed_class:
        return torch.cat(prefix + [patches + pos], dim=1)
    return torch.cat(prefix + [patches], dim=1) + pos


def block_forward(bb: Backbone, rs: GradientRuleSet, w: BlockWeights, x: torch.Tensor,
                  gamma: float) -> torch.Tensor:
    """timm's pre-norm ``Block`` in eval mode with the rule set's ops."""
    B, N, _ = x.shape
    h = rs.layer_norm(x, w.norm1)
    qkv = rs.linear(h, w.qkv, gamma)
    q, k, v = qkv.view(B, N, 3, w.num_heads, w.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = rs.layer_norm(q, w.q_norm), rs.layer_norm(k, w.k_norm)
    q, k, v = rs.attention_operands(q, k, v)
    heads = F.scaled_dot_product_attention(q, k, v, scale=w.scale)
    o = rs.layer_norm(heads.transpose(1, 2).reshape(B, N, -1), w.attn_norm)
    a = rs.linear(o, w.proj, gamma)
    x = x + (a if w.ls1 is None else a * w.ls1)
    h = rs.layer_norm(x, w.norm2)
    f = rs.activation(rs.linear(h, w.fc1, gamma), w.gelu_approximate)
    m = rs.linear(rs.layer_norm(f, w.mlp_norm), w.fc2, gamma)
    return x + (m if w.ls2 is None else m * w.ls2)


def forward(bb: Backbone, rs: GradientRuleSet, images: torch.Tensor, *, gamma_linear: float,
            gamma_conv: float) -> torch.Tensor:
    """The model's logits, computed with the rule set's ops (values unchanged)."""
    run_block = getattr(bb.family, "gradient_block_forward", None) or block_forward
    x = rs.layer_norm(_embed(bb, rs, images, gamma_conv), bb.norm_pre)
    for w in bb.blocks:
        x = run_block(bb, rs, w, x, gamma_linear)
    feats = rs.layer_norm(x, bb.norm)
    p = bb.num_prefix_tokens
    if bb.pool == "token":
        return rs.linear(rs.layer_norm(feats[:, 0], bb.fc_norm), bb.head, gamma_linear)
    if bb.pool == "map":
        pooled = rs.attention_pool(bb, feats if bb.pool_include_prefix else feats[:, p:], gamma_linear)
        return rs.linear(rs.layer_norm(pooled, bb.fc_norm), bb.head, gamma_linear)
    if bb.pool == "avg":
        pooled = (feats if bb.pool_include_prefix else feats[:, p:]).mean(dim=1)
        return rs.linear(rs.layer_norm(pooled, bb.fc_norm), bb.head, gamma_linear)
    return (rs.linear(feats[:, 0], bb.head, gamma_linear)
            + rs.linear(feats[:, 1], bb.head_dist, gamma_linear)) / 2


def relevance(bb: Backbone, rule_set: str | GradientRuleSet, images: torch.Tensor, targets_fn, *,
              gamma_linear: float, gamma_conv: float):
    """Pixel relevance (B, H, W) of the rule set (a ``GradientRuleSet`` or a name in
    ``RULE_SETS``), and the logits and targets.

    ``targets_fn(logits) -> (B,) classes`` picks the explained class from this pass's logits."""
    rs = RULE_SETS[rule_set] if isinstance(rule_set, str) else rule_set
    x = images.detach().requires_grad_(True)
    logits = forward(bb, rs, x, gamma_linear=gamma_linear, gamma_conv=gamma_conv)
    t = targets_fn(logits.detach())
    (grad,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), x)
    return (x.detach() * grad).sum(dim=1), logits.detach(), t


def patch_grid(relevance: torch.Tensor, patch_size) -> torch.Tensor:
    """Pixel relevance (B, H, W) -> patch-grid relevance (B, H // ph, W // pw): the sum over
    each patch (relevance is additive, so the grid map conserves the total)."""
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    B, H, W = relevance.shape
    r = relevance[:, :H // ph * ph, :W // pw * pw]
    return r.reshape(B, H // ph, ph, W // pw, pw).sum(dim=(2, 4))
