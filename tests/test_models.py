"""vitlens.models: backbones, weight formats, layer decay, classifier round trip."""
from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from conftest import TINY_CLASSES, TINY_MODEL, tiny_datamodule
from vitlens.models import (
    CheckpointClassMismatchError,
    ViTClassifier,
    create_backbone,
    load_backbone_weights,
    load_classifier,
    param_groups_layer_decay,
)
from vitlens.models.optim import warmup_cosine

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def _tiny(num_classes=4, **overrides):
    return create_backbone("vit_tiny_patch16_224", num_classes, **{**SMALL, **overrides})


def _same_trunk(a, b, skip=("head.",)):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith(skip))


# ---------------------------------------------------------------- backbones
@pytest.mark.parametrize("name, kwargs, prefix_tokens", [
    ("vit_tiny_patch16_224", {}, 1),
    ("vit_base_patch16_224.mae", {"global_pool": "avg"}, 1),
    ("vit_small_patch14_reg4_dinov2", {"img_size": 28, "patch_size": 14}, 5),
    ("deit_tiny_distilled_patch16_224", {}, 2),
])
def test_create_backbone_families(name, kwargs, prefix_tokens):
    model = create_backbone(name, 3, **{**SMALL, **kwargs})
    assert model.num_prefix_tokens == prefix_tokens
    logits = model.eval()(torch.randn(2, 3, *model.patch_embed.img_size))
    assert logits.shape == (2, 3)


def test_timm_kwargs_pass_through():
    model = _tiny(drop_path_rate=0.1, global_pool="avg")
    assert len(model.blocks) == 2 and model.embed_dim == 32
    assert model.global_pool == "avg" and model.patch_embed.grid_size == (4, 4)
    assert model.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)


@pytest.mark.parametrize("name, needle", [
    ("resnet50", "not supported"),
    ("convnext_tiny", "vit_*"),
    ("vit_nonexistent_patch3", "not a timm model name"),
])
def test_unsupported_backbone_is_a_clear_error(name, needle):
    with pytest.raises(ValueError, match=needle) as err:
        create_backbone(name, 3)
    assert name in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- weight formats
def test_timm_state_dict_file_loads_trunk_and_reinitialises_head(tmp_path):
    torch.manual_seed(0)
    source = _tiny(num_classes=10)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    torch.manual_seed(1)
    target = create_backbone("vit_tiny_patch16_224", 4, weights=str(tmp_path / "w.pth"), **SMALL)
    assert _same_trunk(source, target)
    assert target.head.weight.shape == (4, 32)


def test_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    source = _tiny()
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    target = _tiny()
    assert load_backbone_weights(target, tmp_path / "w.safetensors") == "timm"
    assert _same_trunk(source, target)


def test_mae_pretraining_checkpoint_drops_decoder_and_uses_fc_norm(tmp_path):
    source = _tiny(num_classes=0)  # MAE encoder: no head, final norm
    state = {k: v for k, v in source.state_dict().items()}
    state["mask_token"] = torch.zeros(1, 1, 16)
    state["decoder_embed.weight"] = torch.zeros(16, 32)
    state["decoder_blocks.0.attn.qkv.weight"] = torch.zeros(48, 16)
    state["decoder_pred.weight"] = torch.zeros(192, 16)
    torch.save({"model": state, "epoch": 799}, tmp_path / "mae_pretrain.pth")
    target = _tiny(global_pool="avg")  # MAE fine-tuning: avg pooling, fc_norm
    fc_norm_before = target.fc_norm.weight.clone()
    assert load_backbone_weights(target, tmp_path / "mae_pretrain.pth") == "mae"
    assert _same_trunk(source, target, skip=("head.", "fc_norm.", "norm."))
    assert torch.equal(target.fc_norm.weight, fc_norm_before)


def test_position_embedding_resized_to_another_image_size(tmp_path):
    from timm.layers import resample_abs_pos_embed

    source = _tiny()  # 32 px -> 4x4 grid
    torch.save(source.state_dict(), tmp_path / "w.pth")
    target = _tiny(img_size=48)  # 6x6 grid
    load_backbone_weights(target, tmp_path / "w.pth")
    assert target.pos_embed.shape == (1, 1 + 36, 32)
    expected = resample_abs_pos_embed(source.pos_embed.detach(), new_size=[6, 6], num_prefix_tokens=1)
    torch.testing.assert_close(target.pos_embed.detach(), expected)
    torch.testing.assert_close(target.pos_embed[:, 0], source.pos_embed[:, 0])  # class token position kept
    assert target.eval()(torch.randn(1, 3, 48, 48)).shape == (1, 4)


def test_mismatched_keys_error_lists_them(tmp_path):
    state = _tiny().state_dict()
    state.pop("blocks.1.mlp.fc2.weight")
    state["blocks.5.attn.qkv.weight"] = torch.zeros(96, 32)
    state["blocks.0.norm1.weight"] = torch.zeros(64)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError) as err:
        load_backbone_weights(_tiny(), tmp_path / "broken.pth")
    message = str(err.value)
    assert "\n" not in message and "broken.pth" in message
    assert "missing keys ['blocks.1.mlp.fc2.weight']" in message
    assert "unexpected keys ['blocks.5.attn.qkv.weight']" in message
    assert "blocks.0.norm1.weight (64,) vs model (32,)" in message


def test_initial_weights_are_loaded_when_fitting_starts(tiny_dataset_dir, tmp_path):
    source = _tiny(num_classes=10)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model = ViTClassifier(class_names=TINY_CLASSES, weights=str(tmp_path / "w.pth"), lr=0.0, **TINY_MODEL)
    assert not _same_trunk(source, model.model)  # nothing read at construction
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(model, datamodule=tiny_datamodule(tiny_dataset_dir))
    assert _same_trunk(source, model.model)  # lr 0: exactly the file's weights


def test_unreadable_and_missing_weight_files(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read weights file .*junk.pth"):
        load_backbone_weights(_tiny(), tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_backbone_weights(_tiny(), tmp_path / "nowhere.pth")


def test_our_checkpoint_as_weights(tiny_classifier_checkpoint):
    trained = load_classifier(tiny_classifier_checkpoint)
    same = ViTClassifier(class_names=TINY_CLASSES, weights=str(tiny_classifier_checkpoint), **TINY_MODEL)
    same.load_initial_weights()
    assert _same_trunk(trained.model, same.model, skip=())  # same classes: head kept too

    other = [*TINY_CLASSES[:2], "hexagon", *TINY_CLASSES[3:]]
    mismatched = ViTClassifier(class_names=other, weights=str(tiny_classifier_checkpoint), **TINY_MODEL)
    with pytest.raises(CheckpointClassMismatchError) as err:
        mismatched.load_initial_weights()
    assert f"only in checkpoint: [{TINY_CLASSES[2]!r}]; only in dataset: ['hexagon']" in str(err.value)
    assert str(tiny_classifier_checkpoint) in str(err.value)

    reset = ViTClassifier(class_names=other, weights=str(tiny_classifier_checkpoint), reset_head=True, **TINY_MODEL)
    reset.load_initial_weights()
    assert _same_trunk(trained.model, reset.model) and not torch.equal(trained.model.head.weight, reset.model.head.weight)


# ---------------------------------------------------------------- layer decay
def test_layer_decay_parameter_groups():
    model = _tiny(num_classes=4, depth=3, global_pool="avg")
    groups = param_groups_layer_decay(model, lr=1.0, weight_decay=0.05, layer_decay=0.65)
    where = {name: g for g in groups for name in g["param_names"]}
    assert set(where) == {n for n, _ in model.named_parameters()}
    L_ = 3
    expected_layer = {
        "cls_token": 0, "pos_embed": 0, "patch_embed.proj.weight": 0, "patch_embed.proj.bias": 0,
        "blocks.0.attn.qkv.weight": 1, "blocks.1.mlp.fc1.bias": 2, "blocks.2.norm2.weight": 3,
        "fc_norm.weight": 4, "head.weight": 4, "head.bias": 4,
    }
    for name, layer in expected_layer.items():
        assert where[name]["layer_id"] == layer, name
        assert where[name]["lr"] == pytest.approx(0.65 ** (L_ + 1 - layer)), name
    no_decay = {"cls_token", "pos_embed", "patch_embed.proj.bias", "blocks.0.attn.qkv.bias",
                "blocks.2.norm2.weight", "fc_norm.weight", "head.bias"}
    decay = {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc1.weight", "head.weight"}
    assert all(where[n]["weight_decay"] == 0.0 for n in no_decay)
    assert all(where[n]["weight_decay"] == 0.05 for n in decay)
    assert len(groups) == 2 * (L_ + 2)  # (layer id, decay?) pairs
    dist = create_backbone("deit_tiny_distilled_patch16_224", 4, **SMALL)
    where = {n: g for g in param_groups_layer_decay(dist, lr=1.0, weight_decay=0.05, layer_decay=0.5) for n in g["param_names"]}
    assert where["dist_token"]["layer_id"] == 0 and where["dist_token"]["weight_decay"] == 0.0
    assert where["head_dist.weight"]["layer_id"] == 3 and where["head_dist.weight"]["lr"] == 1.0


def test_warmup_then_cosine_schedule():
    values = [warmup_cosine(s, warmup_steps=4, total_steps=14, min_ratio=0.1) for s in range(15)]
    assert values[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert values[4] == pytest.approx(1.0)
    assert values[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert values[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[4:], values[5:]))


# ---------------------------------------------------------------- classifier
def test_hparams_rebuild_without_data(tiny_classifier_checkpoint):
    model = ViTClassifier.load_from_checkpoint(tiny_classifier_checkpoint, map_location="cpu")
    hp = model.hparams
    assert hp["class_names"] == TINY_CLASSES and model.class_names == TINY_CLASSES
    assert hp["backbone"] == "vit_tiny_patch16_224" and hp["img_size"] == 32
    assert len(hp["mean"]) == 3 and len(hp["std"]) == 3
    assert model.model.patch_embed.grid_size == (4, 4)


def test_fit_and_checkpoint_round_trip_same_logits(tiny_dataset_dir, tmp_path):
    L.seed_everything(0, verbose=False)
    model = ViTClassifier(class_names=TINY_CLASSES, lr=1e-2, layer_decay=0.8, warmup_epochs=0.5,
                          label_smoothing=0.1, mixup_alpha=0.8, cutmix_alpha=1.0, **TINY_MODEL)
    data = tiny_datamodule(tiny_dataset_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, enable_checkpointing=False)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 8
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    for key in ("train/loss", "val/loss", "val/acc", "val/acc_top5", f"val/acc_class/{TINY_CLASSES[0]}"):
        assert key in trainer.callback_metrics, key
    assert 0.0 <= float(trainer.callback_metrics["val/acc"]) <= 1.0
    assert float(trainer.callback_metrics["val/acc_top5"]) == 1.0  # 4 classes: top-5 is all of them
    pngs = sorted((tmp_path / "confusion_matrix").glob("val_epoch*.png"))  # no logger: PNGs in the root dir
    assert len(pngs) == 2

    path = tmp_path / "round_trip.ckpt"
    trainer.save_checkpoint(path)
    reloaded = load_classifier(path)
    images = next(iter(data.val_dataloader()))["image"]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), model(images), rtol=0, atol=0)
    assert reloaded.hparams["mixup_alpha"] == 0.8 and not reloaded.training


def test_confusion_matrix_counts_and_logging_to_tensorboard(tiny_classifier_checkpoint, tiny_dataset_dir, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    model = load_classifier(tiny_classifier_checkpoint)
    data = tiny_datamodule(tiny_dataset_dir)
    captured = {}
    original = model._log_confusion_matrix
    model._log_confusion_matrix = lambda stage, confusion: (captured.setdefault(stage, confusion.clone()), original(stage, confusion))
    trainer = L.Trainer(accelerator="cpu", logger=TensorBoardLogger(tmp_path), enable_progress_bar=False,
                        enable_model_summary=False)
    result = trainer.validate(model, datamodule=data, verbose=False)[0]
    confusion = captured["val"]
    assert confusion.shape == (4, 4) and int(confusion.sum()) == 16
    assert result["val/acc"] == pytest.approx(float(confusion.diag().sum() / 16))
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0})
    acc.Reload()
    assert "val/confusion_matrix" in acc.Tags()["images"]


def test_load_classifier_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*missing.ckpt"):
        load_classifier(tmp_path / "missing.ckpt")
    (tmp_path / "garbage.ckpt").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="cannot read weights file .*garbage.ckpt"):
        load_classifier(tmp_path / "garbage.ckpt")
    torch.save(_tiny().state_dict(), tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match="foreign.ckpt is not a vitlens checkpoint"):
        load_classifier(tmp_path / "foreign.ckpt")


def test_checkpoint_classes_must_match_the_dataset(tiny_classifier_checkpoint, tiny_dataset_dir, tmp_path):
    checkpoint = torch.load(tiny_classifier_checkpoint, map_location="cpu", weights_only=False)
    checkpoint["hyper_parameters"]["class_names"] = [*TINY_CLASSES[:3], "star"]
    other = tmp_path / "other_classes.ckpt"
    torch.save(checkpoint, other)
    model = ViTClassifier(class_names=TINY_CLASSES, **TINY_MODEL)
    data = tiny_datamodule(tiny_dataset_dir)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(CheckpointClassMismatchError) as err:
        trainer.validate(model, datamodule=data, ckpt_path=str(other), verbose=False)
    message = str(err.value)
    assert f"only in checkpoint: ['star']; only in dataset: [{TINY_CLASSES[3]!r}]" in message
    assert "other_classes.ckpt" in message and "\n" not in message

    wrong_model = ViTClassifier(class_names=[*TINY_CLASSES[:3], "star"], **TINY_MODEL)
    with pytest.raises(CheckpointClassMismatchError, match="the model \\(class_names\\) has 4 classes"):
        trainer.validate(wrong_model, datamodule=data, verbose=False)


SWIN_TINY = dict(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(1, 2), num_heads=(1, 2))


@pytest.mark.parametrize("name, kwargs", [
    ("vit_tiny_patch16_224", {**SMALL, "depth": 3}),
    ("swin_tiny_patch4_window7_224", SWIN_TINY),
])
def test_layer_decay_follows_timms_group_matcher(name, kwargs):
    import timm
    from timm.models import group_parameters

    model = timm.create_model(name, num_classes=4, **kwargs)
    timm_ids = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    last = max(timm_ids.values())
    groups = param_groups_layer_decay(model, lr=2.0, weight_decay=0.05, layer_decay=0.5)
    where = {n: g for g in groups for n in g["param_names"]}
    assert set(where) == {n for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():
        assert where[n]["layer_id"] == timm_ids[n], n
        assert where[n]["lr"] == pytest.approx(2.0 * 0.5 ** (last - timm_ids[n])), n
        assert where[n]["weight_decay"] == (0.0 if p.ndim <= 1 or "pos_embed" in n or "token" in n
                                            or "relative_position_bias_table" in n else 0.05), n
    # the blocks are spread over their own layers, not lumped with the head
    block_params = [n for n in where if n.startswith(("blocks.", "layers."))]
    assert {where[n]["layer_id"] for n in block_params} == set(range(1, last))
    assert all(where[n]["lr"] == 2.0 for n in where if n.startswith("head"))
    names = [g["name"] for g in groups]
    assert len(set(names)) == len(names) and names[0] == "00_embed/no_wd" and names[-1] == f"{last:02d}_head/wd"
    if name.startswith("swin"):
        assert where["layers.0.blocks.0.attn.qkv.weight"]["name"] == "01_layers.0.blocks.0/wd"
        assert where["layers.1.downsample.reduction.weight"]["layer_id"] == where["layers.1.blocks.0.mlp.fc1.weight"]["layer_id"]
        assert where["layers.1.blocks.1.mlp.fc1.weight"]["name"] == "03_layers.1.blocks.1/wd"
    else:
        assert where["blocks.1.mlp.fc1.weight"]["name"] == "02_blocks.1/wd"


def test_layer_decay_group_names_reach_the_lr_monitor(tiny_dataset_dir, tmp_path):
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    model = ViTClassifier(class_names=TINY_CLASSES, lr=1e-2, layer_decay=0.5, **TINY_MODEL)
    monitor = LearningRateMonitor(logging_interval="step")
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=CSVLogger(tmp_path), callbacks=[monitor],
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0)
    trainer.fit(model, datamodule=tiny_datamodule(tiny_dataset_dir))
    keys = set(monitor.lrs)
    depth = len(model.model.blocks)
    assert "lr-AdamW/00_embed/wd" in keys and f"lr-AdamW/{depth + 1:02d}_head/wd" in keys
    assert "lr-AdamW/01_blocks.0/no_wd" in keys
