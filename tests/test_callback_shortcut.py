"""The shortcut alarm in real fits: offline W&B alert read back, clean fit quiet, stop, resume keeps drift and hysteresis."""
from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import TINY_CLASSES, TINY_MODEL, tiny_datamodule
from vitlens.callbacks import ExplanationCallback, ShortcutWarning
from vitlens.callbacks.wandb_offline import read_alerts, read_history, read_summary
from vitlens.models import ViTClassifier

# thresholds so low that any map fires after the first epoch: tests the plumbing (what is
# raised where), not the thresholds, which BENCHMARKS.md measures on the real jobs
EAGER = dict(position_fire=0.5, position_clear=0.4, object_fire=100.0, object_clear=200.0, patience=1,
             warmup_epochs=1, min_images=1, min_recognition=None)


@pytest.fixture(autouse=True)
def wandb_teardown(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield
    import wandb

    wandb.finish()
    wandb.teardown()


def _fit(root, tmp_path, callback, *, logger=False, max_epochs=2, ckpt_path=None, extra=()):
    L.seed_everything(0, verbose=False)
    model = ViTClassifier(class_names=TINY_CLASSES, lr=3e-3, weight_decay=0.01, **TINY_MODEL)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, logger=logger,
                        callbacks=[callback, *extra], enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, num_sanity_val_steps=0, limit_train_batches=2,
                        enable_checkpointing=bool(extra))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=tiny_datamodule(root), ckpt_path=ckpt_path)
    return trainer, [w for w in caught if issubclass(w.category, ShortcutWarning)]


def _callback(**kw):
    return ExplanationCallback(num_samples=4, perturbation_samples=0, shortcut_samples=16, strict=True, **kw)


def test_alarm_reaches_the_offline_wandb_run_the_log_and_the_summary(tiny_dataset_dir, tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project="vitlens-test", save_dir=str(tmp_path), offline=True)
    callback = _callback(shortcut_thresholds=EAGER)
    _, caught = _fit(tiny_dataset_dir, tmp_path, callback, logger=logger, max_epochs=2)
    run_dir = Path(logger.experiment.dir).parent
    import wandb

    wandb.finish()
    wandb.teardown()
    fired = callback.alarm.fired
    assert fired and {e.epoch for e in fired} == {1}  # warm-up: never at epoch 0
    alerts = read_alerts(run_dir)
    assert len(alerts) == len({e.method for e in fired})  # one alert per method and epoch
    assert all(a["level"] == "WARN" and "shortcut suspected at epoch 1" in a["title"] for a in alerts)
    assert any(e.class_name in alerts[0]["text"] for e in fired)
    summary = read_summary(run_dir)
    assert summary["shortcut/alarm"] is True and summary["shortcut/first_alarm_epoch"] == 1
    assert summary["shortcut/alarms_fired"] == len(fired)
    rows = [r for r in read_history(run_dir) if "shortcut/alarms/_type" in r]
    assert len(rows) == 1 and rows[0]["shortcut/alarms/nrows"] == len(fired)  # the table, in the epoch's step
    history = [r for r in read_history(run_dir) if "epoch" in r and any(k.startswith("shortcut/") for k in r)]
    for row in history:
        for method in callback.methods:
            assert row[f"shortcut/{method}/class_mean_maps/count"] == 4
            assert row[f"shortcut/{method}/position_lift_max"] > 0
            assert 0 < row[f"shortcut/{method}/{TINY_CLASSES[0]}/peak_mass"] <= 1
    one_liners = [str(w.message) for w in caught if "shortcut suspected at epoch" in str(w.message)]
    assert len(one_liners) == len(fired) and all("\n" not in m for m in one_liners)
    assert any("shortcut alarm:" in str(w.message) for w in caught)  # the end-of-fit summary


def test_default_thresholds_stay_quiet_on_a_clean_fit(tiny_dataset_dir, tmp_path, caplog):
    """A clean fit near chance accuracy: its maps wander (relevance on the object 0.3-0.8x the random
    control at epoch 2, which fired the object signal before classes had to be recognised), but the
    model recognises no class yet, so none is judged, and the log says so."""
    import logging

    callback = _callback()
    with caplog.at_level(logging.INFO):
        _, caught = _fit(tiny_dataset_dir, tmp_path, callback, max_epochs=3)
    assert len(callback.alarm.history) == 3 and callback.alarm.events == [] and caught == []
    assert not (tmp_path / "explain" / "shortcut_alarms.csv").exists()
    assert all(f"recognition|{name}" in row for row in callback.alarm.history for name in TINY_CLASSES)
    assert f"shortcut/{TINY_CLASSES[0]}/recognition" in callback.last_result.scalars()
    not_judged = [r.getMessage() for r in caplog.records if "not judged, the model does not recognise" in r.getMessage()]
    assert len(not_judged) == len(callback.alarm.history)  # one line per epoch, naming the classes
    assert "min_recognition=0.5" in not_judged[0]
    assert "not judged while the model did not recognise the class" in callback.alarm.summary()


def test_on_shortcut_stop_ends_training_and_writes_the_alarm_csv(tiny_dataset_dir, tmp_path):
    callback = _callback(shortcut_thresholds=EAGER, on_shortcut="stop")
    trainer, _ = _fit(tiny_dataset_dir, tmp_path, callback, max_epochs=5)
    assert trainer.current_epoch == 2  # fired at epoch 1, stopped after it
    text = (tmp_path / "explain" / "shortcut_alarms.csv").read_text()
    assert text.startswith("epoch,kind,signal") and ",fired,position," in text
    with pytest.raises(ValueError, match="on_shortcut"):
        ExplanationCallback(on_shortcut="panic")
    with pytest.raises(ValueError, match="unknown key"):
        ExplanationCallback(shortcut_thresholds={"nope": 1})


def test_resume_continues_drift_and_the_alarm(tiny_dataset_dir, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    whole = _callback()
    _fit(tiny_dataset_dir, tmp_path / "whole", whole, max_epochs=2)
    class StopAfterFirstEpoch(L.Callback):  # same max_epochs (so the same LR schedule), interrupted after epoch 0
        def on_validation_end(self, trainer, pl_module):
            trainer.should_stop = True

    first = _callback()
    _fit(tiny_dataset_dir, tmp_path / "a", first, max_epochs=2,
         extra=[StopAfterFirstEpoch(), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)["callbacks"][first.state_key]
    assert set(saved["previous_maps"]) == set(first.methods) and len(saved["alarm"]["history"]) == 1
    resumed = _callback()
    _fit(tiny_dataset_dir, tmp_path / "b", resumed, max_epochs=2, ckpt_path=tmp_path / "ckpt" / "last.ckpt",
         extra=[ModelCheckpoint(dirpath=tmp_path / "ckpt2")])
    assert [h["epoch"] for h in resumed.alarm.history] == [h["epoch"] for h in whole.alarm.history] == [0, 1]
    assert resumed.alarm.history[0] == whole.alarm.history[0]  # epoch 0 came from the checkpoint
    # the drift point of epoch 1 exists after a resume, as without one (its value differs a little:
    # Lightning does not restore the data order's random state, so epoch 1 trains on another order)
    for method in whole.methods:
        assert f"explain/{method}/drift" in whole.last_result.scalars()
        assert -1 <= resumed.last_result.scalars()[f"explain/{method}/drift"] <= 1
        assert len(resumed.last_result.drift[method]) == len(whole.last_result.drift[method]) == 4


def _shortcut_fit(root: Path, tmp_path: Path, probability: float, logger=False):
    """A real fit on a small toy-birds set whose every image of every split carries the class's corner
    mark (``probability`` 1.0; 0.0: the same birds without it): 4 species, 32 px, small birds, a big mark,
    no flips or crops (the mark stays in its corner). Shipped thresholds (no overrides)."""
    from vitlens.data import ImageDataModule
    from vitlens.data.toybirds import generate_toybirds, toybird_species_names

    generate_toybirds(root, 4, image_size=32, train_per_class=128, val_per_class=8, test_per_class=1,
                      shortcut_probability=probability, shortcut_size=10, seed=0, bird_size=(0.3, 0.4),
                      distractors=(0, 1))
    L.seed_everything(0, verbose=False)
    data = ImageDataModule(str(root), image_size=32, batch_size=32, num_workers=0, backbone="vit_tiny_patch16_224",
                           eval_resize="resize", hflip=0.0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                           color_jitter=0.0)
    model = ViTClassifier(class_names=toybird_species_names(4), lr=2e-3, weight_decay=0.01, warmup_epochs=0,
                          backbone="vit_tiny_patch16_224", img_size=32,
                          backbone_kwargs=dict(patch_size=8, embed_dim=64, depth=2, num_heads=2))
    callback = ExplanationCallback(methods=["transformer_attribution", "grad_rollout"], num_samples=4,
                                   perturbation_samples=0, strict=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=15, logger=logger, callbacks=[callback],
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0, enable_checkpointing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=data)
    return trainer, callback


@pytest.mark.slow
def test_a_learned_shortcut_trips_the_shipped_thresholds(tmp_path):
    """Issue 11: a tiny ViT learns the corner mark (100% val accuracy; without the mark it stays near chance),
    the shipped thresholds fire, and the alert is read back from the offline W&B run."""
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project="vitlens-test", save_dir=str(tmp_path), offline=True)
    trainer, callback = _shortcut_fit(tmp_path / "marked", tmp_path, 1.0, logger=logger)
    run_dir = Path(logger.experiment.dir).parent
    import wandb

    wandb.finish()
    wandb.teardown()
    assert float(trainer.callback_metrics["val/acc"]) == 1.0
    fired = callback.alarm.fired
    assert fired and min(e.epoch for e in fired) >= callback.alarm.thresholds.warmup_epochs
    assert any(e.method == "transformer_attribution" for e in fired)
    assert all(r >= 0.5 for r in callback.last_result.recognition)  # the mark is learned: every class recognised
    alerts = read_alerts(run_dir)
    assert alerts and all("shortcut suspected at epoch" in a["title"] for a in alerts)
    assert read_summary(run_dir)["shortcut/alarm"] is True

    clean_trainer, clean = _shortcut_fit(tmp_path / "clean", tmp_path / "c", 0.0)
    assert float(clean_trainer.callback_metrics["val/acc"]) < 0.6  # the birds alone are not learned in 15 epochs
    assert clean.alarm.events == []
