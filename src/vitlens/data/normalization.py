"""Normalisation constants of a backbone, and the maps between [0, 1] and model space."""
from __future__ import annotations

from typing import Sequence

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def backbone_normalization(backbone: str | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) that timm's pretrained config gives `backbone` (ImageNet's if unknown)."""
    if backbone:
        try:
            import timm

            cfg = timm.models.get_pretrained_cfg(backbone)
            if cfg is not None:
                return tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)
        except Exception:  # unknown name: the model factory reports it properly
            pass
    return IMAGENET_MEAN, IMAGENET_STD


def _stats(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    if len(values) != 3:
        raise ValueError(f"normalisation needs 3 values (one per colour channel), got {list(values)}")
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)


def normalize(images01: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] -> model space."""
    return (images01 - _stats(mean, images01)) / _stats(std, images01)


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, H, W) model-space images -> [0, 1] (not clamped)."""
    return images * _stats(std, images) + _stats(mean, images)
