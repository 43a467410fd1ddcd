"""timm Vision Transformer backbones (ViT, DeiT, MAE, register-token variants) by name."""
from __future__ import annotations

from typing import Any

import timm
from timm.models.vision_transformer import VisionTransformer

SUPPORTED_FAMILIES = ("vit_*", "deit_*", "deit3_*")
_PREFIXES = ("vit_", "deit_", "deit3_")


def _architecture(name: str) -> str:
    """`vit_base_patch16_224.mae` -> `vit_base_patch16_224` (timm's pretrained tag dropped)."""
    return name.split(".", 1)[0]


def check_backbone_name(name: str) -> None:
    """Raise a one-line ValueError unless `name` is a timm ViT/DeiT model name."""
    arch = _architecture(name)
    if not arch.startswith(_PREFIXES):
        raise ValueError(
            f"backbone {name!r} is not supported: vitlens explains timm Vision Transformers, "
            f"use a name matching {', '.join(SUPPORTED_FAMILIES)} (e.g. vit_base_patch16_224.mae, deit_small_patch16_224)"
        )
    if not timm.is_model(arch):
        close = timm.list_models(f"{arch[:12]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ValueError(f"backbone {name!r} is not a timm model name{hint}")


def create_backbone(name: str, num_classes: int, *, weights: str | None = None, **timm_kwargs: Any) -> VisionTransformer:
    """Build the timm ViT/DeiT `name` with a `num_classes`-way head.

    Any timm keyword (img_size, patch_size, depth, embed_dim, num_heads, drop_path_rate,
    global_pool, reg_tokens, ...) passes through, so small ViTs can be trained from scratch.
    `weights`: None (random init), "timm" (timm's hub, needs the network) or a local file in
    any format `vitlens.models.weights.load_backbone_weights` reads.
    """
    check_backbone_name(name)
    model = timm.create_model(_architecture(name), pretrained=False, num_classes=num_classes, **timm_kwargs)
    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"backbone {name!r} builds a timm {type(model).__name__}, not a VisionTransformer; "
            f"vitlens supports the ViT family ({', '.join(SUPPORTED_FAMILIES)})"
        )
    if weights is not None:
        from vitlens.models.weights import load_backbone_weights

        load_backbone_weights(model, weights, backbone=name)
    return model
