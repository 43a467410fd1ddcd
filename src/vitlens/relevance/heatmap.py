"""Relevance maps for display and evaluation: upsample to the image, min-max to [0, 1]."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def heatmap(relevance: torch.Tensor, size: tuple[int, int] | int) -> torch.Tensor:
    """Raw relevance (B, h, w) -> (B, H, W) in [0, 1].

    Spec section 4: bilinear upsampling (``align_corners=False``) to ``size`` and min-max per
    image. No ReLU, no mean subtraction. A constant map becomes all zeros.
    """
    if relevance.dim() != 3:
        raise ValueError(f"relevance must be (B, h, w), got shape {tuple(relevance.shape)}")
    if isinstance(size, int):
        size = (size, size)
    maps = relevance.unsqueeze(1)
    if not maps.is_floating_point():
        maps = maps.float()
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
    maps = maps.squeeze(1)
    flat = maps.flatten(1)
    lo = flat.min(dim=1).values.view(-1, 1, 1)
    hi = flat.max(dim=1).values.view(-1, 1, 1)
    return (maps - lo) / (hi - lo).clamp_min(torch.finfo(maps.dtype).tiny) * (hi > lo)
