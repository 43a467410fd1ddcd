"""vitlens.callbacks.ExplanationCallback: real Trainers, real offline W&B runs read back from disk."""
from __future__ import annotations

import csv
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import vitlens.callbacks.explanation
from conftest import TINY_CLASSES, TINY_MODEL, tiny_datamodule
from vitlens.callbacks import ExplanationCallback
from vitlens.callbacks.probe import stratified_order
from vitlens.callbacks.wandb_offline import read_history, read_records
from vitlens.models import ViTClassifier

METHODS = ("transformer_attribution", "grad_rollout")


@pytest.fixture(autouse=True)
def wandb_teardown(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield
    _finish_wandb()


def _finish_wandb():
    """Finish the run and stop the W&B service, which writes the rest of the run file."""
    import wandb

    wandb.finish()
    wandb.teardown()


def _model(**overrides):
    return ViTClassifier(class_names=TINY_CLASSES, lr=3e-3, weight_decay=0.01, **{**TINY_MODEL, **overrides})


def _fit(root, tmp_path, *, callbacks=(), logger=False, max_epochs=2, seed=0, model_kw=None, ckpt_path=None, **trainer_kw):
    L.seed_everything(seed, verbose=False)
    model = _model(**(model_kw or {}))
    data = tiny_datamodule(root)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=max_epochs, logger=logger, callbacks=list(callbacks),
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        num_sanity_val_steps=1, **{"enable_checkpointing": False, "limit_train_batches": 2, **trainer_kw},
    )
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return trainer, model


def _callback(**overrides):
    options = dict(methods=METHODS, num_samples=4, perturbation_samples=8, batch_size=8, strict=True)
    return ExplanationCallback(**{**options, **overrides})


# --------------------------------------------------------------------------- probe set
def test_stratified_order_is_balanced_seeded_and_leaves_global_rng_alone():
    labels = [0] * 10 + [1] * 3 + [2] * 7
    before = torch.get_rng_state()
    order = stratified_order(labels, 9, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    assert order == stratified_order(labels, 9, seed=3)
    assert order != stratified_order(labels, 9, seed=4)
    assert len(set(order)) == 9
    counts = np.bincount([labels[i] for i in order], minlength=3)
    assert counts.tolist() == [3, 3, 3]
    first = [labels[i] for i in order[:3]]
    assert sorted(first) == [0, 1, 2]  # any prefix cycles through the classes
    everything = stratified_order(labels, 100, seed=0)
    assert sorted(everything) == list(range(20))  # asking for more than there is: all, once


def test_bad_options_name_the_culprit():
    with pytest.raises(ValueError, match="num_samples"):
        ExplanationCallback(num_samples=-1)
    with pytest.raises(ValueError, match="every_n_epochs"):
        ExplanationCallback(every_n_epochs=0)
    with pytest.raises(ValueError, match="'no_such_method'"):
        ExplanationCallback(methods=("transformer_attribution", "no_such_method"))
    with pytest.raises(ValueError, match="precision"):
        ExplanationCallback(precision="fp8")


# --------------------------------------------------------------------------- W&B
def test_wandb_gets_maps_table_scalars_and_curves_every_epoch(tiny_dataset_dir, tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project="vitlens-test", save_dir=str(tmp_path), offline=True)
    callback = _callback()
    _fit(tiny_dataset_dir, tmp_path, callbacks=[callback], logger=logger, max_epochs=2)
    run_dir = Path(logger.experiment.dir).parent
    _finish_wandb()
    assert read_records(run_dir)[-1].WhichOneof("record_type") == "exit"  # the run file is complete

    rows = [r for r in read_history(run_dir) if any(k.startswith("explain/") for k in r)]
    assert [r["epoch"] for r in rows] == [0, 1]  # one W&B step per epoch, no sanity-check step
    probe_ids = callback.probe_indices
    assert len(probe_ids) == 4
    data = tiny_datamodule(tiny_dataset_dir)
    data.setup("fit")
    val_labels = data.val_dataset.labels.tolist()
    assert sorted(val_labels[i] for i in probe_ids) == [0, 1, 2, 3]  # stratified: one per class

    for epoch, row in enumerate(rows):
        for method in METHODS:
            assert row[f"explain/{method}/maps/_type"] == "images/separated"
            assert row[f"explain/{method}/maps/count"] == 4
            captions = row[f"explain/{method}/maps/captions"]
            assert all("true: " in c and "predicted: " in c for c in captions)
            wrong = sum(" | predicted: " + TINY_CLASSES[val_labels[i]] + " " not in c for c, i in zip(captions, probe_ids))
            assert row.get(f"explain/{method}/maps_predicted/count", 0) == wrong  # misclassified: map of the prediction too
            for c, i in zip(captions, probe_ids):
                assert c.startswith(f"#{i} true: {TINY_CLASSES[val_labels[i]]} |")
            for file in row[f"explain/{method}/maps/filenames"]:
                assert (run_dir / "files" / file).is_file()
            for score in ("pos_auc", "neg_auc", "pos_auc_probability", "neg_auc_probability"):
                assert 0.0 <= row[f"explain/{method}/{score}"] <= 90.0
            for score in ("pointing_game", "relevance_on_object"):
                assert 0.0 <= row[f"explain/{method}/{score}"] <= 1.0
            if epoch == 0:
                assert f"explain/{method}/drift" not in row
            else:
                assert -1.0 <= row[f"explain/{method}/drift"] <= 1.0 + 1e-9
        for score in ("pos_auc", "neg_auc"):
            assert 0.0 <= row[f"explain/random/{score}"] <= 90.0
        assert "explain/random/maps/count" not in row
        assert row["explain/table/_type"] == "incremental-table-file"
        assert row["explain/table/nrows"] == 4 * (epoch + 1)  # the table grows: samples followed over epochs
        assert row["explain/table/increment_num"] == epoch
        assert row["explain/perturbation_curves_table/_type"] == "table-file"

    # the last increment of the table: this epoch's rows, with every column
    import json

    table = json.loads((run_dir / "files" / rows[-1]["explain/table/path"]).read_text())
    expected = ["epoch", "sample_id", "image", *METHODS, "label", "prediction", "probability"]
    assert table["columns"][: len(expected)] == expected
    assert {f"{m}/drift" for m in METHODS} | {f"{m}/pointing_game" for m in METHODS} <= set(table["columns"])
    assert [r[0] for r in table["data"]] == [1] * 4
    assert [r[1] for r in table["data"]] == probe_ids
    assert [r[table["columns"].index("label")] for r in table["data"]] == [TINY_CLASSES[val_labels[i]] for i in probe_ids]
    for r in table["data"]:
        assert 0.0 < r[table["columns"].index("probability")] <= 1.0
        assert "Image" in str(r[2]) and all("Image" in str(r[3 + k]) for k in range(len(METHODS)))

    # no memory growth: only the last epoch's maps are kept, none with autograd history
    assert all(len(maps) == 4 for maps in callback._previous_maps.values())
    assert not any(m.requires_grad for maps in callback._previous_maps.values() for m in maps.values())


# --------------------------------------------------------------------------- never hurts training
def test_training_is_bit_identical_with_and_without_the_callback(tiny_dataset_dir, tmp_path):
    kwargs = dict(backbone_kwargs={**TINY_MODEL["backbone_kwargs"], "drop_rate": 0.2, "drop_path_rate": 0.2})
    _, plain = _fit(tiny_dataset_dir, tmp_path / "a", model_kw=kwargs, max_epochs=2)
    callback = _callback()
    _, explained = _fit(tiny_dataset_dir, tmp_path / "b", model_kw=kwargs, callbacks=[callback], max_epochs=2)
    assert callback.enabled and callback._previous_maps  # it really ran
    a, b = plain.state_dict(), explained.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_failing_method_warns_once_and_training_continues(tiny_dataset_dir, tmp_path, monkeypatch):
    real = vitlens.callbacks.explanation.explain_many
    calls = []

    def flaky(model, images, methods, *args, **kw):
        calls.append(tuple(methods))
        if "grad_rollout" in methods:
            raise RuntimeError("grad_rollout exploded")
        return real(model, images, methods, *args, **kw)

    monkeypatch.setattr(vitlens.callbacks.explanation, "explain_many", flaky)
    callback = _callback(strict=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = _fit(tiny_dataset_dir, tmp_path, callbacks=[callback], max_epochs=2)
    assert trainer.current_epoch == 2 and trainer.global_step == 2 * trainer.num_training_batches  # finished
    ours = [w for w in caught if "ExplanationCallback failed" in str(w.message)]
    assert len(ours) == 1
    assert "grad_rollout exploded" in str(ours[0].message) and "Traceback" in str(ours[0].message)
    assert not callback.enabled
    assert len(calls) == 1  # switched off after the first failure
    with pytest.raises(RuntimeError, match="grad_rollout exploded"):
        _fit(tiny_dataset_dir, tmp_path / "strict", callbacks=[_callback(strict=True)], max_epochs=1)


def test_model_state_is_restored(tiny_dataset_dir, tmp_path):
    """Mode, requires_grad, .grad, fused attention and RNG state are as before the hook."""
    callback = _callback()
    trainer, model = _fit(tiny_dataset_dir, tmp_path, callbacks=[callback], max_epochs=1)
    model.train()
    model.model.blocks[0].attn.fused_attn = True
    model.model.pos_embed.requires_grad_(False)
    grad = torch.ones_like(model.model.head.weight)
    model.model.head.weight.grad = grad
    rng = torch.get_rng_state(), np.random.get_state()[1].copy()
    trainer.state.stage = "validate"  # as inside fit's validation loop
    callback.on_validation_epoch_end(trainer, model)
    assert model.training and all(m.training for m in model.modules())
    assert model.model.blocks[0].attn.fused_attn is True
    assert not model.model.pos_embed.requires_grad and model.model.cls_token.requires_grad
    assert model.model.head.weight.grad is grad and model.model.cls_token.grad is None
    assert torch.equal(torch.get_rng_state(), rng[0]) and np.array_equal(np.random.get_state()[1], rng[1])


# --------------------------------------------------------------------------- resume
def test_resume_keeps_the_probe_set(tiny_dataset_dir, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    first = _callback(seed=1)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(tiny_dataset_dir, tmp_path, callbacks=[first, checkpoint], max_epochs=1, enable_checkpointing=True)
    data = tiny_datamodule(tiny_dataset_dir)
    data.setup("fit")
    assert stratified_order(data.val_dataset.labels, 8, seed=2) != first.sample_indices  # seed 2 picks others
    resumed = _callback(seed=2)
    _fit(tiny_dataset_dir, tmp_path, callbacks=[resumed, ModelCheckpoint(dirpath=tmp_path / "ckpt2")], max_epochs=2,
         ckpt_path=tmp_path / "ckpt" / "last.ckpt", enable_checkpointing=True)
    assert resumed.probe_indices == first.probe_indices
    assert resumed.sample_indices == first.sample_indices
    assert resumed.class_names == list(TINY_CLASSES)


def test_two_callbacks_keep_their_own_state(tiny_dataset_dir, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    a = ExplanationCallback(methods=["grad_rollout"], num_samples=2, perturbation_samples=0, seed=1)
    b = ExplanationCallback(methods=["rollout"], num_samples=2, perturbation_samples=0, seed=2)
    _fit(tiny_dataset_dir, tmp_path, callbacks=[a, b, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
         max_epochs=1, enable_checkpointing=True)
    assert a.sample_indices != b.sample_indices  # different seeds, different probe sets
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)["callbacks"]
    assert saved[a.state_key]["sample_indices"] == a.sample_indices
    assert saved[b.state_key]["sample_indices"] == b.sample_indices


# --------------------------------------------------------------------------- other loggers
def test_tensorboard_and_csv_get_images_and_scores(tiny_dataset_dir, tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoardLogger(tmp_path / "tb", name="run")
    csv_logger = CSVLogger(tmp_path / "csv", name="run")
    _fit(tiny_dataset_dir, tmp_path, callbacks=[_callback()], logger=[tb, csv_logger], max_epochs=1)

    events = EventAccumulator(tb.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for method in METHODS:
        assert len(events.Images(f"explain/{method}/maps")) == 1
        values = [e.value for e in events.Scalars(f"explain/{method}/pos_auc")]
        assert len(values) == 1 and all(0 <= v <= 90 for v in values)
    assert len(events.Images("explain/perturbation_curves")) == 1
    assert "explain/random/neg_auc" in tags["scalars"]

    with open(Path(csv_logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("explain/grad_rollout/pos_auc")]
    assert len(rows) == 1 and all(0 <= float(r["explain/transformer_attribution/neg_auc"]) <= 90 for r in rows)
    for epoch in (0,):
        folder = Path(csv_logger.log_dir) / "explain" / f"epoch={epoch:03d}"
        for name in (*METHODS, "perturbation_curves"):
            with Image.open(folder / f"{name}.png") as png:
                assert png.size[0] > 32 and png.size[1] > 32


def test_without_a_logger_pngs_go_under_the_root_dir(tiny_dataset_dir, tmp_path):
    _fit(tiny_dataset_dir, tmp_path, callbacks=[_callback(every_n_epochs=2)], max_epochs=2)
    assert sorted(p.name for p in (tmp_path / "explain").iterdir()) == ["epoch=001"]  # every 2nd epoch only
    assert {p.name for p in (tmp_path / "explain" / "epoch=001").iterdir()} == {
        "transformer_attribution.png", "grad_rollout.png", "perturbation_curves.png",
        "transformer_attribution.class_mean_maps.png", "grad_rollout.class_mean_maps.png",
    }


def test_offline_run_reader_names_a_file_that_is_not_a_run(tmp_path):
    bad = tmp_path / "run-x.wandb"
    bad.write_bytes(b"definitely not a run file")
    with pytest.raises(ValueError, match="run-x.wandb"):
        read_history(bad)
    with pytest.raises(FileNotFoundError, match="found 0"):
        read_history(tmp_path / "nothing")


# --------------------------------------------------------------------------- localisation: one rule with evaluate
@pytest.mark.parametrize("signed", ["positive", "raw"])
def test_localisation_of_a_signed_map_equals_evaluate(tiny_dataset_dir, tmp_path, signed):
    """cp_lrp maps are signed: the callback scores them as `explain.py evaluate --signed` does (issue 13)."""
    from vitlens.metrics import localization
    from vitlens.metrics.evaluate import evaluate_explanations

    callback = _callback(methods=["cp_lrp"], perturbation_samples=0, include_random=False, shortcut_alarm=False,
                         batch_size=64, signed=signed)
    _, model = _fit(tiny_dataset_dir, tmp_path, callbacks=[callback], max_epochs=1)
    data = tiny_datamodule(tiny_dataset_dir)
    data.setup("fit")
    indices = callback.sample_indices
    result = callback.last_result
    assert sorted(indices) == list(range(len(data.val_dataset)))  # every val image explained
    batch = torch.utils.data.default_collate([data.val_dataset[i] for i in indices])
    report = evaluate_explanations(model, [batch], ["cp_lrp"], data.mean, data.std, n_resamples=0, progress=False,
                                   signed=signed)
    scalars = result.scalars()
    for score in ("pointing_game", "relevance_on_object"):
        assert scalars[f"explain/cp_lrp/{score}"] == pytest.approx(report.methods["cp_lrp"][score], rel=1e-6), score
    # the maps are signed, and the rule matters for them
    from vitlens.relevance import explain_many
    maps = explain_many(model.eval(), batch["image"], ["cp_lrp"]).maps["cp_lrp"]
    assert (maps < 0).any()
    other = "raw" if signed == "positive" else "positive"
    on_object = localization(maps, batch["mask"].float(), signed=other)["relevance_on_object"]
    assert float(on_object.nanmean()) != pytest.approx(scalars["explain/cp_lrp/relevance_on_object"], rel=1e-3)
