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

__all__ = ["EVAL_RESIZE_MODES", "eval_transform", "rand_augment", "train_transform"]

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
    rand_augment_ops: int = 0,
    rand_augment_magnitude: int = 9,
    random_erasing: float = 0.0,
) -> A.Compose:
    """Random resized crop, horizontal flip, colour jitter (brightness, contrast and
    saturation by +-`color_jitter`, hue untouched, as timm), RandAugment-style ops
    (`rand_augment_ops` > 0, see `rand_augment`), random erasing (probability
    `random_erasing`, timm's area 2-33% with random pixels), normalisation. `boxes=False`
    leaves out box handling (about half the cost per sample at 64 px)."""
    _check(image_size, mean, std)
    steps: list = [A.RandomResizedCrop(size=(image_size, image_size), scale=tuple(crop_scale), ratio=tuple(crop_ratio))]
    if hflip > 0:
        steps.append(A.HorizontalFlip(p=hflip))
    if color_jitter > 0:
        steps.append(A.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter, hue=0.0, p=1.0))
    if rand_augment_ops > 0:
        steps.append(rand_augment(rand_augment_ops, rand_augment_magnitude))
    if random_erasing > 0:
        # timm's RandomErasing(mode="pixel") as the MAE/DeiT recipes use it: one box of 2-33% of
        # the area, aspect 0.3-3.3, filled with random pixels (here before normalisation)
        steps.append(A.Erasing(scale=(0.02, 1 / 3), ratio=(0.3, 3.3), fill="random", p=random_erasing))
    steps.append(A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0))
    return A.Compose(steps, bbox_params=_bbox_params(boxes), seed=seed)


def rand_augment(num_ops: int = 2, magnitude: int = 9) -> A.SomeOf:
    """RandAugment-style (Cubuk et al. 2020; timm's `rand-m9-mstd0.5-inc1` in the MAE/DeiT
    recipes): `num_ops` ops drawn uniformly from the usual list, each applied with p=0.5
    (timm's default), strength `magnitude` of 10. The geometric ops move masks and boxes with
    the image; the photometric ones touch the image only."""
    if not 0 <= magnitude <= 10:
        raise ValueError(f"rand_augment_magnitude must be in [0, 10], got {magnitude}")
    m = magnitude / 10
    ops = [
        A.AutoContrast(p=0.5),
        A.Equalize(p=0.5),
        A.InvertImg(p=0.5),
        A.Affine(rotate=(-30 * m, 30 * m), p=0.5),
        A.Posterize(num_bits=(max(1, int(round(8 - 4 * m))), 8), p=0.5),
        A.Solarize(threshold_range=(1 - m, 1.0), p=0.5),
        A.ColorJitter(brightness=0, contrast=0, saturation=(max(0.0, 1 - 0.9 * m), 1 + 0.9 * m), hue=0, p=0.5),
        A.ColorJitter(brightness=0, contrast=(max(0.0, 1 - 0.9 * m), 1 + 0.9 * m), saturation=0, hue=0, p=0.5),
        A.ColorJitter(brightness=(max(0.0, 1 - 0.9 * m), 1 + 0.9 * m), contrast=0, saturation=0, hue=0, p=0.5),
        A.Sharpen(alpha=(0.0, m), lightness=(1.0, 1.0), p=0.5),
        A.Affine(shear={"x": (-17 * m, 17 * m), "y": (0, 0)}, p=0.5),
        A.Affine(shear={"x": (0, 0), "y": (-17 * m, 17 * m)}, p=0.5),
        A.Affine(translate_percent={"x": (-0.45 * m, 0.45 * m), "y": (0, 0)}, p=0.5),
        A.Affine(translate_percent={"x": (0, 0), "y": (-0.45 * m, 0.45 * m)}, p=0.5),
    ]
    return A.SomeOf(ops, n=int(num_ops), replace=False, p=1.0)


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
