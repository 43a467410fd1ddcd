"""timm Vision Transformer backbones by name: ViT / DeiT / MAE / DINOv2 (with registers) /
CLIP / SigLIP (`VisionTransformer`), EVA-02 (`Eva`) and Swin (`SwinTransformer`).

All of them train; which ones the relevance engine explains is the engine's business
(`vitlens.relevance` raises `UnsupportedModelError` for the others)."""
from __future__ import annotations

from typing import Any

import timm
from timm.models.eva import Eva
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

SUPPORTED_FAMILIES = ("vit_*", "deit_*", "deit3_*", "eva02_*", "swin_*")
_PREFIXES = ("vit_", "deit_", "deit3_", "eva02_", "swin_")
BACKBONE_CLASSES = (VisionTransformer, Eva, SwinTransformer)


def _architecture(name: str) -> str:
    """`vit_base_patch16_224.mae` -> `vit_base_patch16_224` (timm's pretrained tag dropped)."""
    return name.split(".", 1)[0]


def check_backbone_name(name: str) -> None:
    """Raise a one-line ValueError unless `name` is a timm model name of a supported family."""
    arch = _architecture(name)
    if not arch.startswith(_PREFIXES):
        raise ValueError(
            f"backbone {name!r} is not supported: vitlens fine-tunes timm Vision Transformers, "
            f"use a name matching {', '.join(SUPPORTED_FAMILIES)} (e.g. vit_base_patch16_224.mae, vit_base_patch14_dinov2, eva02_base_patch14_224)"
        )
    if not timm.is_model(arch):
        close = timm.list_models(f"{arch[:12]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ValueError(f"backbone {name!r} is not a timm model name{hint}")


def create_backbone(name: str, num_classes: int, *, weights: str | None = None, **timm_kwargs: Any):
    """Build the timm backbone `name` (ViT, DeiT, DINOv2, CLIP, SigLIP, EVA-02, Swin) with a
    `num_classes`-way head.

    Any timm keyword (img_size, patch_size, depth, embed_dim, num_heads, drop_path_rate,
    global_pool, reg_tokens, ...) passes through, so small ViTs can be trained from scratch.
    `weights`: None (random init), "timm" (timm's hub, needs the network) or a local file in
    any format `vitlens.models.weights.load_backbone_weights` reads.
    """
    check_backbone_name(name)
    model = timm.create_model(_architecture(name), pretrained=False, num_classes=num_classes, **timm_kwargs)
    if not isinstance(model, BACKBONE_CLASSES):
        raise ValueError(
            f"backbone {name!r} builds a timm {type(model).__name__}, not a VisionTransformer, Eva or SwinTransformer; "
            f"vitlens supports the ViT family ({', '.join(SUPPORTED_FAMILIES)})"
        )
    if weights is not None:
        from vitlens.models.weights import load_backbone_weights

        load_backbone_weights(model, weights, backbone=name)
    return model
