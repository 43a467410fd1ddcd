"""Shared fixtures: a tiny on-disk dataset with masks and a real checkpoint trained on it.

`tiny_dataset_dir`: toy birds (`vitlens.data.toybirds`) as a CSV-manifest dataset
(`manifest.csv`: path,label,split,mask,x,y,w,h,parts_mask): 4 species x (8 train, 4 val,
4 test) 32x32 PNGs, each with a whole-bird mask and a parts mask.
`tiny_classifier_checkpoint`: a ViTClassifier (32 px, patch 8, width 32, depth 2, 4 classes)
trained a few steps by a real Lightning Trainer on that dataset.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from vitlens.data.toybirds import generate_toybirds, toybird_species_names  # noqa: E402

TINY_NUM_CLASSES = 4
TINY_CLASSES = toybird_species_names(TINY_NUM_CLASSES)
TINY_IMAGE_SIZE = 32
TINY_MODEL = dict(
    backbone="vit_tiny_patch16_224",
    img_size=TINY_IMAGE_SIZE,
    backbone_kwargs=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2),
)


def tiny_datamodule(root: Path, *, batch_size: int = 8, **kwargs):
    """The real `ImageDataModule` on `tiny_dataset_dir` with the tiny model's normalisation."""
    from vitlens.data import ImageDataModule

    options = dict(image_size=TINY_IMAGE_SIZE, batch_size=batch_size, num_workers=0,
                   backbone=TINY_MODEL["backbone"], eval_resize="resize")
    return ImageDataModule(str(root), **{**options, **kwargs})


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory) -> Path:
    """Toy birds as a CSV manifest with masks and boxes: 4 species x (8 train, 4 val, 4 test) 32-px PNGs."""
    root = tmp_path_factory.mktemp("tiny_dataset") / "toybirds"
    generate_toybirds(root, TINY_NUM_CLASSES, image_size=TINY_IMAGE_SIZE, train_per_class=8, val_per_class=4,
                      test_per_class=4, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_classifier_checkpoint(tiny_dataset_dir, tmp_path_factory) -> Path:
    """Path of a real ViTClassifier checkpoint (class names, hparams) trained a few steps on `tiny_dataset_dir`."""
    import lightning as L

    from vitlens.models import ViTClassifier

    L.seed_everything(0, verbose=False)
    data = tiny_datamodule(tiny_dataset_dir)
    assert data.class_names == TINY_CLASSES
    model = ViTClassifier(class_names=data.class_names, lr=3e-3, weight_decay=0.01, **TINY_MODEL)
    out = tmp_path_factory.mktemp("tiny_checkpoint")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=8, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out)
    trainer.fit(model, datamodule=data)
    path = out / "tiny_vit.ckpt"
    trainer.save_checkpoint(path)
    return path
