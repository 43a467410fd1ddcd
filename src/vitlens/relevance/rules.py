"""The LRP rules of Chefer et al. (CVPR 2021) as batched tensor functions.

Spec: ``docs/relevance.md`` and the shared relevance spec. Every function works on a whole
batch; sums that the rules need run per sample. A rule set is a :class:`LayerRules` table, one
entry per layer kind: :data:`CHEFER` (the paper's rules) and :data:`PLAIN_LRP` (the rules of
the ``partial_lrp`` / ``full_lrp`` baselines: bare z-rule on residual adds, separately
normalised sign branches in Linear layers). :func:`block_rule`, :func:`head_rule` and
:func:`attention_pool_rule` are the one relevance pass that applies a table.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from vitlens.relevance.forward import BlockTrace, Trace, qkv_output
from vitlens.relevance.weights import Backbone, BlockWeights, Linear

EPS = 1e-9


def sdiv(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / (b + 1e-9)``, and 0 where ``b == 0`` exactly (the authors' ``safe_divide``)."""
    den = b + EPS
    if a.shape == den.shape and a.dtype == den.dtype and not (a.requires_grad or den.requires_grad):
        q = torch.div(a, den, out=den)  # one buffer for the denominator and the quotient
    else:
        q = a / den
    return q.masked_fill_(b == 0, 0)


def _mm(bb: Backbone, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in the matmul dtype; result in the compute dtype."""
    if bb.mm_dtype == bb.dtype:
        return a @ b
    return (a.to(bb.mm_dtype) @ b.to(bb.mm_dtype)).to(bb.dtype)


def linear_rule(bb: Backbone, layer: Linear, x: torch.Tensor, R: torch.Tensor,
                out: torch.Tensor | None = None, *, plain: bool = False) -> torch.Tensor:
    """Relevance at the input ``x`` of a Linear layer (alpha=1, beta=0, bias ignored).

    Paper rule: ``Z = x+ W+^T + x- W-^T``, ``S = sdiv(R, Z)``, ``R_x = x+ (S W+) + x- (S W-)``.
    Computed with two matmuls the size of the forward one instead of four, from
    ``2 Z = x W^T + |x| |W|^T`` (``x W^T`` is the forward output ``out`` minus the bias) and
    ``R_x = x (S' W) + |x| (S' |W|)`` with ``S' = R / (2 Z + 2e-9) = S / 2``. Where ``Z == 0``
    every product that ``S`` multiplies is 0 (Z is a sum of non-negative terms), so the
    ``sdiv`` mask is not needed. ``plain``: ``S1 = sdiv(R, x+ W+^T)``, ``S2 = sdiv(R, x- W-^T)``.
    """
    if not plain and bb.rounding:
        return _linear_rule_lowp(bb, layer, x, R)
    W, Wabs = layer.mm_weight, layer.abs_weight
    if plain:
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        Wp, Wn = (W + Wabs) / 2, (W - Wabs) / 2
        S1 = sdiv(R, _mm(bb, xp, Wp.T))
        S2 = sdiv(R, _mm(bb, xn, Wn.T))
        return xp * _mm(bb, S1, Wp) + xn * _mm(bb, S2, Wn)
    xabs = x.abs()
    if out is None:
        den = _mm(bb, x, W.T).add_(2 * EPS)
    elif layer.bias is None:
        den = out + 2 * EPS
    else:
        den = out - (layer.bias - 2 * EPS)
    den.add_(_mm(bb, xabs, Wabs.T))
    S = torch.div(R, den, out=den)
    return _mm(bb, S, W).mul_(x).addcmul_(xabs, _mm(bb, S, Wabs))


def _sign_split(bb: Backbone, x: torch.Tensor) -> torch.Tensor:
    """``[x+, x-]`` along the last dimension in the matmul dtype: one cast of ``x``, written
    straight into one buffer (no ``torch.cat``). Rounding commutes with the clamps."""
    n = x.shape[-1]
    xl = x.to(bb.mm_dtype)  # a contiguous cast (a cast into a strided buffer is ~3x slower)
    out = torch.empty(*x.shape[:-1], 2 * n, dtype=bb.mm_dtype, device=x.device)
    torch.clamp(xl, min=0, out=out[..., :n])
    torch.clamp(xl, max=0, out=out[..., n:])
    return out


def _linear_rule_lowp(bb: Backbone, layer: Linear, x: torch.Tensor,
                      R: torch.Tensor) -> torch.Tensor:
    """The paper's Linear rule with low-precision (bf16) matmuls, two matmuls per layer.

    ``x W^T`` cancels, so ``Z = x+ W+^T + x- W-^T`` is built from non-negative terms only, as
    one matmul of ``[x+, x-]`` against ``[W+, W-]`` (both pre-split, the weight once per call);
    ``S = R / (Z + 1e-9)`` (where ``Z == 0`` every product that ``S``
    multiplies is 0, so no mask); ``S [W+, W-] = [G+, G-]`` in one matmul, and
    ``R_x = x+ G+ + x- G-`` from the bf16 ``[x+, x-]`` (``torch.where`` is ~4x slower on CPU).
    """
    n = x.shape[-1]
    Wpn = layer.sign_weight
    xpn = _sign_split(bb, x)
    den = (xpn @ Wpn.T).add_(EPS)  # Z >= 0: the sum of non-negative terms
    S = torch.div(R, den, out=den)  # computed in the compute dtype, stored in the matmul dtype
    P = (S @ Wpn).mul_(xpn)  # [x+ G+, x- G-]: one of each pair is exactly 0, so the add is exact
    return torch.add(P[..., :n], P[..., n:], out=x.new_empty(x.shape))


def residual_rule(u: torch.Tensor, v: torch.Tensor, z: torch.Tensor, R: torch.Tensor, *,
                  plain: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevance of the two operands of ``z = u + v``.

    z-rule split, then (paper rule) each part is rescaled so that the parts keep the ratio of
    their absolute sums and together conserve ``sum R``; the sums run per sample.
    """
    S = sdiv(R, z)
    Ru = u * S
    Rv = S.mul_(v) if S.shape == v.shape else v * S  # S is not read again: its buffer is Rv's
    if plain:
        return Ru, Rv
    dims = tuple(range(1, R.dim()))
    su, sv, s = Ru.sum(dims, keepdim=True), Rv.sum(dims, keepdim=True), R.sum(dims, keepdim=True)
    total = su.abs() + sv.abs()
    Ru.mul_(sdiv(sdiv(su.abs(), total) * s, su))
    Rv.mul_(sdiv(sdiv(sv.abs(), total) * s, sv))
    return Ru, Rv


def fork_rule(x: torch.Tensor, R_skip: torch.Tensor, R_branch: torch.Tensor) -> torch.Tensor:
    """Relevance at ``x`` that feeds both the skip connection and a branch.

    The authors' code (``Clone.relprop``) computes ``x * (sdiv(R1, x) + sdiv(R2, x))``: the sum
    of the two relevances, through the z-rule stabiliser (and 0 where ``x == 0``). The golden
    maps need this form: a bare ``R1 + R2`` differs from them by ~1e-5 relative.
    """
    # no mask needed: where x == 0 the product is 0 either way
    return (R_skip + R_branch).div_(x + EPS).mul_(x)


def identity_rule(R: torch.Tensor) -> torch.Tensor:
    """Relevance passes through unchanged (LayerNorm, GELU, softmax, LayerScale in Chefer's rules)."""
    return R


@dataclass(frozen=True)
class LayerRules:
    """One explicit rule set as a table of per-layer rules, applied by :func:`block_rule`,
    :func:`head_rule` and :func:`attention_pool_rule` (``patch_embedding_rule`` is shared).

    - ``linear(bb, layer, x, R, out=None) -> R_x``: Linear layers (head, q/k/v, projection, MLP);
      ``linear_reads_output``: it reads the layer's forward output ``out`` (the pass then hands
      the recorded one over instead of recomputing it);
    - ``residual(u, v, z, R) -> (R_u, R_v)``: residual adds ``z = u + v``;
    - ``fork(x, R_skip, R_branch) -> R_x``: a tensor feeding the skip and a branch;
    - ``norm``, ``activation``, ``softmax``: ``R -> R`` for LayerNorm (and the q/k, MLP and
      attention-output norms), the MLP activation and the attention softmax;
    - the attention matmuls ``attn @ v`` and ``q @ k^T``: the z-rule to both operands, halved,
      in every rule set here (``block_rule`` step 3-4);
    - the pooling: ``head_rule`` (class token, distillation, average, attention pool).
    """

    name: str
    linear: Callable[..., torch.Tensor]
    residual: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    fork: Callable[..., torch.Tensor]
    norm: Callable[[torch.Tensor], torch.Tensor] = identity_rule
    activation: Callable[[torch.Tensor], torch.Tensor] = identity_rule
    softmax: Callable[[torch.Tensor], torch.Tensor] = identity_rule
    linear_reads_output: bool = True


def block_rule(bb: Backbone, w: BlockWeights, t: BlockTrace, R: torch.Tensor, *,
               rules: LayerRules | None = None, to_input: bool = True, rows: int | None = None,
               mlp_inner=None, qk_rule=None):
    """Relevance through one block (spec section 2, steps 1-4) under the rule table ``rules``
    (default :data:`CHEFER`).

    Returns ``(R_x, R_attn)``: relevance at the block input (None when ``to_input`` is False:
    the q/k/v part is then skipped) and the halved relevance of the attention matrix
    (B, H, N, N). ``rows``: ``R`` is 0 outside its first ``rows`` tokens (the top block under
    class-token pooling): the MLP, the projection and the attention rows then run on those
    tokens only (every other row of their relevance is exactly 0); q/k/v still get all tokens.

    Hooks for families whose block differs only inside two layers (``families/eva.py``):
    ``mlp_inner(R_g) -> R_f1``: relevance from the fc2 input to the fc1 output (default: the
    identity of GELU and the MLP norm); ``qk_rule(R_q, R_k)``: turns the relevance of the
    scores' operands (B, H, N, d views, in place) into that of the q/k norm outputs (default:
    they are the same tensors).
    """
    L = CHEFER if rules is None else rules
    B, N, _ = R.shape
    n = N if rows is None else rows
    H, d = w.num_heads, w.head_dim

    def top(a):  # the first n tokens of a (B, N, ...) record
        return a if a is None or n == N else a[:, :n]

    R = top(R)
    # 1. MLP branch
    R_mid, R_m = L.residual(top(t.x_after_attn), top(t.mlp_branch), top(t.x_after_mlp), R)
    R_g = L.linear(bb, w.fc2, top(t.fc2_input), R_m, top(t.fc2_output))  # LayerScale: identity
    R_g = L.norm(R_g) if mlp_inner is None else mlp_inner(R_g)  # the MLP norm (EVA: its SwiGLU)
    R_g = L.activation(R_g)
    R_h2 = L.linear(bb, w.fc1, top(t.fc1_input), R_g, top(t.fc1_output))
    R_mid = L.fork(top(t.x_after_attn), R_mid, L.norm(R_h2))  # LayerNorm 2
    del R_m, R_g, R_h2
    # 2. attention branch
    R_x, R_a = L.residual(top(t.x), top(t.attn_branch), top(t.x_after_attn), R_mid)
    R_o = L.linear(bb, w.proj, top(t.proj_input), R_a, top(t.proj_output))
    R_o = L.norm(R_o)  # the attention-output norm
    R_heads = R_o.view(B, n, H, d).transpose(1, 2)
    del R_mid, R_a, R_o
    # 3. heads = attn @ v: z-rule to both operands, both halved. The z-rule denominators that
    # can cancel (heads, scores) are the forward's, in the compute dtype. With low-precision
    # matmuls every operand is cast once and the products are taken in the compute dtype.
    low = bb.rounding
    attn, q = t.attn[:, :, :n], t.q[:, :, :n]
    # contiguous once: R_heads and heads are (B, n, H, d) in memory, and both matmuls below
    # would otherwise copy S to a (B * H, n, d) layout each
    S = sdiv(R_heads, t.heads[:, :, :n]).mul_(0.5).contiguous()
    if low:
        S = S.to(bb.mm_dtype)
        R_attn = torch.mul(S @ t.v.to(bb.mm_dtype).transpose(-2, -1), attn)
    else:
        R_attn = (S @ t.v.transpose(-2, -1)).mul_(attn)
    R_attn_all = R_attn
    if n < N:
        R_attn_all = R_attn.new_zeros(B, H, N, N)
        R_attn_all[:, :, :n] = R_attn
    if not to_input:
        return None, R_attn_all
    R_qkv = R_attn.new_empty(B, N, 3, H, d)
    R_q, R_k, R_v = R_qkv.permute(2, 0, 3, 1, 4)  # views (B, H, N, d) in timm's qkv layout
    if low:
        torch.mul(attn.to(bb.mm_dtype).transpose(-2, -1) @ S, t.v, out=R_v)
    else:
        torch.mul(attn.transpose(-2, -1) @ S, t.v, out=R_v)
    del S, R_heads
    R_attn = L.softmax(R_attn)
    # 4. softmax; scores = q @ k^T (the 1/sqrt(d) scale cancels): halved
    with bb.exact():  # the forward's scores (a denominator that can cancel)
        Z = q @ t.k.transpose(-2, -1)
    zero = Z == 0
    if n < N:
        R_q[:, :, n:] = 0
        R_q = R_q[:, :, :n]
    if low:  # the quotient is written in the matmul dtype directly
        S = torch.div(R_attn, Z.add_(EPS), out=torch.empty_like(Z, dtype=bb.mm_dtype))
        del Z
        S.masked_fill_(zero, 0)
        ql, kl = q.to(bb.mm_dtype), t.k.to(bb.mm_dtype)
        torch.mul(S @ kl, q, out=R_q).mul_(0.5)
        torch.mul(S.transpose(-2, -1) @ ql, t.k, out=R_k).mul_(0.5)
    else:
        S = torch.div(R_attn, Z.add_(EPS), out=Z).masked_fill_(zero, 0)
        torch.mul((S @ t.k).mul_(0.5), q, out=R_q)
        torch.mul((S.transpose(-2, -1) @ q).mul_(0.5), t.k, out=R_k)
    del S, zero, R_attn
    if qk_rule is not None:
        R_q, R_k, _ = R_qkv.permute(2, 0, 3, 1, 4)
        qk_rule(R_q, R_k)
    R_qkv = R_qkv.view(B, N, -1)
    qkv = qkv_output(t) if L.linear_reads_output and not low else None  # the float Chefer rule's
    R_h1 = L.norm(L.linear(bb, w.qkv, t.qkv_input, L.norm(R_qkv), qkv))  # q/k norm, norm1
    del qkv
    if n < N:
        R_x = torch.cat([R_x, R_x.new_zeros(B, N - n, R_x.shape[-1])], dim=1)
    return fork_rule(t.x, R_x, R_h1), R_attn_all


def pooled_tokens(bb: Backbone, n_tokens: int) -> slice:
    """The tokens the classifier reads: class token, class + distillation, or the averaged /
    attention-pooled ones."""
    if bb.pool == "token":
        return slice(0, 1)
    if bb.pool == "distilled":
        return slice(0, 2)
    return slice(0, n_tokens) if bb.pool_include_prefix else slice(bb.num_prefix_tokens, n_tokens)


def pooling_readout(bb: Backbone, trace: Trace) -> torch.Tensor:
    """(B, N) weights of the classifier's pooling over tokens: the readout row of methods
    without relevance (rollout, raw attention, ...): e_0 for the class token, 1/2 on class and
    distillation tokens for DeiT, uniform over the averaged tokens for average pooling, the
    latent query's attention row (mean over heads) for attention pooling."""
    B, N, _ = trace.features.shape
    r = trace.features.new_zeros(B, N)
    sl = pooled_tokens(bb, N)
    if bb.pool == "map":
        r[:, sl] = trace.pool.attn.mean(1)[:, 0]
        return r
    r[:, sl] = 1.0 / len(range(N)[sl])
    return r


def attention_pool_rule(bb: Backbone, trace: Trace, R_out: torch.Tensor, *,
                        rules: LayerRules | None = None):
    """Relevance through the attention pool (``global_pool="map"``), from its output (B, D) to
    the pooled tokens (B, M, D), and the relevance of the latent's attention row (B, H, 1, M).

    Chefer's rules for one more block whose query is a learned latent: the MLP branch and its
    residual as in a block (``out = y + mlp(norm(y))``), the projection's Linear rule, ``attn @ v``
    by the z-rule to both operands (halved), softmax identity, ``q k^T`` by the z-rule (halved):
    the half that reaches the latent's q is the latent's (a parameter, like a bias) and leaves
    the pass; the k and v halves go through the kv Linear to the tokens. The pool's position
    embedding (if any) is an add: z-rule, the tokens keep their part."""
    L = CHEFER if rules is None else rules
    pw, P = bb.attn_pool, trace.pool
    B, M, _ = P.tokens.shape
    H, d = pw.num_heads, pw.head_dim
    R_y, R_m = L.residual(P.y, P.m, P.out, R_out)
    R_g = L.linear(bb, pw.fc2, P.g, R_m, P.m)
    R_h = L.linear(bb, pw.fc1, P.h, L.activation(L.norm(R_g)), P.f1)  # mlp norm, GELU
    R_y = L.fork(P.y, R_y, L.norm(R_h))  # the pool's norm
    R_o = L.linear(bb, pw.proj, P.o, R_y, P.y)
    S = sdiv(R_o.view(B, H, 1, d), P.heads).mul_(0.5)  # heads (B, H, 1, d) = (B, H * d) viewed
    R_attn = L.softmax((S @ P.v.transpose(-2, -1)).mul_(P.attn))  # (B, H, 1, M)
    R_kv = R_attn.new_empty(B, M, 2, H, d)
    R_k, R_v = R_kv.permute(2, 0, 3, 1, 4)  # views (B, H, M, d) in timm's kv layout
    torch.mul(P.attn.transpose(-2, -1) @ S, P.v, out=R_v)
    with bb.exact():
        Z = P.q @ P.k.transpose(-2, -1)
    S = sdiv(R_attn, Z)
    torch.mul((S.transpose(-2, -1) @ P.q).mul_(0.5), P.k, out=R_k)
    R_in = L.linear(bb, pw.kv, P.kv_in, L.norm(R_kv.view(B, M, -1)), P.kv)  # k norm
    if pw.pos_embed is not None:
        R_in = P.tokens * sdiv(R_in, P.kv_in)
    return R_in, R_attn


def head_rule(bb: Backbone, trace: Trace, targets: torch.Tensor, *, rules: LayerRules | None = None):
    """Relevance at the final tokens (B, N, D), starting from a one-hot of the explained class
    (value 1), and the readout weights (B, N): the share of relevance each pooled token gets
    (exactly e_0 for class-token pooling)."""
    L = CHEFER if rules is None else rules
    feats = trace.features
    B, N, D = feats.shape
    onehot = F.one_hot(targets, trace.logits.shape[-1]).to(feats.dtype)
    R = torch.zeros_like(feats)
    if bb.pool == "token":
        R_x = L.norm(L.linear(bb, bb.head, trace.pooled, onehot))  # fc_norm
        y0 = feats[:, 0]
        R[:, 0] = y0 * sdiv(R_x, y0)
        readout = F.one_hot(torch.zeros_like(targets), N).to(feats.dtype)
        return R, readout
    if bb.pool == "map":
        # head -> fc_norm (identity) -> the attention pool -> the pooled tokens. Readout: the
        # relevance of the latent's attention row (clamped, mean over heads: the row a Chefer
        # layer contributes), rescaled to sum 1 like the other poolings' readouts.
        R_out = L.norm(L.linear(bb, bb.head, trace.pooled, onehot))  # fc_norm
        R_tok, R_attn = attention_pool_rule(bb, trace, R_out, rules=L)
        sl = pooled_tokens(bb, N)
        R[:, sl] = R_tok
        row = R_attn.clamp(min=0).mean(1)[:, 0]
        readout = torch.zeros_like(feats[..., 0])
        readout[:, sl] = sdiv(row, row.sum(-1, keepdim=True))
        return R, readout
    if bb.pool == "distilled":
        # logits = (a + b) / 2: the residual rule on the two heads' class logits gives each
        # head the share |a_c| / (|a_c| + |b_c|) (resp. |b_c| / ...) of the relevance.
        a = trace.head_outputs[0].gather(1, targets[:, None])
        b = trace.head_outputs[1].gather(1, targets[:, None])
        wa, wb = sdiv(a.abs(), a.abs() + b.abs()), sdiv(b.abs(), a.abs() + b.abs())
        for i, (layer, share) in enumerate(((bb.head, wa), (bb.head_dist, wb))):
            R_x = L.norm(L.linear(bb, layer, trace.pooled[:, i], onehot * share))
            y = feats[:, i]
            R[:, i] = y * sdiv(R_x, y)
        readout = torch.zeros_like(feats[..., 0])
        readout[:, 0], readout[:, 1] = wa[:, 0], wb[:, 0]
        return R, readout
    # average pooling: z-rule through the mean spreads relevance over the averaged tokens
    R_x = L.norm(L.linear(bb, bb.head, trace.pooled, onehot))  # fc_norm
    sl = pooled_tokens(bb, N)
    y = feats[:, sl]
    mean = y.mean(dim=1)
    R[:, sl] = y / y.shape[1] * sdiv(R_x, mean)[:, None]
    return R, R.sum(dim=-1)


def patch_embedding_rule(bb: Backbone, trace: Trace, R_tokens: torch.Tensor) -> torch.Tensor:
    """Relevance at the pixels (B, H, W), summed over colour channels (``full_lrp``).

    Position-embedding add: z-rule, the patch part is kept; patch norm: identity; patch
    convolution: z^B rule with per-image bounds (min and max of the input).
    """
    emb = trace.embedding
    p = bb.num_prefix_tokens
    R = emb.patches * sdiv(R_tokens[:, p:], emb.tokens[:, p:])
    B, P, D = R.shape
    gh, gw = emb.grid
    R = R.transpose(1, 2).reshape(B, D, gh, gw)
    X = emb.images
    W = bb.patch_weight
    Wp, Wn = W.clamp(min=0), W.clamp(max=0)
    lo = X.amin(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    hi = X.amax(dim=(1, 2, 3), keepdim=True)
    # convolutions of the constant bound images: bound * sum of the kernel (no padding)
    Z = (F.conv2d(X, W, stride=bb.patch_size)
         - lo * Wp.sum(dim=(1, 2, 3)).view(1, D, 1, 1)
         - hi * Wn.sum(dim=(1, 2, 3)).view(1, D, 1, 1) + EPS)
    S = R / Z
    C = X.shape[1]
    ph, pw = bb.patch_size
    pad = (X.shape[-2] - gh * ph, X.shape[-1] - gw * pw)
    grads = F.conv_transpose2d(S, torch.cat([W, Wp, Wn], dim=1), stride=bb.patch_size,
                               output_padding=pad)
    out = X * grads[:, :C] - lo * grads[:, C:2 * C] - hi * grads[:, 2 * C:]
    return out.sum(dim=1)


CHEFER = LayerRules("chefer", linear=linear_rule, residual=residual_rule, fork=fork_rule)
"""Chefer et al. (CVPR 2021): alpha=1 beta=0 Linear rule, residual z-rule rescaled to conserve
relevance (per sample), the fork summed through the z-rule stabiliser, LayerNorm / GELU /
softmax identity, attention matmuls z-rule halved."""

PLAIN_LRP = LayerRules("lrp", linear=partial(linear_rule, plain=True), residual=partial(residual_rule, plain=True),
                       fork=fork_rule, linear_reads_output=False)
"""Plain LRP (the ``partial_lrp`` / ``full_lrp`` baselines): the Linear rule's sign branches
normalised separately, the residual add by the bare z-rule; the rest as :data:`CHEFER`."""
