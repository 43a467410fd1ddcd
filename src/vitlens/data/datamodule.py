"""`ImageDataModule`: one LightningDataModule for image folders, CSV manifests, CUB-200-2011
and the generated toy birds."""
from __future__ import annotations

import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from vitlens.data.dataset import EpochShuffle, ImageDataset
from vitlens.data.errors import CorruptImageError, DataError, one_line
from vitlens.data.images import read_image
from vitlens.data.normalization import backbone_normalization
from vitlens.data.sources import Sample, describe_source, index_source, stratified_split
from vitlens.data.transforms import EVAL_RESIZE_MODES, eval_transform, train_transform

__all__ = ["ImageDataModule"]

GENERATORS = ("toybirds",)


class ImageDataModule(L.LightningDataModule):
    """Labelled images for training and evaluation, as batch dicts (docs/DESIGN.md).

    Args:
        path: one of
            - an image-folder tree `train/<class>/*`, `val/<class>/*` (optional `test/`);
            - one `<class>/*` tree (split into train/val by `val_fraction`);
            - a CSV manifest (`path,label` + optional `split`, `mask`, `x,y,w,h`; relative
              paths are relative to the CSV's folder; a `classes.txt` beside it fixes the
              class list and order, otherwise classes are sorted), or a folder holding
              `manifest.csv` (as the toy birds write);
            - a CUB-200-2011 root (or its parent) with `images.txt` etc.; `segmentations/`
              inside it or beside it gives masks. The official test split is `test`.
        image_size: side of the square images the model sees.
        batch_size: per-process batch size (train drops the last incomplete batch; a train
            split smaller than one batch is trained in batches of its size, with a note).
        eval_batch_size: val/test batch size (default: batch_size).
        num_workers: DataLoader worker processes.
        val_fraction: when the source has no val split, this stratified, seeded fraction
            of train becomes val; 0 uses the test split for validation instead.
        seed: seeds the val split, the shuffling and the augmentations.
        backbone: timm model name, only to look up its normalisation mean/std.
        mean, std: override the backbone's normalisation.
        eval_resize: "center_crop" (shorter side to image_size / crop_pct, centre crop) or
            "resize" (squash to image_size, nothing cut off).
        crop_pct: fraction of the resized image the centre crop keeps.
        crop_scale, crop_ratio: RandomResizedCrop area fraction and aspect ratio ranges.
        hflip: horizontal-flip probability.
        color_jitter: brightness/contrast/saturation jitter strength (0 = off).
        mask_column: CSV column holding the mask paths (e.g. "parts_mask" for toy birds).
        skip_corrupt: decode every image in `setup` and drop unreadable ones with a warning
            naming them (otherwise an unreadable image is an error naming it when read).
        generate: "toybirds" to generate the toy-bird set at `path` if it is missing.
        generate_options: keywords of `vitlens.data.toybirds.generate_toybirds`.
        pin_memory, persistent_workers: DataLoader options.
        rand_augment_ops, rand_augment_magnitude: RandAugment-style augmentation (number of
            ops per image, 0 = off; strength out of 10), as in the MAE/DeiT recipes.
        random_erasing: random-erasing probability (0 = off; the MAE recipe uses 0.25).
    """

    def __init__(
        self,
        path: str,
        image_size: int = 224,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        val_fraction: float = 0.2,
        seed: int = 0,
        backbone: str | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        eval_resize: Literal["center_crop", "resize"] = "center_crop",
        crop_pct: float = 0.875,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        crop_ratio: tuple[float, float] = (0.75, 1.3333333333333333),
        hflip: float = 0.5,
        color_jitter: float = 0.4,
        mask_column: str = "mask",
        skip_corrupt: bool = False,
        generate: str | None = None,
        generate_options: dict | None = None,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        rand_augment_ops: int = 0,
        rand_augment_magnitude: int = 9,
        random_erasing: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        if eval_resize not in EVAL_RESIZE_MODES:
            raise ValueError(f"eval_resize must be one of {EVAL_RESIZE_MODES}, got {eval_resize!r}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if generate is not None and generate not in GENERATORS:
            raise ValueError(f"generate must be one of {GENERATORS} or None, got {generate!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path = str(path)
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.backbone = backbone
        default_mean, default_std = backbone_normalization(backbone)
        self.mean = tuple(float(v) for v in (mean if mean is not None else default_mean))
        self.std = tuple(float(v) for v in (std if std is not None else default_std))
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values each (RGB), got mean={self.mean}, std={self.std}")
        self.generate = generate
        self.generate_options = dict(generate_options or {})
        if generate == "toybirds":
            import inspect

            from vitlens.data.toybirds import toybirds_options

            known = inspect.signature(toybirds_options).parameters
            unknown = sorted(set(self.generate_options) - set(known))
            if unknown:
                raise ValueError(f"generate_options: unknown key(s) {', '.join(unknown)} for toybirds (known: {', '.join(known)})")

        self._info = None
        if generate == "toybirds" and not (Path(self.path) / "manifest.csv").exists():
            from vitlens.data.toybirds import toybird_species_names, toybirds_options

            options = toybirds_options(**self.generate_options)  # validates the keywords now
            self.class_names = toybird_species_names(options["num_species"])
            self.has_masks, self.has_boxes = True, True
        else:
            self._info = describe_source(self.path)
            self.class_names = list(self._info.class_names)
            self.has_masks, self.has_boxes = self._info.has_masks, self._info.has_boxes
        self.num_classes = len(self.class_names)
        self.train_dataset: ImageDataset | None = None
        self.val_dataset: ImageDataset | None = None
        self.test_dataset: ImageDataset | None = None

    # ------------------------------------------------------------------ preparing
    def prepare_data(self) -> None:
        """Generate the toy birds at `path` (once per node; atomic, so ranks never see half)."""
        if self.generate == "toybirds":
            from vitlens.data.toybirds import generate_toybirds

            generate_toybirds(self.path, **self.generate_options, progress=True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        if self._info is None:
            if not (Path(self.path) / "manifest.csv").exists():
                self.prepare_data()  # setup() called without a Trainer
            self._info = describe_source(self.path)
            if list(self._info.class_names) != self.class_names:
                raise DataError(f"{self.path} holds classes {self._info.class_names}, expected {self.class_names}")
        splits = index_source(self._info, mask_column=self.hparams.mask_column)
        train = splits.get("train", [])
        if not train:
            raise DataError(f"{self.path} has no training samples")
        val = splits.get("val")
        test = splits.get("test")
        if val is None:
            if self.val_fraction > 0:
                train_idx, val_idx = stratified_split([s.label for s in train], self.val_fraction, self.seed)
                train, val = [train[i] for i in train_idx], [train[i] for i in val_idx]
            elif test:
                val = test
            else:
                raise DataError(f"{self.path} has no val or test split and val_fraction is 0: nothing to validate on")
        if self.hparams.skip_corrupt:
            train, val = self._drop_corrupt(train, "train"), self._drop_corrupt(val, "val")
            test = self._drop_corrupt(test, "test") if test else test
        if len(train) < self.batch_size and stage in (None, "fit"):
            # a first try on a small folder trains (train drops incomplete batches: with batches
            # larger than the split it would run no step at all)
            if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0:
                print(f"note: the train split of {self.path} has {len(train)} images, fewer than data.batch_size="
                      f"{self.batch_size}: training uses batches of {len(train)} (one step per epoch; "
                      "--data.batch_size sets the size)", file=sys.stderr, flush=True)

        hp = self.hparams
        common = dict(has_masks=self.has_masks, has_boxes=self.has_boxes)
        self.train_dataset = ImageDataset(train, self.class_names, train_transform(
            self.image_size, self.mean, self.std, crop_scale=hp.crop_scale, crop_ratio=hp.crop_ratio,
            hflip=hp.hflip, color_jitter=hp.color_jitter, seed=self.seed, boxes=self.has_boxes,
            rand_augment_ops=hp.rand_augment_ops, rand_augment_magnitude=hp.rand_augment_magnitude,
            random_erasing=hp.random_erasing), **common)
        self.val_dataset = ImageDataset(val, self.class_names, self.eval_transform(), **common)
        self.test_dataset = ImageDataset(test, self.class_names, self.eval_transform(), **common) if test else None

    def eval_transform(self):
        """The eval pipeline of this data module (for reading other images the same way)."""
        return eval_transform(self.image_size, self.mean, self.std, self.hparams.eval_resize, self.hparams.crop_pct,
                              boxes=self.has_boxes)

    def _drop_corrupt(self, samples: list[Sample], split: str) -> list[Sample]:
        """Decode every image (threads, progress bar); drop unreadable ones with one warning."""
        def readable(sample: Sample) -> str | None:
            try:
                read_image(sample.path)
                return None
            except CorruptImageError as error:
                return one_line(error)

        from tqdm import tqdm

        show = len(samples) >= 2000 and int(os.environ.get("LOCAL_RANK", "0")) == 0
        with ThreadPoolExecutor(max_workers=max(1, self.num_workers)) as pool:
            problems = list(tqdm(pool.map(readable, samples, chunksize=16), total=len(samples),
                                 desc=f"checking {split} images", disable=not show))
        bad = [p for p in problems if p is not None]
        if bad:
            shown = "; ".join(bad[:5]) + ("; ..." if len(bad) > 5 else "")
            warnings.warn(f"skip_corrupt: skipped {len(bad)} of {len(samples)} {split} images: {shown}", stacklevel=2)
        return [s for s, p in zip(samples, problems) if p is None]

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset: ImageDataset | None, split: str, *, train: bool = False) -> DataLoader:
        if dataset is None:
            if self.train_dataset is None:
                raise RuntimeError("ImageDataModule: call setup() before asking for dataloaders")
            raise DataError(f"{self.path} has no {split} split")
        workers = self.num_workers
        trainer = getattr(self, "trainer", None)
        sampler = None
        if train:
            # each epoch's order and augmentations from (seed, epoch) alone: a resumed run repeats
            # the uninterrupted one (EpochShuffle)
            sampler = EpochShuffle(len(dataset), self.seed, self._current_epoch)
        elif trainer is not None and trainer.world_size > 1:
            # Lightning's DistributedSampler pads evaluation splits to a multiple of the world
            # size, so a few images would count twice in val/test metrics; this one does not
            # pad (ranks may run one batch fewer: the eval step has no collectives).
            from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        return DataLoader(
            dataset,
            # a train split smaller than a batch: one batch of all of it (the rank's share under DDP)
            batch_size=max(1, min(self.batch_size, len(dataset) // (trainer.world_size if trainer is not None else 1)))
            if train else self.eval_batch_size,
            sampler=sampler,
            drop_last=train,
            num_workers=workers,
            pin_memory=self.hparams.pin_memory,
            persistent_workers=self.hparams.persistent_workers and workers > 0,
            # worker seeds from here, not from the global RNG (which would shift dropout's draws)
            generator=torch.Generator().manual_seed(self.seed) if train else None,
        )

    def _current_epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.current_epoch) if trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, "train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, "val")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, "test")

    def __repr__(self) -> str:
        return f"ImageDataModule(path={self.path!r}, {self.num_classes} classes, image_size={self.image_size})"
