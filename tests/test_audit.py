"""explain.py audit: the shortcut analysis of a checkpoint over a split, written as audit.md + PNGs (+ W&B)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import explain  # noqa: E402
from conftest import TINY_CLASSES  # noqa: E402
from vitlens.callbacks.wandb_offline import read_history  # noqa: E402


def test_audit_writes_verdicts_mean_maps_and_hotspots(tiny_classifier_checkpoint, tiny_dataset_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "audit"
    # eager thresholds: every class is suspected, so the hotspot pictures are written too
    code = explain.main(["audit", "--ckpt", str(tiny_classifier_checkpoint), "--data.path", str(tiny_dataset_dir),
                         "--split", "val", "--out", str(out), "--no-progress", "--wandb",
                         "--thresholds", '{"position_fire": 0.1, "position_clear": 0.1, "min_images": 1, "min_recognition": null}'])
    assert code == 0
    report = json.loads((out / "audit.json").read_text())
    assert report["meta"]["n_images"] == 16 and report["meta"]["split"] == "val"
    for method in ("transformer_attribution", "grad_rollout"):
        classes = report["methods"][method]["classes"]
        assert set(classes) == set(TINY_CLASSES)
        assert all(c["images"] == 4 and c["position_lift"] > 0 and c["hotspot"] for c in classes.values())
        assert report["methods"][method]["suspected"] == TINY_CLASSES
        assert (out / f"mean_maps.{method}.png").is_file()
        assert len(list(out.glob(f"hotspots.{method}.*.png"))) == 4
        assert all(len(c["examples"]) == 4 for c in classes.values())
    text = (out / "audit.md").read_text()
    assert "**Shortcut suspected** for 4 of 4 classes" in text and "mean_maps.grad_rollout.png" in text
    import wandb

    wandb.teardown()  # stops the W&B service, which writes the rest of the run file
    rows = [r for r in read_history(next(out.rglob("*.wandb"))) if "audit/classes/_type" in r]
    assert len(rows) == 1 and rows[0]["audit/classes/_type"] == "table-file"

    quiet = tmp_path / "quiet"
    assert explain.main(["audit", "--ckpt", str(tiny_classifier_checkpoint), "--data.path", str(tiny_dataset_dir),
                         "--out", str(quiet), "--no-progress"]) == 0
    assert "verdict" in (quiet / "audit.md").read_text()
