"""Relevance maps for display and evaluation: upsample to the image, scale to [0, 1].

Signed maps (the LRP family, gradient x input) hold evidence for the class (> 0) and against
it (< 0). Plain min-max (``signed="raw"``, spec section 4, what the paper's perturbation and
segmentation tests use) puts such a map's zero at mid-scale, so "no relevance" reads as half
relevant. ``signed="positive"`` keeps the evidence for the class (what LRP papers show):
negative values become 0, then min-max, so zero stays 0 and the largest value is 1;
``signed="absolute"`` scores evidence either way (``|r|``). A map with no negative values
gives exactly the same heat map under all three.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SIGNED = ("raw", "positive", "absolute")


def heatmap(relevance: torch.Tensor, size: tuple[int, int] | int, *, signed: str = "raw") -> torch.Tensor:
    """Raw relevance (B, h, w) -> (B, H, W) in [0, 1].

    Spec section 4: bilinear upsampling (``align_corners=False``) to ``size`` and min-max per
    image. No ReLU, no mean subtraction. A constant map becomes all zeros.

    ``signed``: how negative values are treated before the min-max (after upsampling):
    ``"raw"`` (as they are; the spec), ``"positive"`` (``max(r, 0)``) or ``"absolute"`` (``|r|``).
    """
    if relevance.dim() != 3:
        raise ValueError(f"relevance must be (B, h, w), got shape {tuple(relevance.shape)}")
    if signed not in SIGNED:
        raise ValueError(f"signed must be one of {', '.join(SIGNED)}, got {signed!r}")
    if isinstance(size, int):
        size = (size, size)
    maps = relevance.unsqueeze(1)
    if not maps.is_floating_point():
        maps = maps.float()
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
    maps = maps.squeeze(1)
    if signed == "positive":
        maps = maps.clamp_min(0)
    elif signed == "absolute":
        maps = maps.abs()
    flat = maps.flatten(1)
    lo = flat.min(dim=1).values.view(-1, 1, 1)
    hi = flat.max(dim=1).values.view(-1, 1, 1)
    return (maps - lo) / (hi - lo).clamp_min(torch.finfo(maps.dtype).tiny) * (hi > lo)
