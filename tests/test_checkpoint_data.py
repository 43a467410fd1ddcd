"""Evaluation runs on the split a model was trained with (issue 9), as users type the commands.

The data here is one `<class>/*` tree with no val split of its own, so `val_fraction` and
`seed` decide which images are validation images; the checkpoint was trained with
`val_fraction=0.25, seed=3`, not the defaults (0.2, 0).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_IMAGE_SIZE, TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]
SPLIT = dict(val_fraction=0.25, seed=3)


def _env():
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "NO_ALBUMENTATIONS_UPDATE": "1",
            "COLUMNS": "200"}


def _run(script: str, *args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=600)


def _datamodule(tree: Path, **kwargs):
    from vitlens.data import ImageDataModule

    options = dict(image_size=TINY_IMAGE_SIZE, batch_size=8, num_workers=0, backbone=TINY_MODEL["backbone"],
                   eval_resize="resize")
    return ImageDataModule(str(tree), **{**options, **kwargs})


@pytest.fixture(scope="module")
def tree(tiny_dataset_dir) -> Path:
    """The toy birds' training images: a plain `<class>/*` folder tree (4 x 8 images), no val split."""
    return tiny_dataset_dir / "images" / "train"


@pytest.fixture(scope="module")
def split_checkpoint(tree, tmp_path_factory) -> Path:
    """A checkpoint trained (2 steps) with val_fraction=0.25, seed=3 on `tree`."""
    import lightning as L

    from vitlens.models import ViTClassifier

    L.seed_everything(0, verbose=False)
    data = _datamodule(tree, **SPLIT)
    model = ViTClassifier(class_names=data.class_names, lr=3e-3, **TINY_MODEL)
    out = tmp_path_factory.mktemp("split_checkpoint")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out)
    trainer.fit(model, datamodule=data)
    path = out / "split.ckpt"
    trainer.save_checkpoint(path)
    return path


def _val_paths(tree, **split):
    dm = _datamodule(tree, **split)
    dm.setup("fit")
    return dm.val_dataset.paths, dm.train_dataset.paths


def test_checkpoint_holds_the_data_settings(split_checkpoint, tree):
    from vitlens.data.from_checkpoint import checkpoint_data_settings

    saved = checkpoint_data_settings(split_checkpoint)
    assert saved["val_fraction"] == 0.25 and saved["seed"] == 3 and saved["path"] == str(tree)
    # the defaults would validate on training images: the premise of the tests below
    val, _ = _val_paths(tree, **SPLIT)
    _, default_train = _val_paths(tree)
    assert set(val) & set(default_train)


def test_evaluate_uses_the_checkpoints_split(split_checkpoint, tree, tmp_path):
    from vitlens.models import load_classifier

    out = tmp_path / "eval"
    result = _run("explain.py", "evaluate", "--ckpt", split_checkpoint, "--data.path", tree, "--methods", "random",
                  "--bootstrap", "0", "--batch-size", "4", "--out", out, "--no-progress")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["data_settings"]["val_fraction"] == 0.25 and report["meta"]["data_settings"]["seed"] == 3
    assert report["meta"]["data_settings_origin"]["seed"] == "checkpoint"
    val, _ = _val_paths(tree, **SPLIT)
    assert report["meta"]["n_images"] == len(val)
    # the same images: the model's accuracy on the checkpoint's val split
    dm = _datamodule(tree, **SPLIT)
    dm.setup("fit")
    model = load_classifier(split_checkpoint)
    batch = next(iter(torch.utils.data.DataLoader(dm.val_dataset, batch_size=len(val))))
    with torch.inference_mode():
        accuracy = float((model(batch["image"]).argmax(1) == batch["label"]).float().mean())
    assert report["meta"]["accuracy"] == pytest.approx(accuracy)
    # without --data.path: the checkpoint's path
    result = _run("explain.py", "evaluate", "--ckpt", split_checkpoint, "--methods", "random", "--bootstrap", "0",
                  "--out", tmp_path / "eval2", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "eval2" / "report.json").read_text())["meta"]["n_images"] == len(val)


def test_evaluate_override_that_leaks_training_images_is_an_error(split_checkpoint, tree, tmp_path):
    val, train = _val_paths(tree, seed=0, val_fraction=0.25)
    _, trained_on = _val_paths(tree, **SPLIT)
    overlap = len(set(val) & set(trained_on))
    assert overlap > 0
    result = _run("explain.py", "evaluate", "--ckpt", split_checkpoint, "--data.path", tree, "--data.seed", "0",
                  "--methods", "random", "--out", tmp_path / "o", "--no-progress")
    assert result.returncode == 2
    err = result.stderr.strip()
    assert "\n" not in err and "Traceback" not in err
    assert f"--data.seed 0 puts {overlap} of the {len(val)} val images" in err and "split.ckpt" in err
    assert not (tmp_path / "o" / "report.json").exists()
    # --split train is explicit: no error
    result = _run("explain.py", "evaluate", "--ckpt", split_checkpoint, "--split", "train", "--limit", "4",
                  "--methods", "random", "--bootstrap", "0", "--out", tmp_path / "t", "--no-progress")
    assert result.returncode == 0, result.stderr


def _config(tmp_path: Path, tree: Path) -> Path:
    config = {
        "trainer": {"accelerator": "cpu", "logger": False, "callbacks": []},
        "model": {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": TINY_MODEL["backbone_kwargs"]},
        "data": {"path": str(tree), "generate": None, "generate_options": None, "image_size": TINY_IMAGE_SIZE,
                 "batch_size": 8, "num_workers": 0, "persistent_workers": False, "eval_resize": "resize"},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_train_validate_uses_the_checkpoints_split(split_checkpoint, tree, tmp_path):
    config = _config(tmp_path, tree)
    result = _run("train.py", "validate", "-c", config, "--ckpt_path", split_checkpoint, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "note: data settings of split.ckpt: val_fraction=0.25, seed=3" in result.stderr
    result = _run("train.py", "validate", "-c", config, "--ckpt_path", split_checkpoint, "--data.seed", "1",
                  cwd=tmp_path)
    assert result.returncode != 0
    assert "data.seed=1 puts" in result.stderr and "split.ckpt" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_train_validate_with_another_models_checkpoint_names_both(split_checkpoint, tree, tmp_path):
    checkpoint = torch.load(split_checkpoint, map_location="cpu", weights_only=False)
    names = checkpoint["hyper_parameters"]["class_names"]
    checkpoint["hyper_parameters"]["class_names"] = names[:3]
    checkpoint["hyper_parameters"]["num_classes"] = 3
    other = tmp_path / "three_classes.ckpt"
    torch.save(checkpoint, other)
    result = _run("train.py", "validate", "-c", _config(tmp_path, tree), "--ckpt_path", other, cwd=tmp_path)
    assert result.returncode != 0
    err = result.stderr.strip().splitlines()[-1]
    assert "three_classes.ckpt" in err and str(tree) in err and "has 3 classes" in err and "has 4" in err
    assert "evaluate it on the data it was trained on" in err and "num_classes=3 but" not in result.stderr
