"""The shipped configs parse with train.py, and the MAE/DeiT-style augmentations they use
(RandAugment-style ops, random erasing) work on images, masks and boxes together."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from vitlens.models.backbone import check_backbone_name

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))


# one interpreter parses them all (`train.py fit -c <config> --print_config` each), to pay the
# imports once
_PARSE_ALL = """
import contextlib, io, json, sys
import train
out = {}
for config in sys.argv[1:]:
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            train.main(["fit", "-c", f"configs/{config}", "--print_config"])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    except Exception as exc:  # noqa: BLE001
        code, buf = repr(exc), io.StringIO()
    out[config] = [code, buf.getvalue()]
print("@@" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def parsed_configs():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "offline"}
    run = subprocess.run([sys.executable, "-c", _PARSE_ALL, *CONFIGS], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.split("@@", 1)[1])


@pytest.mark.parametrize("config", CONFIGS)
def test_shipped_config_parses(config, parsed_configs):
    code, printed = parsed_configs[config]
    assert code == 0, (config, code)
    resolved = yaml.safe_load(printed)
    check_backbone_name(resolved["model"]["backbone"])
    if config.startswith("cub200_"):
        model, data, trainer = resolved["model"], resolved["data"], resolved["trainer"]
        assert trainer["precision"] == "bf16-mixed" and trainer["accelerator"] == "gpu"
        assert data["rand_augment_ops"] == 2 and data["rand_augment_magnitude"] == 9
        assert 0 < model["layer_decay"] < 1
        if model["backbone"].startswith("eva02"):  # EVA-02 fine-tunes without erasing / mixup / cutmix
            assert data["random_erasing"] == 0 and model["mixup_alpha"] == 0 == model["cutmix_alpha"]
        else:  # the MAE / BEiT recipe
            assert data["random_erasing"] == 0.25 and model["mixup_alpha"] == 0.8
        callbacks = [c["class_path"] for c in trainer.get("callbacks") or []]
        assert "vitlens.callbacks.ExplanationCallback" in callbacks, config  # every family is explained
    if config in ("cub200_dinov2_vitb14.yaml", "cub200_eva02_base.yaml"):
        assert resolved["model"]["weights"].startswith("weights/")  # a local file, no download


def test_rand_augment_and_random_erasing():
    from vitlens.data.transforms import rand_augment, train_transform

    image = np.full((32, 32, 3), 128, np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 1
    plain = train_transform(32, (0.0,) * 3, (1.0,) * 3, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0,
                            color_jitter=0, seed=0)
    erased = train_transform(32, (0.0,) * 3, (1.0,) * 3, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0,
                             color_jitter=0, seed=0, random_erasing=1.0)
    a = plain(image=image, mask=mask, bboxes=[[8, 8, 24, 24]], box_ids=[0])
    b = erased(image=image, mask=mask, bboxes=[[8, 8, 24, 24]], box_ids=[0])
    assert np.allclose(a["image"], 128 / 255)
    changed = ~np.isclose(b["image"], 128 / 255).all(-1)
    assert 0.02 * 32 * 32 * 0.5 <= changed.sum() <= 0.34 * 32 * 32  # one box of 2-33% of the area
    assert np.array_equal(b["mask"], mask)  # the object mask is not erased
    ops = rand_augment(2, 9)
    assert ops.n == 2 and len(ops.transforms) == 14
    with pytest.raises(ValueError, match="rand_augment_magnitude"):
        rand_augment(2, 11)
    # geometric ops move masks and boxes with the image
    full = train_transform(32, (0.0,) * 3, (1.0,) * 3, rand_augment_ops=2, seed=1)
    for _ in range(10):
        out = full(image=np.dstack([mask * 200] * 3), mask=mask, bboxes=[[8, 8, 24, 24]], box_ids=[0])
        assert out["image"].shape == (32, 32, 3) and out["mask"].shape == (32, 32)
