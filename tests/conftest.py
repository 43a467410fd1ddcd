"""Shared fixtures: a tiny on-disk dataset with masks and a real checkpoint trained on it.

`tiny_dataset_dir`: a CSV-manifest dataset (`manifest.csv`: path,label,split,mask,x,y,w,h)
of 32x32 PNG images in 4 classes with a PNG object mask per image.
`tiny_classifier_checkpoint`: a ViTClassifier (32 px, patch 8, width 32, depth 2, 4 classes)
trained a few steps by a real Lightning Trainer on that dataset.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

TINY_CLASSES = ["circle", "square", "triangle", "bar"]
TINY_IMAGE_SIZE = 32
TINY_MODEL = dict(
    backbone="vit_tiny_patch16_224",
    img_size=TINY_IMAGE_SIZE,
    backbone_kwargs=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2),
)


def _draw_sample(rng: np.random.Generator, label: int, size: int = TINY_IMAGE_SIZE):
    """A shape of class `label` on a noisy background: (RGB uint8, mask uint8 0/255, box x,y,w,h)."""
    from PIL import Image, ImageDraw

    background = rng.integers(40, 120, size=(size, size, 3), dtype=np.uint8)
    image = Image.fromarray(background)
    mask = Image.new("L", (size, size), 0)
    s = int(rng.integers(10, 16))
    x0, y0 = int(rng.integers(1, size - s - 1)), int(rng.integers(1, size - s - 1))
    x1, y1 = x0 + s - 1, y0 + s - 1
    colour = tuple(int(c) for c in rng.integers(150, 256, size=3))
    for target, fill in ((ImageDraw.Draw(image), colour), (ImageDraw.Draw(mask), 255)):
        if label == 0:
            target.ellipse([x0, y0, x1, y1], fill=fill)
        elif label == 1:
            target.rectangle([x0, y0, x1, y1], fill=fill)
        elif label == 2:
            target.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=fill)
        else:
            target.rectangle([x0, y0 + s // 3, x1, y0 + 2 * s // 3], fill=fill)
    m = np.asarray(mask)
    ys, xs = np.nonzero(m)
    box = (int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))
    return np.asarray(image), m, box


def write_tiny_dataset(root: Path, *, per_class: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Write the tiny shapes dataset under `root`; returns the manifest path."""
    from PIL import Image

    per_class = per_class or {"train": 8, "val": 4, "test": 4}
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, count in per_class.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
        for label, name in enumerate(TINY_CLASSES):
            for i in range(count):
                image, mask, (x, y, w, h) = _draw_sample(rng, label)
                rel = f"images/{split}/{name}_{i:03d}.png"
                rel_mask = f"masks/{split}/{name}_{i:03d}.png"
                Image.fromarray(image).save(root / rel)
                Image.fromarray(mask).save(root / rel_mask)
                rows.append(dict(path=rel, label=name, split=split, mask=rel_mask, x=x, y=y, w=w, h=h))
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "split", "mask", "x", "y", "w", "h"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


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
    """A CSV-manifest dataset with masks and boxes: 4 classes x (8 train, 4 val, 4 test) 32-px PNGs."""
    root = tmp_path_factory.mktemp("tiny_dataset")
    write_tiny_dataset(root)
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
