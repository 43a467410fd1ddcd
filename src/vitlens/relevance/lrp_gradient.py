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


def _abs(t: torch.Tensor) -> torch.Tensor:
    """``t.abs()`` into a fresh tensor: on CPU (torch 2.14, 2 cores) the allocating ``abs``
    measured up to 15x slower than this ``out=`` form on (32, 65, 768) float32 tensors."""
    return torch.abs(t, out=torch.empty_like(t))


CPU_BLOCK_BYTES = 1 << 21  # the operands of one block of rows on a CPU: about a core's L2 cache


def _block(n: int, bytes_per_row: int, device: torch.device) -> int:
    """Rows per block for a row-wise computation whose operands take ``bytes_per_row``: about
    ``CPU_BLOCK_BYTES`` on a CPU, all ``n`` rows at once elsewhere (a GPU's kernels stream
    anyway, and each launch costs)."""
    if device.type != "cpu":
        return max(n, 1)
    return max(16, CPU_BLOCK_BYTES // bytes_per_row)


def _gamma_backward(g, x, y, W, b, gamma, gelu_input=None):
    """The generalised gamma rule (zennit ``Gamma``) of ``y = F.linear(x, W, b)`` as a
    gradient: ``g`` (..., out) -> (..., in).

    With ``W1 = W + gamma W+``, ``W2 = W + gamma W-`` (biases likewise), zennit's
    denominators are ``z+ = x+ W1 + x- W2 + b1`` (for outputs y > 0) and
    ``z- = x+ W2 + x- W1 + b2`` (y < 0). Since ``z+ + z- = (2 + gamma) y`` and
    ``z+ - z- = gamma (|x| |W| + |b|) = gamma a``, both come from ``y`` and one matmul ``a``;
    and ``R_x = x+ (S+ W1 + S- W2) + x- (S+ W2 + S- W1)
    = (1 + gamma/2) x (S W) + gamma/2 |x| (D |W|)`` with ``S = S+ + S-``, ``D = S+ - S-``
    (two matmuls instead of eight). The relevance at the output is ``g y``; the gradient
    returned is ``R_x / (x +- 1e-10)`` (LXT's patched zennit hook).

    Written for few element-wise passes (they, not the matmuls, dominate on a CPU): zennit's
    stabilised denominator is ``den = (1 + gamma/2) y + s (eps + gamma/2 a)`` with ``s = sign0(y)``,
    so ``|den| = (1 + gamma/2) |y| + eps + gamma/2 a`` (one matmul with ``gamma/2 |W|`` and bias
    ``gamma/2 |b| + eps``, plus ``|y|``) and ``y / den = |y| / |den|``: with ``r = y / |den|``,
    ``S = g |r| = copysign(g r, g)`` and ``D = S s = g r``. Where ``y == 0`` both vanish
    (no relevance), whatever the sign of the zero. On the input side ``x / (x +- 1e-10)
    = |x| / (|x| + 1e-10)`` and ``|x| / (x +- 1e-10) = x / (|x| + 1e-10)``.

    The rule is row-wise (tokens), so on a CPU it runs in blocks of rows (``_block``), each
    with the same ops on the same values (the result does not depend on the blocking): its
    element-wise passes are memory-bound, and over whole (B, N, 4D) tensors each one streams
    from memory, while a block of ~2 MiB of operands stays in the core's L2 cache from the
    first matmul to the last (1.3-1.6x faster on the toy ViT's layers), in four scratch
    buffers reused by every block. Not where the weight matrix takes over half of
    ``CPU_BLOCK_BYTES`` (ViT-S's qkv and MLP layers): each block's three matmuls would stream
    it again (measured 5-7% slower over ViT-S/16 than one block).

    ``gelu_input``: ``x = gelu(gelu_input)``, and the gradient returned is ``gelu_input``'s
    by the identity rule (``IdentityRuleGELU``), fused: each block times ``x / (gelu_input +
    1e-10)`` while in cache (``GammaLinearOfGELU``).
    """
    n_in, n_out = x.shape[-1], y.shape[-1]
    x2, y2, g2 = x.reshape(-1, n_in), y.reshape(-1, n_out), g.reshape(-1, n_out)
    M = x2.shape[0]
    rows = M  # a weight too big to stay cached beside a block: its matmuls over all rows
    if W.numel() * W.element_size() <= CPU_BLOCK_BYTES // 2:
        rows = min(M, _block(M, 4 * (n_in + n_out) * x.element_size(), x.device))
    k = gamma / 2
    W1 = W if gamma == 0 else W * (1 + k)
    Wk, bk = None, ZENNIT_EPS
    if gamma != 0:
        Wk = _abs(W).mul_(k)
        if b is not None:
            bk = _abs(b).mul_(k).add_(ZENNIT_EPS)
    WkT = None if Wk is None else Wk.t()
    grad = torch.empty_like(x2)
    bufs = [torch.empty(rows, n, dtype=x.dtype, device=x.device) for n in (n_in, n_in, n_out, n_out)]
    h2 = None if gelu_input is None else gelu_input.reshape(-1, n_in).split(rows)
    blocks = zip(g2.split(rows), x2.split(rows), y2.split(rows), grad.split(rows))
    for i, (gb, xb, yb, ob) in enumerate(blocks):
        m = xb.shape[0]
        ax, tmp, buf, den = bufs if m == rows else (t[:m] for t in bufs)
        _gamma_rows(gb, xb, yb, W1, Wk, WkT, bk, gamma, ob, ax, tmp, buf, den)
        if h2 is not None:  # IdentityRuleGELU.backward's ops
            t = torch.add(h2[i], INPUT_EPS, out=tmp)
            ob.mul_(torch.div(xb, t, out=t))
    return grad.view(x.shape)


def _gamma_rows(g, x, y, W1, Wk, WkT, bk, gamma, out, ax, tmp, buf, den):
    """``_gamma_backward`` on 2-D rows into ``out``, with the scratch buffers ``ax``, ``tmp``
    (like ``x``) and ``buf``, ``den`` (like ``y``); ``W1 = (1 + gamma/2) W``,
    ``Wk = gamma/2 |W|`` (``WkT`` its transpose), ``bk = gamma/2 |b| + eps`` (or ``eps``).

    ``|den| = (1 + gamma/2) |y| + |x| Wk^T + bk`` is ``|y|`` scaled by the matmul itself
    (``addmm_``'s beta), then the bias; the input side is
    ``(|x| (S W1) + x (D Wk)) / (|x| + 1e-10)``: 5 passes over the output rows, 5 over the input's."""
    torch.abs(x, out=ax)
    torch.abs(y, out=den)
    if gamma != 0:
        den.addmm_(ax, WkT, beta=1 + gamma / 2)
    den.add_(bk)
    D = torch.div(y, den, out=den).mul_(g)  # g y / |den|
    S = torch.copysign(D, g, out=buf)
    torch.mm(S, W1, out=out).mul_(ax)
    if gamma != 0:
        out.addcmul_(x, torch.mm(D, Wk, out=tmp))
    out.div_(ax.add_(INPUT_EPS))


def _save_gamma_context(ctx, inputs, output):
    """What the gamma rule's backward reads (GammaLinear and GammaConv alike)."""
    x, weight, bias, gamma = inputs[:4]
    ctx.save_for_backward(x, weight, bias, output)
    ctx.gamma = gamma
    ctx.grad_from = inputs[4] if len(inputs) > 4 else 0


class GammaLinear(torch.autograd.Function):
    """``F.linear`` whose backward is the gamma rule (zennit ``Gamma(gamma)``, LXT form).

    ``grad_from``: the first output feature that gradient can reach, the caller's promise
    that the ones before it feed only ops without gradient (CP-LRP's q and k): the backward
    then reads those columns' zero gradient no more (a third of the qkv layer's matmuls)."""

    @staticmethod
    def forward(x, weight, bias, gamma, grad_from=0):
        return F.linear(x, weight, bias)

    setup_context = staticmethod(_save_gamma_context)

    @staticmethod
    def backward(ctx, g):
        x, W, b, y = ctx.saved_tensors
        c = ctx.grad_from
        if c:
            n = y.shape[-1]
            g, y, W = g.reshape(-1, n)[:, c:], y.reshape(-1, n)[:, c:], W[c:]
            b = None if b is None else b[c:]
        return _gamma_backward(g, x, y, W, b, ctx.gamma), None, None, None, None


class GammaLinearOfGELU(torch.autograd.Function):
    """``F.linear(gelu(h), W, b)`` whose backward is the gamma rule then GELU's identity rule
    (``GammaLinear`` after ``IdentityRuleGELU``, the same ops), fused: the (B, N, 4D)
    gradient between them is never written out."""

    @staticmethod
    def forward(ctx, h, weight, bias, gamma, approximate):
        f = gelu(h, approximate)
        y = F.linear(f, weight, bias)
        ctx.save_for_backward(h, f, weight, bias, y)
        ctx.gamma = gamma
        return y

    @staticmethod
    def backward(ctx, g):
        h, f, W, b, y = ctx.saved_tensors
        return _gamma_backward(g, f, y, W, b, ctx.gamma, gelu_input=h), None, None, None, None


class GammaConv(torch.autograd.Function):
    """The non-overlapping patch convolution with the gamma rule as its backward."""

    @staticmethod
    def forward(x, weight, bias, gamma):
        return F.conv2d(x, weight, bias, stride=weight.shape[-2:])

    setup_context = staticmethod(_save_gamma_context)

    @staticmethod
    def backward(ctx, g):
        """The convolution's patches are disjoint, so the rule is ``GammaLinear``'s on the
        (B * grid, C * ph * pw) patch matrix (its blocks, its matmuls; the convolution and
        its transpose measured 2-3x slower on a CPU); pixels past the last whole patch get 0."""
        x, W, b, y = ctx.saved_tensors
        B, C, H, Wd = x.shape
        O, _, ph, pw = W.shape
        gh, gw = y.shape[-2:]

        def patches(t):  # (B, C, gh * ph, gw * pw) -> (B * gh * gw, C * ph * pw)
            t = t[:, :, :gh * ph, :gw * pw].reshape(B, C, gh, ph, gw, pw)
            return t.permute(0, 2, 4, 1, 3, 5).reshape(B * gh * gw, C * ph * pw)

        def rows(t):  # (B, O, gh, gw) -> (B * gh * gw, O)
            return t.permute(0, 2, 3, 1).reshape(B * gh * gw, O)

        grad = _gamma_backward(rows(g), patches(x), rows(y), W.reshape(O, -1), b, ctx.gamma)
        grad = grad.view(B, gh, gw, C, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(B, C, gh * ph, gw * pw)
        if (gh * ph, gw * pw) != (H, Wd):
            grad = F.pad(grad, (0, Wd - gw * pw, 0, H - gh * ph))
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
        """``(g w - mean(g w)) * rstd``, in blocks of rows that stay in cache on a CPU (see
        ``_gamma_backward``)."""
        weight, rstd = ctx.saved_tensors
        C = g.shape[-1]
        g2, r2 = g.reshape(-1, C), rstd.reshape(-1, 1)
        out = torch.empty(g.shape, dtype=g.dtype, device=g.device)
        o2 = out.view(-1, C)
        M = g2.shape[0]
        rows = _block(M, 4 * C * g.element_size(), g.device)
        for s in range(0, M, rows):
            o = o2[s:s + rows]
            if weight is None:
                o.copy_(g2[s:s + rows])
            else:
                torch.mul(g2[s:s + rows], weight, out=o)
            o.sub_(o.mean(-1, keepdim=True)).mul_(r2[s:s + rows])
        return out, None, None, None


class IdentityRuleGELU(torch.autograd.Function):
    """GELU whose backward is ``gelu(x) / (x + 1e-10) * g`` (LXT ``identity_rule_implicit``)."""

    @staticmethod
    def forward(x, approximate):
        return gelu(x, approximate)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output)  # both saved anyway (the linear layers' output / input)

    @staticmethod
    def backward(ctx, g):
        """``gelu(x) / (x + 1e-10) * g`` in blocks that stay in cache on a CPU (see
        ``_gamma_backward``): one pass over memory instead of four."""
        x, y = ctx.saved_tensors
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        xf, yf, gf, of = x.reshape(-1), y.reshape(-1), g.reshape(-1), out.view(-1)
        n = xf.numel()
        step = _block(n, 4 * x.element_size(), x.device)
        tmp = torch.empty(min(step, n), dtype=x.dtype, device=x.device)
        for s in range(0, n, step):
            e = min(s + step, n)
            t = torch.add(xf[s:e], INPUT_EPS, out=tmp[:e - s])
            torch.mul(torch.div(yf[s:e], t, out=t), gf[s:e], out=of[s:e])
        return out, None


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


class SplitHeads(torch.autograd.Function):
    """A fused projection's output (B, N, 3 H d) -> q, k, v (B, H, N, d), views; the
    backward writes their gradients times ``factors`` straight into the (B, N, 3 H d)
    gradient: one pass instead of three (scaling, autograd's stack, its copy to contiguous)."""

    @staticmethod
    def forward(qkv, heads, factors):
        B, N, _ = qkv.shape
        return qkv.view(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.heads, ctx.factors = inputs[1:]
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, *grads):
        ref = next(g for g in grads if g is not None)
        B, H, N, d = ref.shape
        out = torch.empty(B, N, 3, H, d, dtype=ref.dtype, device=ref.device)
        for i, (g, f) in enumerate(zip(grads, ctx.factors)):
            dst = out[:, :, i].transpose(1, 2)
            if g is None:
                dst.zero_()
            elif f == 1:
                dst.copy_(g)
            else:
                torch.mul(g, f, out=dst)
        return out.view(B, N, 3 * H * d), None, None


def _sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _uniform_attention(q, k, v, scale):
    """AttnLRP: the uniform rule at both attention matmuls (q, k: 1/4; v: 1/2), the softmax by
    its plain gradient (fused attention)."""
    q, k, v = ScaleGradient.apply(q, 0.25), ScaleGradient.apply(k, 0.25), ScaleGradient.apply(v, 0.5)
    return _sdpa(q, k, v, scale)


def _conservative_attention(q, k, v, scale):
    """CP-LRP: no relevance through the attention scores: ``P v`` with ``P = softmax(q k^T s)``
    a constant. ``P`` is formed explicitly without autograd, so the backward is the one matmul
    ``P^T g`` (the fused attention's backward would recompute ``P`` and the q / k gradients
    only to drop them: about 2x the cost on a CPU); ``P`` (B, heads, N, N) is kept for it."""
    with torch.no_grad():
        P = torch.softmax((q * (q.shape[-1] ** -0.5 if scale is None else scale)) @ k.transpose(-2, -1), dim=-1)
    return P @ v


@dataclass(frozen=True)
class GradientRuleSet:
    """Per-layer rules in the Gradient x Input form: each entry is the op the forward uses."""

    name: str
    attention: Callable  # (q, k, v, scale) -> softmax(q k^T scale) v with the rule set's backward
    qk_gradient: bool = True  # whether ``attention`` passes gradient to q and k
    # ``attention`` as ``split_attention`` after ``split_heads`` (which applies these factors)
    split_factors: tuple[float, float, float] = (1.0, 1.0, 1.0)
    split_attention: Callable | None = None  # None: ``attention``
    linear_gamma_option: str = "gamma_linear"
    conv_gamma_option: str = "gamma_conv"

    def linear(self, x: torch.Tensor, layer: Linear, gamma: float, grad_from: int = 0) -> torch.Tensor:
        """``grad_from``: see ``GammaLinear``."""
        return GammaLinear.apply(x, layer.weight, layer.bias, gamma, grad_from)

    def split_heads(self, qkv: torch.Tensor, heads: int):
        """A fused ``[q | k | v]`` projection (B, N, 3 H d) -> q, k, v (B, H, N, d) for
        ``split_attention``: ``split_heads`` then ``split_attention`` is ``attention``."""
        return SplitHeads.apply(qkv, heads, self.split_factors)

    def attend_split(self, q, k, v, scale):
        return (self.split_attention or self.attention)(q, k, v, scale)

    def value_grad_from(self, width: int) -> int:
        """``grad_from`` of a fused ``[q | k | v]`` / ``[k | v]`` projection whose key part has
        ``width`` features: past q and k where the attention rule gives them no gradient."""
        return 0 if self.qk_gradient else width

    def patch_embedding(self, images, weight, bias, gamma):
        return GammaConv.apply(images, weight, bias, gamma)

    def layer_norm(self, x: torch.Tensor, norm: Norm | None) -> torch.Tensor:
        if norm is None:
            return x
        return LayerNormConstantScale.apply(x, norm.weight, norm.bias, norm.eps)[0]

    def activation(self, x: torch.Tensor, approximate: str) -> torch.Tensor:
        return IdentityRuleGELU.apply(x, approximate)

    def activation_linear(self, h: torch.Tensor, approximate: str, layer: Linear, gamma: float) -> torch.Tensor:
        """``linear(activation(h), layer)``, as one op (``GammaLinearOfGELU``)."""
        return GammaLinearOfGELU.apply(h, layer.weight, layer.bias, gamma, approximate)

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
        k, v = self.linear(tokens, pw.kv, gamma, self.value_grad_from(H * d)).view(B, M, 2, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        heads = self.attention(q, self.layer_norm(k, pw.k_norm), v, pw.scale)
        y = self.linear(heads.transpose(1, 2).reshape(B, H * d), pw.proj, gamma)
        f = self.activation(self.linear(self.layer_norm(y, pw.norm), pw.fc1, gamma), pw.gelu_approximate)
        return y + self.linear(self.layer_norm(f, pw.mlp_norm), pw.fc2, gamma)


RULE_SETS = {
    "attnlrp": GradientRuleSet("attnlrp", _uniform_attention, split_factors=(0.25, 0.25, 0.5),
                               split_attention=_sdpa),
    "cp_lrp": GradientRuleSet("cp_lrp", _conservative_attention, qk_gradient=False),
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
    qkv = rs.linear(h, w.qkv, gamma, rs.value_grad_from(2 * w.num_heads * w.head_dim))
    q, k, v = rs.split_heads(qkv, w.num_heads)
    q, k = rs.layer_norm(q, w.q_norm), rs.layer_norm(k, w.k_norm)  # linear backwards: the factors commute
    heads = rs.attend_split(q, k, v, w.scale)
    o = rs.layer_norm(heads.transpose(1, 2).reshape(B, N, -1), w.attn_norm)
    a = rs.linear(o, w.proj, gamma)
    x = x + (a if w.ls1 is None else a * w.ls1)
    h = rs.layer_norm(x, w.norm2)
    h = rs.linear(h, w.fc1, gamma)
    if w.mlp_norm is None:
        m = rs.activation_linear(h, w.gelu_approximate, w.fc2, gamma)
    else:
        m = rs.linear(rs.layer_norm(rs.activation(h, w.gelu_approximate), w.mlp_norm), w.fc2, gamma)
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
