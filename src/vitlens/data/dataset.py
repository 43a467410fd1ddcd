"""`ImageDataset`: samples -> the per-sample form of the batch dict in docs/DESIGN.md."""
from __future__ import annotations

import os
import random
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from vitlens.data.errors import DataError
from vitlens.data.images import read_image, read_mask
from vitlens.data.sources import Sample

__all__ = ["EpochShuffle", "ImageDataset"]


class ImageDataset(Dataset):
    """Reads, converts and transforms one sample at a time.

    Each item is a dict: `image` (3, H, W) float32, `label` and `index` int64 scalars and,
    when the data set has them, `mask` (H, W) float32 in {0, 1} with `has_mask`, and `box`
    (4,) float32 `[x_min, y_min, x_max, y_max]` in transformed pixels with `has_box`.

    `transform` is an albumentations Compose (see `vitlens.data.transforms`). Indexed with
    `(index, seed)` (what `EpochShuffle` yields, the training loader) the transform draws from
    generators seeded with `seed`, so a sample's augmentation is a function of (data seed,
    epoch, index) alone: the same whatever the number of workers, whether they persist, and
    after a resume. Indexed with a plain int, its random state is re-seeded from
    `torch.initial_seed()` (and the DDP rank) the first time each DataLoader worker uses it, so
    workers never repeat each other's augmentations and a seeded run repeats itself. Without a
    transform, images come back as floats in [0, 1] at their own size.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        class_names: Sequence[str],
        transform: Callable | None = None,
        *,
        has_masks: bool | None = None,
        has_boxes: bool | None = None,
    ):
        self.samples = list(samples)
        self.class_names = list(class_names)
        self.transform = transform
        self.has_masks = any(s.mask for s in self.samples) if has_masks is None else bool(has_masks)
        self.has_boxes = any(s.box for s in self.samples) if has_boxes is None else bool(has_boxes)
        self._seeded_with: int | None = None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 class index of every sample."""
        return np.array([s.label for s in self.samples], dtype=np.int64)

    @property
    def paths(self) -> list[str]:
        return [s.path for s in self.samples]

    def _reseed(self) -> None:
        seed = (torch.initial_seed() + 1_000_003 * int(os.environ.get("RANK", "0"))) % 2**32
        if seed != self._seeded_with and hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(seed)
        self._seeded_with = seed

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Untransformed (image HxWx3 uint8, mask HxW uint8 or None, box (1, 4) float or None)."""
        s = self.samples[index]
        image = read_image(s.path)
        height, width = image.shape[:2]
        mask = None
        if self.has_masks:
            if s.mask:
                mask = read_mask(s.mask).astype(np.uint8)
                if mask.shape != (height, width):
                    raise DataError(f"mask {s.mask} is {mask.shape[1]}x{mask.shape[0]} but its image {s.path} is {width}x{height}")
            else:
                mask = np.zeros((height, width), dtype=np.uint8)
        box = None
        if s.box is not None:
            x0, y0, x1, y1 = s.box
            x0, x1 = max(0.0, x0), min(float(width), x1)
            y0, y1 = max(0.0, y0), min(float(height), y1)
            if x1 <= x0 or y1 <= y0:
                raise DataError(f"box {list(s.box)} of {s.path} lies outside the {width}x{height} image")
            box = np.array([[x0, y0, x1, y1]], dtype=np.float32)
        return image, mask, box

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        seed = None
        if isinstance(index, (tuple, list)):
            index, seed = int(index[0]), int(index[1])
        image, mask, box = self.load(index)
        has_box = box is not None
        if self.transform is not None:
            if seed is None:
                self._reseed()
            elif hasattr(self.transform, "set_random_state"):
                self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
                self._seeded_with = None  # a later plain-int use re-seeds from torch's seed
            data = {"image": image}
            if mask is not None:
                data["mask"] = mask
            takes_boxes = "bboxes" in getattr(self.transform, "processors", {})
            if takes_boxes:
                data["bboxes"] = box if has_box else np.zeros((0, 4), np.float32)
                data["box_ids"] = [0] if has_box else []
            elif has_box and self.has_boxes:
                raise DataError("ImageDataset has boxes but its transform was built without box handling (boxes=False)")
            out = self.transform(**data)
            image, mask = out["image"], out.get("mask")
            if takes_boxes:
                boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
                has_box = len(boxes) > 0  # cropped away entirely: no box
                box = boxes[:1] if has_box else None
        else:
            image = image.astype(np.float32) / 255.0
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)),
            "label": torch.tensor(self.samples[index].label, dtype=torch.int64),
            "index": torch.tensor(index, dtype=torch.int64),
        }
        if self.has_masks:
            item["mask"] = torch.from_numpy(np.ascontiguousarray(mask > 0, dtype=np.float32))
            item["has_mask"] = torch.tensor(self.samples[index].mask is not None)
        if self.has_boxes:
            item["box"] = torch.from_numpy(box[0]) if has_box else torch.zeros(4)
            item["has_box"] = torch.tensor(has_box)
        return item

    def __repr__(self) -> str:
        return f"ImageDataset({len(self)} samples, {len(self.class_names)} classes, masks={self.has_masks}, boxes={self.has_boxes})"


class EpochShuffle(Sampler):
    """The training order: a permutation of `range(n)` drawn from (`seed`, epoch) alone, each
    index paired with the seed of its augmentation (`ImageDataset` reads `(index, seed)`).

    `epoch` is called when an epoch's iteration starts (the data module passes the trainer's
    `current_epoch`), so an epoch's batches and augmentations do not depend on what ran before
    it: a run resumed from an epoch-end checkpoint sees the uninterrupted run's batches, also
    with several or persistent workers. Under DDP Lightning wraps it in a
    `DistributedSamplerWrapper`, which hands each rank its share of this order.
    """

    def __init__(self, n: int, seed: int, epoch: Callable[[], int] = lambda: 0):
        self.n, self.seed, self.epoch = int(n), int(seed), epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + 7919 * int(self.epoch()) + 17) % 2**63)
        order = torch.randperm(self.n, generator=generator).tolist()
        seeds = torch.randint(0, 2**62, (self.n,), generator=generator).tolist()
        return iter(zip(order, seeds))
