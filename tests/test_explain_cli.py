"""explain.py as a user types it: fast help, one precision vocabulary, the checkpoint's own
split, and signed maps scored by their positive part (issues 9 and 13)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_IMAGE_SIZE, TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=ROOT):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "NO_ALBUMENTATIONS_UPDATE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "explain.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_help_loads_neither_lightning_nor_torch_and_describes_every_option():
    probe = ("import runpy, sys\n"
             "for argv in (['--help'], ['maps', '--help'], ['evaluate', '--help']):\n"
             "    sys.argv = ['explain.py', *argv]\n"
             "    try:\n"
             "        runpy.run_path(sys.argv_path, run_name='__main__')\n"
             "    except SystemExit as e:\n"
             "        assert e.code == 0, e.code\n"
             "print('IMPORTED', 'lightning' in sys.modules, 'torch' in sys.modules)\n")
    code = f"import sys; sys.argv_path = {str(ROOT / 'explain.py')!r}\n" + probe
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "IMPORTED False False" in result.stdout
    assert "<function" not in result.stdout  # types shown as names, not lambdas
    for option in ("--precision", "--split", "--data.val_fraction", "--signed", "--topk"):
        assert option in result.stdout
    # the API's precision names, nothing else
    assert "float32" in result.stdout and "bf16" in result.stdout and "float64" in result.stdout


def test_help_is_quick():
    import time

    start = time.perf_counter()
    result = run_cli("evaluate", "--help")
    elapsed = time.perf_counter() - start
    assert result.returncode == 0
    assert elapsed < 10, elapsed  # generous: it takes ~0.1 s on an idle 2-core machine (was 8-9 s)


def test_precision_names_are_the_apis(tiny_classifier_checkpoint, tiny_dataset_dir, tmp_path):
    bad = run_cli("maps", "--ckpt", tiny_classifier_checkpoint, "--images", tiny_dataset_dir / "images" / "val",
                  "--out", tmp_path, "--precision", "16")
    assert bad.returncode == 2
    assert "float32" in bad.stderr and "bf16" in bad.stderr and "Traceback" not in bad.stderr


@pytest.fixture(scope="module")
def folder_checkpoint(tiny_dataset_dir, tmp_path_factory):
    """A checkpoint trained on a single `<class>/*` tree split with val_fraction 0.5, seed 3."""
    import lightning as L

    from vitlens.data import ImageDataModule
    from vitlens.models import ViTClassifier

    root = tmp_path_factory.mktemp("folder_tree")
    tree = root / "birds"
    for image in sorted((tiny_dataset_dir / "images" / "train").rglob("*.png")):
        target = tree / image.parent.name / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, target)
    L.seed_everything(0, verbose=False)
    data = ImageDataModule(str(tree), image_size=TINY_IMAGE_SIZE, batch_size=8, num_workers=0,
                           backbone=TINY_MODEL["backbone"], eval_resize="resize", val_fraction=0.5, seed=3)
    model = ViTClassifier(class_names=data.class_names, lr=1e-3, **TINY_MODEL)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    trainer.fit(model, datamodule=data)
    path = root / "folder.ckpt"
    trainer.save_checkpoint(path)
    return path, tree, data


def test_evaluate_uses_the_split_the_model_was_trained_with(folder_checkpoint, tmp_path):
    path, tree, data = folder_checkpoint
    out = tmp_path / "eval"
    result = run_cli("evaluate", "--ckpt", path, "--methods", "random", "--bootstrap", "0", "--out", out,
                     "--no-progress")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    meta = report["meta"]
    assert meta["data_settings"]["val_fraction"] == 0.5 and meta["data_settings"]["seed"] == 3
    assert meta["data_settings_origin"]["val_fraction"] == "checkpoint"
    assert meta["n_images"] == len(data.val_dataset) == 16  # half of 4 x 8, not the default 20%


def test_an_override_that_puts_training_images_into_the_split_is_an_error(folder_checkpoint, tmp_path):
    path, tree, _ = folder_checkpoint
    # another seed draws another val split: about half of it was trained on
    result = run_cli("evaluate", "--ckpt", path, "--data.path", tree, "--data.seed", "7",
                     "--methods", "random", "--bootstrap", "0", "--out", tmp_path / "eval", "--no-progress")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "--data.seed 7 puts" in result.stderr and "trained on" in result.stderr
    assert not (tmp_path / "eval" / "report.json").exists()
    # a smaller fraction with the same seed stays inside the model's own val split: allowed
    ok = run_cli("evaluate", "--ckpt", path, "--data.val_fraction", "0.25", "--methods", "random",
                 "--bootstrap", "0", "--out", tmp_path / "eval2", "--no-progress")
    assert ok.returncode == 0, ok.stderr


def test_a_checkpoint_of_other_classes_names_both_files(tiny_classifier_checkpoint, folder_checkpoint, tmp_path):
    _, tree, _ = folder_checkpoint
    other = tmp_path / "two_classes"
    for name in sorted(p.name for p in tree.iterdir())[:2]:
        shutil.copytree(tree / name, other / name)
    result = run_cli("evaluate", "--ckpt", tiny_classifier_checkpoint, "--data.path", other, "--methods", "random",
                     "--bootstrap", "0", "--out", tmp_path / "eval", "--no-progress")
    assert result.returncode == 2
    assert str(tiny_classifier_checkpoint) in result.stderr and str(other) in result.stderr


def test_signed_maps_enter_localisation_by_their_positive_part():
    from vitlens.metrics import relevance_on_object
    from vitlens.relevance import heatmap

    # evidence for the class on the object (left half), evidence against it elsewhere
    r = torch.full((1, 4, 4), -1.0)
    r[:, :, :2] = 1.0
    mask = torch.zeros(1, 4, 4)
    mask[:, :, :2] = 1
    positive = heatmap(r, 4, signed="positive")
    raw = heatmap(r, 4, signed="raw")
    absolute = heatmap(r, 4, signed="absolute")
    assert torch.equal(positive, mask)  # the negative half is 0, not mid-scale
    assert float(relevance_on_object(positive, mask)[0]) == pytest.approx(1.0)
    assert float(relevance_on_object(absolute, mask)[0]) == pytest.approx(0.5)
    # a non-negative map is the same under every option
    assert torch.equal(heatmap(r.clamp_min(0), 4, signed="raw"), positive)
    assert raw[0, 0, 3] == 0 and raw[0, 0, 0] == 1
