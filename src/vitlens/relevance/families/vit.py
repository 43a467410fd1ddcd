"""Family adapter: timm ``VisionTransformer`` / ``VisionTransformerDistilled`` (ViT, DeiT,
MAE-style average pooling, register tokens). Reads the weights into ``weights.Backbone``;
the generic pre-norm block forward (``forward.py``) and rules (``rules.py``) run them.

Supported: built from ``Block`` / ``Attention`` / ``Mlp`` with LayerNorm and GELU, any number
of prefix tokens (class, distillation, register), ``global_pool`` ``"token"``, ``"avg"``
(with ``fc_norm``) or ``"map"`` (SigLIP's ``AttentionPoolLatent``), LayerScale, q/k norm, attention-output norm, pre-norm, ``no_embed_class``,
``dynamic_img_size`` / ``dynamic_img_pad``. Anything else raises ``UnsupportedModelError``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from vitlens.relevance.errors import UnsupportedModelError
from vitlens.relevance.weights import AttentionPoolWeights, Backbone, BlockWeights, Linear, Norm

SUPPORTED = (
    "timm VisionTransformer / VisionTransformerDistilled (ViT, DeiT, DeiT-distilled, MAE with "
    "global_pool='avg', register tokens, SigLIP with global_pool='map') made of timm Block/Attention/Mlp with LayerNorm and GELU, "
    "or a module whose `.model` attribute is one (vitlens ViTClassifier)"
)



def matches(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def _norm(module: nn.Module, where: str, dtype) -> Norm | None:
    if isinstance(module, nn.Identity):
        return None
    if isinstance(module, nn.LayerNorm):
        w = None if module.weight is None else module.weight.detach().to(dtype)
        b = None if module.bias is None else module.bias.detach().to(dtype)
        return Norm(w, b, module.eps)
    raise UnsupportedModelError(
        f"{where} is a {type(module).__name__}; vitlens.relevance supports LayerNorm only "
        f"(it supports {SUPPORTED})"
    )


def _linear(module: nn.Module, where: str, dtype, mm_dtype) -> Linear:
    if type(module) is not nn.Linear:
        raise UnsupportedModelError(
            f"{where} is a {type(module).__name__}, expected nn.Linear (supported: {SUPPORTED})"
        )
    w = module.weight.detach().to(dtype)
    b = None if module.bias is None else module.bias.detach().to(dtype)
    return Linear(w, b, w if mm_dtype == dtype else w.to(mm_dtype))


def _gelu(module: nn.Module, where: str) -> str:
    from timm.layers.activations import GELU, GELUTanh, QuickGELU

    if type(module) is QuickGELU:  # x * sigmoid(1.702 x), OpenAI CLIP: the same rule as GELU
        return "quick"
    if isinstance(module, nn.GELU):
        return module.approximate
    if type(module) is GELU:
        return "none"
    if type(module) is GELUTanh:
        return "tanh"
    raise UnsupportedModelError(
        f"{where} is a {type(module).__name__}; vitlens.relevance supports GELU MLPs "
        f"(supported: {SUPPORTED})"
    )


def _identity_in_eval(module: nn.Module, where: str) -> None:
    from timm.layers import DropPath, PatchDropout

    if not isinstance(module, (nn.Identity, nn.Dropout, DropPath, PatchDropout)):
        raise UnsupportedModelError(
            f"{where} is a {type(module).__name__}, expected Identity/Dropout/DropPath "
            f"(supported: {SUPPORTED})"
        )


def _layer_scale(module: nn.Module, where: str, dtype) -> torch.Tensor | None:
    from timm.layers import LayerScale

    if isinstance(module, nn.Identity):
        return None
    if type(module) is LayerScale:
        return module.gamma.detach().to(dtype)
    raise UnsupportedModelError(f"{where} is a {type(module).__name__}, expected timm LayerScale")


def attention_pool(pool: nn.Module, where: str, dtype, mm_dtype) -> AttentionPoolWeights:
    """timm ``AttentionPoolLatent`` (one latent query, pooled output) as weights; raises
    ``UnsupportedModelError`` for layouts the pool rule does not cover."""
    from timm.layers import Mlp
    from timm.layers.attention_pool import AttentionPoolLatent

    if type(pool) is not AttentionPoolLatent:
        raise UnsupportedModelError(
            f"{where} is a {type(pool).__name__}; vitlens.relevance supports timm AttentionPoolLatent "
            f"(global_pool='map') (supported: {SUPPORTED})"
        )
    if pool.latent_len != 1:
        raise UnsupportedModelError(
            f"{where} has latent_len={pool.latent_len}; vitlens.relevance explains one latent query")
    if pool.mlp is None or type(pool.mlp) is not Mlp or isinstance(pool.mlp.fc1, nn.Conv2d):
        raise UnsupportedModelError(
            f"{where}.mlp is a {type(pool.mlp).__name__}; vitlens.relevance supports a timm Mlp with "
            "GELU in the attention pool")
    _identity_in_eval(pool.proj_drop, f"{where}.proj_drop")
    mlp = pool.mlp
    return AttentionPoolWeights(
        latent=pool.latent.detach().to(dtype),
        q=None if isinstance(pool.q, nn.Identity) else _linear(pool.q, f"{where}.q", dtype, mm_dtype),
        kv=_linear(pool.kv, f"{where}.kv", dtype, mm_dtype),
        q_norm=_norm(pool.q_norm, f"{where}.q_norm", dtype),
        k_norm=_norm(pool.k_norm, f"{where}.k_norm", dtype),
        proj=_linear(pool.proj, f"{where}.proj", dtype, mm_dtype),
        norm=_norm(pool.norm, f"{where}.norm", dtype),
        fc1=_linear(mlp.fc1, f"{where}.mlp.fc1", dtype, mm_dtype),
        gelu_approximate=_gelu(mlp.act, f"{where}.mlp.act"),
        mlp_norm=_norm(mlp.norm, f"{where}.mlp.norm", dtype),
        fc2=_linear(mlp.fc2, f"{where}.mlp.fc2", dtype, mm_dtype),
        pos_embed=None if pool.pos_embed is None else pool.pos_embed.detach().to(dtype),
        num_heads=pool.num_heads,
        head_dim=pool.head_dim,
        scale=pool.scale,
    )


def _block(blk: nn.Module, i: int, dtype, mm_dtype) -> BlockWeights:
    from timm.layers import Attention, Mlp
    from timm.models.vision_transformer import Block

    where = f"blocks.{i}"
    if type(blk) is not Block:
        raise UnsupportedModelError(
            f"{where} is a {type(blk).__name__}; vitlens.relevance supports timm's pre-norm Block "
            f"(supported: {SUPPORTED})"
        )
    attn, mlp = blk.attn, blk.mlp
    if type(attn) is not Attention or getattr(attn, "gate", None) is not None:
        raise UnsupportedModelError(
            f"{where}.attn is a {type(attn).__name__}{' with a gate' if type(attn) is Attention else ''}; "
            f"vitlens.relevance supports timm Attention (supported: {SUPPORTED})"
        )
    if type(mlp) is not Mlp or isinstance(mlp.fc1, nn.Conv2d):
        raise UnsupportedModelError(
            f"{where}.mlp is a {type(mlp).__name__}; vitlens.relevance supports timm Mlp with GELU "
            f"(supported: {SUPPORTED})"
        )
    for name in ("drop_path1", "drop_path2"):
        _identity_in_eval(getattr(blk, name), f"{where}.{name}")
    return BlockWeights(
        norm1=_norm(blk.norm1, f"{where}.norm1", dtype),
        qkv=_linear(attn.qkv, f"{where}.attn.qkv", dtype, mm_dtype),
        q_norm=_norm(attn.q_norm, f"{where}.attn.q_norm", dtype),
        k_norm=_norm(attn.k_norm, f"{where}.attn.k_norm", dtype),
        attn_norm=_norm(getattr(attn, "norm", nn.Identity()), f"{where}.attn.norm", dtype),
        proj=_linear(attn.proj, f"{where}.attn.proj", dtype, mm_dtype),
        ls1=_layer_scale(blk.ls1, f"{where}.ls1", dtype),
        norm2=_norm(blk.norm2, f"{where}.norm2", dtype),
        fc1=_linear(mlp.fc1, f"{where}.mlp.fc1", dtype, mm_dtype),
        gelu_approximate=_gelu(mlp.act, f"{where}.mlp.act"),
        mlp_norm=_norm(mlp.norm, f"{where}.mlp.norm", dtype),
        fc2=_linear(mlp.fc2, f"{where}.mlp.fc2", dtype, mm_dtype),
        ls2=_layer_scale(blk.ls2, f"{where}.ls2", dtype),
        num_heads=attn.num_heads,
        head_dim=attn.head_dim,
        scale=attn.scale,
    )


def precision_and_patch_embedding(pe: nn.Module, *, dtype, mm_dtype, rounding, tf32) -> dict:
    """The ``Backbone`` fields every ViT-like family fills alike: the precision plan and a timm
    ``PatchEmbed`` (non-overlapping convolution, optional norm)."""
    pw = pe.proj
    return dict(
        dtype=dtype,
        mm_dtype=mm_dtype,
        rounding=mm_dtype != dtype if rounding is None else rounding,
        tf32=tf32,
        device=pw.weight.device,
        patch_weight=pw.weight.detach().to(dtype),
        patch_bias=None if pw.bias is None else pw.bias.detach().to(dtype),
        patch_size=tuple(pw.kernel_size),
        patch_norm=_norm(pe.norm, "patch_embed.norm", dtype),
        img_size=None if pe.img_size is None else tuple(pe.img_size),
    )


def read(vit: nn.Module, *, dtype: torch.dtype, mm_dtype: torch.dtype,
                  rounding: bool | None = None, tf32: bool = False) -> Backbone:
    """Detached weights of ``vit`` (a timm VisionTransformer) cast to ``dtype``; checks support.
    ``rounding``: the rules' matmuls round their inputs (default: ``mm_dtype != dtype``)."""
    from timm.layers import PatchEmbed
    from timm.models.deit import VisionTransformerDistilled

    pe = vit.patch_embed
    if type(pe) is not PatchEmbed or not isinstance(pe.proj, nn.Conv2d):
        raise UnsupportedModelError(
            f"patch_embed is a {type(pe).__name__}; vitlens.relevance supports timm PatchEmbed "
            f"(supported: {SUPPORTED})"
        )
    distilled = isinstance(vit, VisionTransformerDistilled)
    attn_pool = None
    if distilled:
        pool = "distilled"
    elif getattr(vit, "attn_pool", None) is not None:
        if vit.global_pool != "map":
            raise UnsupportedModelError(
                f"global_pool={vit.global_pool!r} is not supported; vitlens.relevance explains "
                "classifiers with global_pool 'token', 'avg' or 'map'"
            )
        pool, attn_pool = "map", attention_pool(vit.attn_pool, "attn_pool", dtype, mm_dtype)
    elif vit.global_pool in ("token", "avg"):
        pool = vit.global_pool
    else:
        raise UnsupportedModelError(
            f"global_pool={vit.global_pool!r} is not supported; vitlens.relevance explains "
            "classifiers with global_pool 'token', 'avg' or 'map'"
        )
    if not isinstance(vit.head, nn.Linear):
        raise UnsupportedModelError(
            f"the model has no classifier head (head is {type(vit.head).__name__}); "
            "build it with num_classes > 0"
        )
    for name in ("pos_drop", "patch_drop", "head_drop"):
        _identity_in_eval(getattr(vit, name), name)

    prefix = [t for t in (vit.cls_token, getattr(vit, "dist_token", None) if distilled else None,
                          None if distilled else vit.reg_token) if t is not None]
    prefix_tokens = torch.cat([t.detach().to(dtype) for t in prefix], dim=1) if prefix else None
    n_prefix = 0 if prefix_tokens is None else prefix_tokens.shape[1]
    if n_prefix != vit.num_prefix_tokens:
        raise UnsupportedModelError(
            f"{type(vit).__name__} has {vit.num_prefix_tokens} prefix tokens but vitlens found "
            f"{n_prefix} (class/distillation/register); this layout is not supported"
        )
    pw = pe.proj
    if tuple(pw.stride) != tuple(pw.kernel_size) or any(pw.padding):
        raise UnsupportedModelError("patch_embed.proj must be a non-overlapping patch convolution")
    return Backbone(
        **precision_and_patch_embedding(pe, dtype=dtype, mm_dtype=mm_dtype, rounding=rounding, tf32=tf32),
        grid_size=tuple(pe.grid_size) if pe.grid_size is not None else None,
        dynamic_img_size=bool(vit.dynamic_img_size),
        dynamic_img_pad=bool(pe.dynamic_img_pad),
        prefix_tokens=prefix_tokens,
        num_prefix_tokens=n_prefix,
        pos_embed=None if vit.pos_embed is None else vit.pos_embed.detach().to(dtype),
        no_embed_class=bool(vit.no_embed_class),
        norm_pre=_norm(vit.norm_pre, "norm_pre", dtype),
        blocks=[_block(b, i, dtype, mm_dtype) for i, b in enumerate(vit.blocks)],
        norm=_norm(vit.norm, "norm", dtype),
        pool=pool,
        pool_include_prefix=bool(getattr(vit, "pool_include_prefix", False)),
        fc_norm=_norm(vit.fc_norm, "fc_norm", dtype),
        head=_linear(vit.head, "head", dtype, mm_dtype),
        head_dist=_linear(vit.head_dist, "head_dist", dtype, mm_dtype) if distilled else None,
        attn_pool=attn_pool,
    )



read_backbone = read  # the name before the family registry
