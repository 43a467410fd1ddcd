"""Shared fixtures: a tiny on-disk dataset with masks and a real checkpoint trained on it.

`tiny_dataset_dir`: toy birds (`vitlens.data.toybirds`) as a CSV-manifest dataset
(`manifest.csv`: path,label,split,mask,x,y,w,h,parts_mask): 4 species x (8 train, 4 val,
4 test) 32x32 PNGs, each with a whole-bird mask and a parts mask.
`tiny_classifier_checkpoint`: a ViTClassifier (32 px, patch 8, width 32, depth 2, 4 classes)
trained a few steps by a real Lightning Trainer on that dataset.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from vitlens.data.toybirds import generate_toybirds, toybird_species_names

os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

TINY_NUM_CLASSES = 4
TINY_CLASSES = toybird_species_names(TINY_NUM_CLASSES)
TINY_IMAGE_SIZE = 32
TINY_MODEL = dict(
    backbone="vit_tiny_patch16_224",
    img_size=TINY_IMAGE_SIZE,
    backbone_kwargs=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2),
)


class TinyManifestDataset:
    """Stand-in reader of `manifest.csv` (until vitlens.data lands): the DESIGN.md batch dict."""

    def __init__(self, root: Path, split: str, mean, std):
        from PIL import Image

        self.class_names = list(TINY_CLASSES)
        with open(root / "manifest.csv") as f:
            rows = [r for r in csv.DictReader(f) if r["split"] == split]
        import torch

        self.images = torch.stack([
            torch.from_numpy(np.asarray(Image.open(root / r["path"]).convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
            for r in rows
        ])
        self.images = (self.images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        self.masks = torch.stack([
            torch.from_numpy((np.asarray(Image.open(root / r["mask"])) > 0).astype(np.float32)) for r in rows
        ])
        self.labels = torch.tensor([TINY_CLASSES.index(r["label"]) for r in rows])
        self.boxes = torch.tensor([[float(r["x"]), float(r["y"]), float(r["x"]) + float(r["w"]), float(r["y"]) + float(r["h"])]
                                   for r in rows])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        import torch

        return {"image": self.images[i], "label": self.labels[i], "index": torch.tensor(i),
                "mask": self.masks[i], "has_mask": torch.tensor(True),
                "box": self.boxes[i], "has_box": torch.tensor(True)}


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory) -> Path:
    """Toy birds as a CSV manifest with masks and boxes: 4 species x (8 train, 4 val, 4 test) 32-px PNGs."""
    root = tmp_path_factory.mktemp("tiny_dataset") / "toybirds"
    generate_toybirds(root, TINY_NUM_CLASSES, image_size=TINY_IMAGE_SIZE, train_per_class=8, val_per_class=4,
                      test_per_class=4, seed=0)
    return root


def tiny_dataloaders(root: Path, mean, std, batch_size: int = 8):
    from torch.utils.data import DataLoader

    train = TinyManifestDataset(root, "train", mean, std)
    val = TinyManifestDataset(root, "val", mean, std)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=0),
            DataLoader(val, batch_size=batch_size, num_workers=0))


@pytest.fixture(scope="session")
def tiny_classifier_checkpoint(tiny_dataset_dir, tmp_path_factory) -> Path:
    """Path of a real ViTClassifier checkpoint (class names, hparams) trained a few steps on `tiny_dataset_dir`."""
    import lightning as L

    from vitlens.models import ViTClassifier

    L.seed_everything(0, verbose=False)
    model = ViTClassifier(class_names=TINY_CLASSES, lr=3e-3, weight_decay=0.01, **TINY_MODEL)
    train_loader, val_loader = tiny_dataloaders(tiny_dataset_dir, model.mean, model.std)
    out = tmp_path_factory.mktemp("tiny_checkpoint")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=8, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out)
    trainer.fit(model, train_loader, val_loader)
    path = out / "tiny_vit.ckpt"
    trainer.save_checkpoint(path)
    return path
