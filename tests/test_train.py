"""train.py: the LightningCLI end to end (real subprocesses, real W&B offline runs, real files)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_CLASSES

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train.py"
sys.path.insert(0, str(REPO))
import train  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

SHIPPED = ["configs/toybirds.yaml", "configs/cub200_mae_vitb16.yaml", "configs/imagefolder_vit_small.yaml"]


def _tiny_config(tmp_path: Path, dataset: Path) -> Path:
    config = {
        "trainer": {"accelerator": "cpu", "max_epochs": 2, "log_every_n_steps": 1, "callbacks": []},
        "model": {"backbone": "vit_tiny_patch16_224",
                  "backbone_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
                  "lr": 3e-3, "warmup_epochs": 0.5},
        "data": {"path": str(dataset), "generate": None, "generate_options": None, "image_size": 32,
                 "batch_size": 8, "num_workers": 0, "persistent_workers": False},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(args: list[str], cwd: Path, expect_ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "NO_ALBUMENTATIONS_UPDATE": "1",
           "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, str(TRAIN), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def test_default_config_is_added_only_without_one():
    default = str(train.DEFAULT_CONFIG)
    assert train.with_default_config(["fit"]) == ["fit", "--config", default]
    assert train.with_default_config(["fit", "--trainer.max_steps", "3"]) == ["fit", "--config", default, "--trainer.max_steps", "3"]
    assert train.with_default_config(["test", "-c", "x.yaml"]) == ["test", "-c", "x.yaml"]
    assert train.with_default_config(["fit", "--config=x.yaml"]) == ["fit", "--config=x.yaml"]
    assert train.with_default_config(["--help"]) == ["--help"]


def _print_config(capsys, args: list[str]) -> dict:
    with pytest.raises(SystemExit) as done:
        train.main([*args, "--print_config"])
    assert done.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_defaults_to_toybirds_and_links_backbone(capsys):
    config = _print_config(capsys, ["fit"])
    assert config["data"]["path"] == "data/toybirds" and config["data"]["generate"] == "toybirds"
    assert config["model"]["backbone"] == "vit_tiny_patch16_224"
    assert config["seed_everything"] == 0
    assert config["trainer"]["logger"]["init_args"]["offline"] is True
    assert isinstance(config["trainer"]["callbacks"], list)  # a plain list others append to
    assert config["checkpoint"]["monitor"] == "val/acc" and config["checkpoint"]["save_last"] is True
    assert "backbone" not in config["data"]  # linked from model.backbone
    config = _print_config(capsys, ["fit", "--model.backbone", "deit_small_patch16_224", "--model.lr", "0.01"])
    assert config["model"]["backbone"] == "deit_small_patch16_224" and config["model"]["lr"] == 0.01


@pytest.mark.parametrize("path", SHIPPED)
def test_shipped_configs_parse(capsys, path):
    config = _print_config(capsys, ["fit", "-c", str(REPO / path)])
    assert config["model"]["backbone"].startswith(("vit_", "deit"))


def test_cub_config_is_the_mae_recipe(capsys):
    config = _print_config(capsys, ["fit", "-c", str(REPO / "configs/cub200_mae_vitb16.yaml")])
    model, data, trainer = config["model"], config["data"], config["trainer"]
    assert model["backbone"] == "vit_base_patch16_224.mae" and data["image_size"] == 224
    assert model["layer_decay"] == 0.65 and model["weight_decay"] == 0.05
    assert model["backbone_kwargs"] == {"drop_path_rate": 0.1, "global_pool": "avg"}
    assert (model["mixup_alpha"], model["cutmix_alpha"], model["label_smoothing"]) == (0.8, 1.0, 0.1)
    assert model["warmup_epochs"] == 5 and trainer["precision"] == "bf16-mixed"
    effective_batch = data["batch_size"] * trainer["accumulate_grad_batches"]
    assert model["lr"] == pytest.approx(5e-4 * effective_batch / 256)


def test_ddp_trainer_config_composes(capsys):
    config = _print_config(capsys, ["fit", "-c", str(REPO / "configs/toybirds.yaml"), "-c", str(REPO / "configs/trainer/ddp.yaml")])
    assert config["trainer"]["strategy"] == "ddp" and config["trainer"]["sync_batchnorm"] is False
    assert config["data"]["path"] == "data/toybirds"  # the rest of the job is unchanged


def test_fit_validate_and_class_mismatch_via_subprocess(tiny_dataset_dir, tmp_path):
    from vitlens.callbacks.wandb_offline import read_history
    from vitlens.models import load_classifier

    tiny = _tiny_config(tmp_path, tiny_dataset_dir)
    proc = _run(["fit", "-c", str(REPO / "configs/toybirds.yaml"), "-c", str(tiny), "--trainer.max_steps", "8"],
                cwd=tmp_path)
    # stdout is a pipe, not a terminal: whole progress lines, one per batch here (4 per epoch)
    lines = proc.stdout.splitlines()
    train_lines = [ln for ln in lines if ln.startswith("epoch ") and " batch " in ln]
    assert [ln.split("  ")[1] for ln in train_lines] == ["batch 1/4", "batch 2/4", "batch 3/4", "batch 4/4"] * 2
    assert all("img/s" in ln and "train/loss" in ln for ln in train_lines), train_lines
    val_lines = [ln for ln in lines if " validation " in ln]
    assert len(val_lines) == 2 and all("val/acc " in ln for ln in val_lines), val_lines

    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # W&B offline, under ./wandb
    run_id = runs[0].name.rsplit("-", 1)[-1]
    folder = tmp_path / "checkpoints" / run_id
    best = sorted(folder.glob("best-*.ckpt"))
    assert len(best) == 1 and (folder / "last.ckpt").is_file() and (folder / "config.yaml").is_file()
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 8 and saved["data"]["path"] == str(tiny_dataset_dir)

    history = read_history(runs[0])
    logged = {key for row in history for key in row}
    for key in ("train/loss", "val/acc", "val/acc_top5", "val/loss", f"val/acc_class/{TINY_CLASSES[0]}",
                "val/confusion_matrix", "lr-AdamW/00_embed/no_wd", "lr-AdamW/03_head/wd"):
        assert any(k.startswith(key) for k in logged), (key, sorted(logged))
    val_acc = [row["val/acc"] for row in history if "val/acc" in row]
    assert len(val_acc) == 2 and all(0.0 <= v <= 1.0 for v in val_acc)

    model = load_classifier(folder / "last.ckpt")
    assert model.class_names == TINY_CLASSES and model.hparams["img_size"] == 32
    assert torch.load(folder / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 8  # 2 epochs of 4 batches

    proc = _run(["validate", "-c", str(tiny), "--ckpt_path", str(best[0]), "--trainer.logger", "false"], cwd=tmp_path)
    assert "val/acc" in proc.stdout

    checkpoint = torch.load(best[0], map_location="cpu", weights_only=False)
    checkpoint["hyper_parameters"]["class_names"] = [*TINY_CLASSES[:3], "robin"]
    other = tmp_path / "other_classes.ckpt"
    torch.save(checkpoint, other)
    proc = _run(["test", "-c", str(tiny), "--ckpt_path", str(other), "--trainer.logger", "false"], cwd=tmp_path,
                expect_ok=False)
    assert proc.returncode != 0
    assert f"only in checkpoint: ['robin']; only in dataset: [{TINY_CLASSES[3]!r}]" in proc.stderr
    assert "other_classes.ckpt" in proc.stderr


@pytest.mark.slow
def test_ddp_fit_two_cpu_processes(tiny_dataset_dir, tmp_path):
    """configs/trainer/ddp.yaml for real: 2 processes, gloo; one W&B run, one checkpoint folder."""
    tiny = _tiny_config(tmp_path, tiny_dataset_dir)
    _run(["fit", "-c", str(REPO / "configs/toybirds.yaml"), "-c", str(tiny), "-c", str(REPO / "configs/trainer/ddp.yaml"),
          "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.max_steps", "4"], cwd=tmp_path)
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # only global rank 0 logs
    folders = list((tmp_path / "checkpoints").iterdir())
    assert len(folders) == 1 and folders[0].name == runs[0].name.rsplit("-", 1)[-1]
    checkpoint = torch.load(folders[0] / "last.ckpt", map_location="cpu", weights_only=False)
    # each process sees half of the 32 train images: 2 steps of 8 per epoch (4 in one process)
    assert checkpoint["global_step"] == 2 * (checkpoint["epoch"] + 1)


@pytest.mark.slow
def test_ddp_validation_counts_every_image_once(tiny_dataset_dir, tmp_path):
    """15 validation images on 2 processes: Lightning's DistributedSampler would pad to 16 and
    count one image twice; the data module's unpadded sampler gives the single-process value."""
    import csv
    import shutil

    data = tmp_path / "toybirds"
    shutil.copytree(tiny_dataset_dir, data)
    manifest = data / "manifest.csv"
    rows = manifest.read_text().splitlines()
    val_rows = [i for i, row in enumerate(rows) if ",val," in row]
    manifest.write_text("\n".join(r for i, r in enumerate(rows) if i != val_rows[-1]) + "\n")
    tiny = _tiny_config(tmp_path, data)
    _run(["fit", "-c", str(REPO / "configs/toybirds.yaml"), "-c", str(tiny), "--trainer.max_steps", "3",
          "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)], cwd=tmp_path)
    (ckpt,) = tmp_path.rglob("last.ckpt")

    def val_acc(*extra: str) -> float:
        out = tmp_path / f"csv{len(extra)}"
        _run(["validate", "-c", str(tiny), *extra, "--ckpt_path", str(ckpt),
              "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(out)],
             cwd=tmp_path)
        (metrics,) = out.rglob("metrics.csv")
        with open(metrics) as f:
            return float(next(row["val/acc"] for row in csv.DictReader(f) if row.get("val/acc")))

    single = val_acc()
    ddp = val_acc("-c", str(REPO / "configs/trainer/ddp.yaml"), "--trainer.devices", "2")
    assert single * 15 == pytest.approx(round(single * 15))  # 15 images were scored
    assert ddp == pytest.approx(single, abs=1e-6)


def test_last_checkpoint_is_the_final_epoch_even_when_not_the_best(tiny_dataset_dir, tmp_path):
    """Lightning 2.6 writes last.ckpt only beside a new top-k checkpoint; train.py keeps it current."""
    tiny = _tiny_config(tmp_path, tiny_dataset_dir)
    train.main(["fit", "-c", str(REPO / "configs/toybirds.yaml"), "-c", str(tiny), "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                "--trainer.logger.save_dir", str(tmp_path),
                "--model.lr", "0", "--model.min_lr", "0", "--trainer.max_steps", "8"])
    (folder,) = {path.parent for path in tmp_path.rglob("last.ckpt")}
    best = list(folder.glob("best-*.ckpt"))
    # with lr 0 the weights never change, so val/acc never improves after the first epoch
    assert len(best) == 1 and torch.load(best[0], map_location="cpu", weights_only=False)["global_step"] == 4
    assert torch.load(folder / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 8


def test_fit_without_a_logger(tiny_dataset_dir, tmp_path, capsys):
    """--trainer.logger false: the learning-rate monitor stands aside (Lightning's raises)."""
    tiny = _tiny_config(tmp_path, tiny_dataset_dir)
    train.main(["fit", "-c", str(REPO / "configs/toybirds.yaml"), "-c", str(tiny), "--trainer.logger", "false",
                "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "2"])
    assert "epoch 1/" in capsys.readouterr().out  # pytest's captured stdout is not a terminal
    assert list(tmp_path.rglob("last.ckpt"))


@pytest.mark.slow
def test_validate_uses_the_checkpoints_split(tiny_dataset_dir, tmp_path):
    """Issue 9 item 6: validate rebuilds the split the model was trained with (val_fraction,
    seed from the checkpoint), and an override that leaks training images into it is an error."""
    import shutil

    tree = tmp_path / "birds"
    for image in sorted((tiny_dataset_dir / "images" / "train").rglob("*.png")):
        (tree / image.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(image, tree / image.parent.name / image.name)
    tiny = _tiny_config(tmp_path, tree)
    _run(["fit", "-c", str(tiny), "--data.val_fraction", "0.5", "--data.seed", "3", "--trainer.max_steps", "2",
          "--trainer.logger", "false"], cwd=tmp_path)
    ckpt = next(tmp_path.rglob("last.ckpt"))
    proc = _run(["validate", "-c", str(tiny), "--ckpt_path", str(ckpt), "--trainer.logger", "false"], cwd=tmp_path)
    assert "data settings of last.ckpt: val_fraction=0.5, seed=3" in proc.stderr
    proc = _run(["validate", "-c", str(tiny), "--ckpt_path", str(ckpt), "--data.seed", "7", "--trainer.logger", "false"],
                cwd=tmp_path, expect_ok=False)
    assert proc.returncode == 2
    assert "data.seed=7 puts" in proc.stderr and "Traceback" not in proc.stderr
