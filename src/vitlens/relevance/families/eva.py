"""Family adapter: timm ``Eva`` (EVA-02: ``eva02_*``; also EVA-style ViTs with rotary position
embedding and a SwiGLU MLP). Its own block forward, rules and Gradient x Input block; the
embedding, head and the methods are the generic ones.

What differs from the pre-norm ViT block, and the rule each part gets (docs/relevance.md):

- **qkv**: fused ``qkv`` with ``q_bias`` / (zero) ``k_bias`` / ``v_bias``, or separate
  ``q_proj`` / ``k_proj`` / ``v_proj``: read as one fused Linear (the Linear rules act per
  output, so fused and separate layers get the same relevance).
- **Rotary position embedding** on q and k after the prefix tokens (after q/k norm):
  ``x cos + rot(x) sin``, a fixed linear map per position (a rotation of each pair of
  channels). Chefer / plain rules: its z-rule, ``R_x = x (cos S - rot(sin S))`` with
  ``S = R / (x cos + rot(x) sin)`` (``rot`` is antisymmetric: ``rot^T = -rot``); it has no
  bias, so it conserves. Gradient methods and the Gradient x Input rule sets differentiate it
  (which, for a bias-free linear map, is the same z-rule).
- **SwiGLU MLP** ``fc2(norm(silu(x W_g) * (x W_x)))``: the gated product by the uniform rule
  (relevance 1/2 to each factor, as Chefer's and AttnLRP's rule for ``attn @ v``), SiLU by the
  identity rule (as GELU), the sub-LN ``norm`` a LayerNorm (identity). ``fc1_g`` and ``fc1_x``
  (or GluMlp's packed ``fc1``) are read as one Linear with the gate half first.
- **Attention sub-LN** (``attn.norm``), **LayerScale** (``gamma_1`` / ``gamma_2``): as in ViT.

Not supported (``UnsupportedModelError`` naming the part): ``dynamic_img_size`` (the rotary
table is read for the built grid), post-norm blocks, ``AttentionRope`` / gated attention,
mixed rope, non-SwiGLU MLPs, RMSNorm.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitlens.relevance import rules
from vitlens.relevance.rules import LayerRules
from vitlens.relevance.rules import block_rule as _vit_block_rule
from vitlens.relevance.errors import UnsupportedModelError
from vitlens.relevance.families import vit as _vit
from vitlens.relevance.forward import BlockTrace, _record, layer_norm
from vitlens.relevance.weights import Backbone, BlockWeights, Linear

SUPPORTED = (
    "timm Eva (EVA-02) with EvaBlock/EvaAttention, rotary position embedding and a SwiGLU MLP, "
    "global_pool 'avg', 'token' or 'map', at its built image size"
)


def matches(model: nn.Module) -> bool:
    from timm.models.eva import Eva

    return isinstance(model, Eva)


@dataclass
class EvaBackbone(Backbone):
    """A ``Backbone`` plus the rotary table of the built grid (None: no rope)."""

    rope_sin: torch.Tensor | None = None  # (P, head_dim) for the patch tokens
    rope_cos: torch.Tensor | None = None
    rope_half: bool = False  # timm's ``rotate_half`` layout instead of interleaved pairs


@dataclass
class EvaBlockTrace(BlockTrace):
    """``BlockTrace`` plus q and k before the rotary embedding (``q`` / ``k`` are after it)."""

    q_pre: torch.Tensor | None = None  # (B, H, N, d) after q_norm, before rope
    k_pre: torch.Tensor | None = None


# ------------------------------------------------------------------------------------ rope
def _rot(bb: EvaBackbone, x: torch.Tensor) -> torch.Tensor:
    """timm's ``rot`` (interleaved pairs) or ``rope_rotate_half``: a 90-degree rotation."""
    if bb.rope_half:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)
    return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)


def rope(bb: EvaBackbone, x: torch.Tensor) -> torch.Tensor:
    """timm ``EvaAttention``'s rotary embedding of q or k (B, H, N, d), prefix tokens unchanged."""
    if bb.rope_sin is None:
        return x
    p = bb.num_prefix_tokens
    xp = x[:, :, p:]
    return torch.cat([x[:, :, :p], xp * bb.rope_cos + _rot(bb, xp) * bb.rope_sin], dim=2)


def rope_rule(bb: EvaBackbone, t: EvaBlockTrace, R_q: torch.Tensor, R_k: torch.Tensor) -> None:
    """z-rule through the rotary embedding, in place: ``R_x = x (cos S - rot(sin S))``,
    ``S = sdiv(R, rope(x))`` on the patch tokens (the prefix tokens are not rotated)."""
    if bb.rope_sin is None:
        return
    p = bb.num_prefix_tokens
    for R, pre, post in ((R_q, t.q_pre, t.q), (R_k, t.k_pre, t.k)):
        S = rules.sdiv(R[:, :, p:], post[:, :, p:])
        R[:, :, p:] = pre[:, :, p:] * (S * bb.rope_cos - _rot(bb, S * bb.rope_sin))


def _swiglu_rule(R_g: torch.Tensor) -> torch.Tensor:
    """Relevance from the product ``silu(a) * b`` to ``[a, b]`` (the fc1 output): 1/2 each
    (uniform product rule), SiLU and the MLP's sub-LN by the identity rule."""
    half = R_g * 0.5
    return torch.cat([half, half], dim=-1)


# ------------------------------------------------------------------------------------ read
def _fused(weights, biases, dtype, mm_dtype) -> Linear:
    w = torch.cat([x.detach() for x in weights]).to(dtype)
    b = None
    if any(x is not None for x in biases):
        b = torch.cat([torch.zeros(wi.shape[0], dtype=wi.dtype, device=wi.device) if bi is None else bi.detach()
                       for wi, bi in zip(weights, biases)]).to(dtype)
    return Linear(w, b, w if mm_dtype == dtype else w.to(mm_dtype))


def _qkv(attn: nn.Module, where: str, dtype, mm_dtype) -> Linear:
    if attn.qkv is not None:
        if attn.qkv.bias is not None:
            raise UnsupportedModelError(f"{where}.qkv has its own bias; expected EVA's q_bias/v_bias")
        W = attn.qkv.weight.detach()
        if attn.q_bias is None:
            return _fused([W], [None], dtype, mm_dtype)
        b = torch.cat([attn.q_bias.detach(), attn.k_bias.detach(), attn.v_bias.detach()])
        return _fused([W], [b], dtype, mm_dtype)
    layers = (attn.q_proj, attn.k_proj, attn.v_proj)
    for name, layer in zip(("q_proj", "k_proj", "v_proj"), layers):
        if type(layer) is not nn.Linear:
            raise UnsupportedModelError(f"{where}.{name} is a {type(layer).__name__}, expected nn.Linear")
    return _fused([m.weight for m in layers], [m.bias for m in layers], dtype, mm_dtype)


def _mlp(mlp: nn.Module, where: str, dtype, mm_dtype):
    """(fc1 with the gate half first, fc2, mlp norm) of a SwiGLU / packed GluMlp with SiLU."""
    from timm.layers import GluMlp, SwiGLU

    if type(mlp) is SwiGLU and type(mlp.act) is nn.SiLU:
        fc1 = _fused([mlp.fc1_g.weight, mlp.fc1_x.weight], [mlp.fc1_g.bias, mlp.fc1_x.bias], dtype, mm_dtype)
    elif type(mlp) is GluMlp and type(mlp.act) is nn.SiLU and mlp.chunk_dim == -1 and not isinstance(mlp.fc1, nn.Conv2d):
        W, b = mlp.fc1.weight.detach(), None if mlp.fc1.bias is None else mlp.fc1.bias.detach()
        if mlp.gate_last:  # act(x2) * x1: put the gate half first
            W = torch.cat(W.chunk(2)[::-1])
            b = None if b is None else torch.cat(b.chunk(2)[::-1])
        fc1 = _fused([W], [b], dtype, mm_dtype)
    else:
        act = getattr(mlp, "act", None)
        raise UnsupportedModelError(
            f"{where} is a {type(mlp).__name__}{'' if act is None else ' with ' + type(act).__name__}; "
            f"vitlens.relevance explains EVA blocks with a SwiGLU (SiLU-gated) MLP (supported: {SUPPORTED})"
        )
    for name in ("drop1", "drop2"):
        _vit._identity_in_eval(getattr(mlp, name), f"{where}.{name}")
    fc2 = _vit._linear(mlp.fc2, f"{where}.fc2", dtype, mm_dtype)
    return fc1, fc2, _vit._norm(mlp.norm, f"{where}.norm", dtype)


def _block(blk: nn.Module, i: int, dtype, mm_dtype) -> BlockWeights:
    from timm.models.eva import EvaAttention, EvaBlock

    where = f"blocks.{i}"
    if type(blk) is not EvaBlock:
        raise UnsupportedModelError(
            f"{where} is a {type(blk).__name__}; vitlens.relevance supports timm's pre-norm EvaBlock "
            f"(supported: {SUPPORTED})")
    attn = blk.attn
    if type(attn) is not EvaAttention or attn.gate is not None:
        raise UnsupportedModelError(
            f"{where}.attn is a {type(attn).__name__}{' with a gate' if type(attn) is EvaAttention else ''}; "
            f"vitlens.relevance supports EvaAttention (supported: {SUPPORTED})")
    for name in ("drop_path1", "drop_path2"):
        _vit._identity_in_eval(getattr(blk, name), f"{where}.{name}")
    _vit._identity_in_eval(attn.attn_drop, f"{where}.attn.attn_drop")
    _vit._identity_in_eval(attn.proj_drop, f"{where}.attn.proj_drop")
    fc1, fc2, mlp_norm = _mlp(blk.mlp, f"{where}.mlp", dtype, mm_dtype)
    gamma = lambda g: None if g is None else g.detach().to(dtype)  # noqa: E731
    return BlockWeights(
        norm1=_vit._norm(blk.norm1, f"{where}.norm1", dtype),
        qkv=_qkv(attn, f"{where}.attn", dtype, mm_dtype),
        q_norm=_vit._norm(attn.q_norm, f"{where}.attn.q_norm", dtype),
        k_norm=_vit._norm(attn.k_norm, f"{where}.attn.k_norm", dtype),
        attn_norm=_vit._norm(attn.norm, f"{where}.attn.norm", dtype),
        proj=_vit._linear(attn.proj, f"{where}.attn.proj", dtype, mm_dtype),
        ls1=gamma(blk.gamma_1),
        norm2=_vit._norm(blk.norm2, f"{where}.norm2", dtype),
        fc1=fc1,
        gelu_approximate="silu",
        mlp_norm=mlp_norm,
        fc2=fc2,
        ls2=gamma(blk.gamma_2),
        num_heads=attn.num_heads,
        head_dim=attn.head_dim,
        scale=attn.scale,
    )


def read(eva: nn.Module, *, dtype: torch.dtype, mm_dtype: torch.dtype,
         rounding: bool | None = None, tf32: bool = False) -> EvaBackbone:
    """Detached weights of a timm ``Eva`` cast to ``dtype``; checks support."""
    from timm.layers import PatchEmbed, RotaryEmbeddingCat

    pe = eva.patch_embed
    if type(pe) is not PatchEmbed or not isinstance(pe.proj, nn.Conv2d):
        raise UnsupportedModelError(
            f"patch_embed is a {type(pe).__name__}; vitlens.relevance supports timm PatchEmbed (supported: {SUPPORTED})")
    if eva.dynamic_img_size:
        raise UnsupportedModelError(
            "Eva with dynamic_img_size=True is not supported (the rotary table is read for the built "
            "grid); build it with dynamic_img_size=False at the image size you explain")
    if getattr(eva, "rope_mixed", False) or (eva.rope is not None and type(eva.rope) is not RotaryEmbeddingCat):
        raise UnsupportedModelError(
            f"rope is a {type(eva.rope).__name__}{' (mixed)' if getattr(eva, 'rope_mixed', False) else ''}; "
            f"vitlens.relevance supports RotaryEmbeddingCat (supported: {SUPPORTED})")
    if not isinstance(eva.head, nn.Linear):
        raise UnsupportedModelError(
            f"the model has no classifier head (head is {type(eva.head).__name__}); build it with num_classes > 0")
    for name in ("pos_drop", "head_drop"):
        _vit._identity_in_eval(getattr(eva, name), name)
    attn_pool, include_prefix = None, False
    if eva.attn_pool is not None:
        pool, include_prefix = "map", True  # Eva pools over every token
        attn_pool = _vit.attention_pool(eva.attn_pool, "attn_pool", dtype, mm_dtype)
    elif eva.global_pool in ("avg", "token"):
        pool = eva.global_pool
    else:
        raise UnsupportedModelError(
            f"global_pool={eva.global_pool!r} is not supported; vitlens.relevance explains Eva "
            "classifiers with global_pool 'avg', 'token' or 'map'")
    prefix = [t for t in (eva.cls_token, eva.reg_token) if t is not None]
    prefix_tokens = torch.cat([t.detach().to(dtype) for t in prefix], dim=1) if prefix else None
    n_prefix = 0 if prefix_tokens is None else prefix_tokens.shape[1]
    if n_prefix != eva.num_prefix_tokens:
        raise UnsupportedModelError(
            f"Eva has {eva.num_prefix_tokens} prefix tokens but vitlens found {n_prefix}; not supported")
    pw = pe.proj
    if tuple(pw.stride) != tuple(pw.kernel_size) or any(pw.padding):
        raise UnsupportedModelError("patch_embed.proj must be a non-overlapping patch convolution")
    blocks = [_block(b, i, dtype, mm_dtype) for i, b in enumerate(eva.blocks)]
    sin = cos = None
    half = False
    if eva.rope is not None:
        # the cached eval-mode table of the built grid (``get_embed()`` in eval mode; read
        # directly so that a model in training mode with rope jitter gives the eval table)
        emb = eva.rope.pos_embed
        if emb is None:
            raise UnsupportedModelError("rope has no cached table for the built grid; build Eva with a fixed img_size")
        sin, cos = emb.detach().to(dtype).chunk(2, -1)
        half = bool(eva.blocks[0].attn.rotate_half) if len(eva.blocks) else False
    return EvaBackbone(
        **_vit.precision_and_patch_embedding(pe, dtype=dtype, mm_dtype=mm_dtype, rounding=rounding, tf32=tf32),
        grid_size=tuple(pe.grid_size),
        dynamic_img_size=False,
        dynamic_img_pad=bool(pe.dynamic_img_pad),
        prefix_tokens=prefix_tokens,
        num_prefix_tokens=n_prefix,
        pos_embed=None if eva.pos_embed is None else eva.pos_embed.detach().to(dtype),
        no_embed_class=bool(eva.no_embed_class),
        norm_pre=_vit._norm(eva.norm_pre, "norm_pre", dtype),
        blocks=blocks,
        norm=_vit._norm(eva.norm, "norm", dtype),
        pool=pool,
        pool_include_prefix=include_prefix,
        fc_norm=_vit._norm(eva.fc_norm, "fc_norm", dtype),
        head=_vit._linear(eva.head, "head", dtype, mm_dtype),
        head_dist=None,
        attn_pool=attn_pool,
        rope_sin=sin,
        rope_cos=cos,
        rope_half=half,
    )


# ------------------------------------------------------------------------------------ block
def block_forward(bb: EvaBackbone, w: BlockWeights, x: torch.Tensor, *, keep_attn: bool,
                  keep_all: bool, fast: bool = False,
                  compact: bool = False) -> tuple[torch.Tensor, EvaBlockTrace]:
    """timm ``EvaBlock.forward`` in eval mode (signature of ``forward.block_forward``)."""
    B, N, _ = x.shape
    t = EvaBlockTrace()
    h1 = layer_norm(x, w.norm1)
    qkv = bb.linear(h1, w.qkv, fast)
    q, k, v = qkv.view(B, N, 3, w.num_heads, w.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q_pre, k_pre = layer_norm(q, w.q_norm), layer_norm(k, w.k_norm)
    q, k = rope(bb, q_pre), rope(bb, k_pre)
    if keep_attn or keep_all:
        attn = bb.mm(q, k.transpose(-2, -1)).mul_(w.scale).softmax(dim=-1)
        heads = bb.mm(attn, v)
        t.attn = attn
    else:
        heads = F.scaled_dot_product_attention(q, k, v, scale=w.scale)
    o = layer_norm(heads.transpose(1, 2).reshape(B, N, -1), w.attn_norm)
    proj = bb.linear(o, w.proj, fast)
    a = proj if w.ls1 is None else proj * w.ls1
    x_mid = x + a
    h2 = layer_norm(x_mid, w.norm2)
    f1 = bb.linear(h2, w.fc1, fast)
    gate, lin = f1.chunk(2, dim=-1)
    g = layer_norm(F.silu(gate) * lin, w.mlp_norm)
    f2 = bb.linear(g, w.fc2, fast)
    m = f2 if w.ls2 is None else f2 * w.ls2
    x_out = x_mid + m
    if keep_all:
        _record(bb, w, t, compact, x=x, qkv_input=h1, qkv=qkv, q=q, k=k, v=v, heads=heads,
                proj_input=o, proj_output=proj, attn_branch=a, x_after_attn=x_mid, fc1_input=h2,
                fc1_output=f1, fc2_input=g, fc2_output=f2, mlp_branch=m, x_after_mlp=x_out)
        t.q_pre, t.k_pre = q_pre, k_pre
        if not bb.rounding:  # the qkv rule's denominators: q, k are rotated, so keep the output
            t.qkv = qkv
    return x_out, t


def block_rule(bb: EvaBackbone, w: BlockWeights, t: EvaBlockTrace, R: torch.Tensor, *,
               rules: LayerRules | None = None, to_input: bool = True, rows: int | None = None):
    """The ViT block's rules (the table ``rules``) with EVA's two layers: the SwiGLU product
    and the rotary map."""
    return _vit_block_rule(bb, w, t, R, rules=rules, to_input=to_input, rows=rows,
                            mlp_inner=_swiglu_rule,
                            qk_rule=lambda R_q, R_k: rope_rule(bb, t, R_q, R_k))


def gradient_block_forward(bb: EvaBackbone, rs, w: BlockWeights, x: torch.Tensor,
                           gamma: float) -> torch.Tensor:
    """``EvaBlock`` in eval mode with the rule set's ops (``lrp_gradient.GradientRuleSet``)."""
    B, N, _ = x.shape
    h = rs.layer_norm(x, w.norm1)
    q, k, v = rs.linear(h, w.qkv, gamma).view(B, N, 3, w.num_heads, w.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = rope(bb, rs.layer_norm(q, w.q_norm)), rope(bb, rs.layer_norm(k, w.k_norm))
    heads = rs.attention(q, k, v, w.scale)
    a = rs.linear(rs.layer_norm(heads.transpose(1, 2).reshape(B, N, -1), w.attn_norm), w.proj, gamma)
    x = x + (a if w.ls1 is None else a * w.ls1)
    gate, lin = rs.linear(rs.layer_norm(x, w.norm2), w.fc1, gamma).chunk(2, dim=-1)
    f = rs.product(rs.activation(gate, "silu"), lin)
    m = rs.linear(rs.layer_norm(f, w.mlp_norm), w.fc2, gamma)
    return x + (m if w.ls2 is None else m * w.ls2)
