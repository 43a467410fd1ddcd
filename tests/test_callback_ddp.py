"""ExplanationCallback under a real 2-process DDP fit on CPU (gloo), with an offline W&B run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vitlens.callbacks.probe import stratified_order
from vitlens.callbacks.wandb_offline import read_history

SCRIPT = textwrap.dedent(
    '''
    import json, sys, warnings
    from pathlib import Path

    import lightning as L
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    from vitlens.callbacks import ExplanationCallback
    from vitlens.data import ImageDataModule
    from vitlens.models import ViTClassifier

    root, out = sys.argv[1], Path(sys.argv[2])


    class FailsOnRankOne(ExplanationCallback):
        def _compute(self, trainer, pl_module):
            if trainer.global_rank == 1:
                raise RuntimeError("rank one broke")
            return super()._compute(trainer, pl_module)


    def fit(callback, logger):
        L.seed_everything(0, verbose=False)
        data = ImageDataModule(root, image_size=32, batch_size=8, num_workers=0, backbone="vit_tiny_patch16_224",
                               eval_resize="resize")
        model = ViTClassifier(class_names=data.class_names, img_size=32, backbone="vit_tiny_patch16_224",
                              backbone_kwargs=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2))
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=logger,
                            callbacks=[callback], enable_progress_bar=False, enable_checkpointing=False,
                            enable_model_summary=False, limit_train_batches=2, default_root_dir=out)
        trainer.fit(model, datamodule=data)
        return trainer


    # 1. a normal run: 5 probe images (3 on rank 0, 2 on rank 1), 8 perturbation images
    logger = WandbLogger(project="vitlens-ddp", save_dir=str(out), offline=True)
    callback = ExplanationCallback(num_samples=5, perturbation_samples=8, batch_size=4, strict=True)
    trainer = fit(callback, logger)
    if trainer.is_global_zero:
        run_dir = Path(logger.experiment.dir).parent
        (out / "result.json").write_text(json.dumps({"run_dir": str(run_dir), "sample_indices": callback.sample_indices}))
        wandb.finish()
        wandb.teardown()

    # 2. rank 1 fails in the first epoch: both ranks switch off together, nobody waits, training finishes
    failing = FailsOnRankOne(num_samples=5, perturbation_samples=8, batch_size=4, strict=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(failing, False)
    ours = [str(w.message) for w in caught if "ExplanationCallback failed" in str(w.message)]
    (out / f"failure_rank{trainer.global_rank}.json").write_text(json.dumps(
        {"enabled": failing.enabled, "warnings": ours, "epoch": trainer.current_epoch}))

    # 3. the shortcut alarm (eager thresholds): judged once, on rank 0; one alarms file
    eager = dict(position_fire=0.5, position_clear=0.4, object_fire=100.0, object_clear=200.0, patience=1,
                 warmup_epochs=1, min_images=1, min_recognition=None)
    alarmed = ExplanationCallback(num_samples=4, perturbation_samples=0, shortcut_samples=16, batch_size=4, strict=True,
                                  shortcut_thresholds=eager)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(alarmed, False)
    (out / f"alarm_rank{trainer.global_rank}.json").write_text(json.dumps(
        {"fired": len(alarmed.alarm.fired), "epochs": sorted({e.epoch for e in alarmed.alarm.fired}),
         "warnings": sum("shortcut suspected at epoch" in str(w.message) for w in caught)}))
    '''
)


@pytest.mark.slow
def test_ddp_two_processes_shard_gather_and_log_on_rank_zero(tiny_dataset_dir, tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path),
           "PL_DISABLE_FORK": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), str(tiny_dataset_dir), str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    result = json.loads((tmp_path / "result.json").read_text())
    from vitlens.data import ImageDataModule

    data = ImageDataModule(str(tiny_dataset_dir), image_size=32, batch_size=8, num_workers=0, eval_resize="resize")
    data.setup("fit")
    assert result["sample_indices"] == stratified_order(data.val_dataset.labels, 64, seed=0)  # shortcut_samples=64: all 16
    probe = result["sample_indices"][:5]

    rows = [r for r in read_history(Path(result["run_dir"])) if any(k.startswith("explain/") for k in r)]
    assert [r["epoch"] for r in rows] == [0, 1]  # one step per epoch, from rank 0 only
    for row in rows:
        for method in ("transformer_attribution", "grad_rollout"):
            assert row[f"explain/{method}/maps/count"] == 5  # gathered from both ranks
            captions = row[f"explain/{method}/maps/captions"]
            assert [int(c.split()[0][1:]) for c in captions] == probe  # in probe order
            for score in ("pos_auc", "neg_auc"):
                assert 0.0 <= row[f"explain/{method}/{score}"] <= 90.0
        assert row["explain/table/nrows"] in (5, 10)
    assert -1.0 <= rows[1]["explain/transformer_attribution/drift"] <= 1.0 + 1e-9

    zero, one = (json.loads((tmp_path / f"alarm_rank{r}.json").read_text()) for r in (0, 1))
    assert zero["fired"] > 0 and zero["epochs"] == [1] and zero["warnings"] == zero["fired"]
    assert one == {"fired": 0, "epochs": [], "warnings": 0}  # one alarm, from rank 0
    alarm_rows = (tmp_path / "explain" / "shortcut_alarms.csv").read_text().strip().splitlines()
    assert len(alarm_rows) == 1 + zero["fired"]

    for rank in (0, 1):
        failure = json.loads((tmp_path / f"failure_rank{rank}.json").read_text())
        assert failure["enabled"] is False and failure["epoch"] == 2
        if rank == 0:
            assert len(failure["warnings"]) == 1 and "on rank 1" in failure["warnings"][0]
            assert "rank one broke" in failure["warnings"][0]
        else:
            assert failure["warnings"] == []
