"""Albumentations pipelines: images, masks and boxes transformed together.

Both pipelines take `image` (HxWx3 uint8), optional `mask` (HxW uint8) and `bboxes`
(pascal_voc `[x_min, y_min, x_max, y_max]` in pixels, with a parallel `box_ids` list);
boxes are clipped to the output, and a box whose object is cropped away entirely is dropped
by albumentations (the dataset then reports `has_box=False` for that sample).
"""
from __future__ import annotations

import math
import os
from typing import Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402

__all__ = ["EVAL_RESIZE_MODES", "eval_transform", "train_transform"]

EVAL_RESIZE_MODES = ("center_crop", "resize")


def _bbox_params(boxes: bool) -> A.BboxParams | None:
    # (check_each_transform=False would be 1.5x faster, but then a box cropped away entirely
    # reaches the final check with zero width and albumentations raises instead of dropping it)
    if not boxes:
        return None
    return A.BboxParams(format="pascal_voc", label_fields=["box_ids"], clip=True, min_area=0.0, min_visibility=0.0)


def _check(image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
    if int(image_size) < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values each (RGB), got mean={list(mean)}, std={list(std)}")


def train_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    crop_scale: Sequence[float] = (0.08, 1.0),
    crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    color_jitter: float = 0.4,
    seed: int | None = None,
    boxes: bool = True,
) -> A.Compose:
    """Random resized crop, horizontal flip, colour jitter (brightness, contrast and
    saturation by +-`color_jitter`, hue untouched, as timm), normalisation. `boxes=False`
    leaves out box handling (about half the cost per sample at 64 px)."""
    _check(image_size, mean, std)
    steps: list = [A.RandomResizedCrop(size=(image_size, image_size), scale=tuple(crop_scale), ratio=tuple(crop_ratio))]
    if hflip > 0:
        steps.append(A.HorizontalFlip(p=hflip))
    if color_jitter > 0:
        steps.append(A.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter, hue=0.0, p=1.0))
    steps.append(A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0))
    return A.Compose(steps, bbox_params=_bbox_params(boxes), seed=seed)


def eval_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    eval_resize: str = "center_crop",
    crop_pct: float = 0.875,
    *,
    boxes: bool = True,
) -> A.Compose:
    """Deterministic eval pipeline.

    `"center_crop"`: scale the shorter side to floor(image_size / crop_pct), then take the
    central image_size square (timm's eval transform). `"resize"`: resize to
    image_size x image_size, aspect ratio not kept (nothing cut off; what the relevance
    perturbation test uses).
    """
    _check(image_size, mean, std)
    if eval_resize == "center_crop":
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        steps: list = [A.SmallestMaxSize(max_size=int(math.floor(image_size / crop_pct))), A.CenterCrop(image_size, image_size)]
    elif eval_resize == "resize":
        steps = [A.Resize(image_size, image_size)]
    else:
        raise ValueError(f"eval_resize must be one of {EVAL_RESIZE_MODES}, got {eval_resize!r}")
    steps.append(A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0))
    return A.Compose(steps, bbox_params=_bbox_params(boxes), seed=0)
