"""Cost of the ExplanationCallback: epoch time with and without it, in one run.

Two fits of the same seeded job, one plain and one with ``ExplanationCallback`` (the
settings of the shipped config: configs/toybirds.yaml on CPU, configs/cub200_mae_vitb16.yaml in
GPU mode, unless overridden on the command line); per epoch it times the whole training epoch (train + validation +
callbacks) and, in the second fit, the time spent inside the callback. The table shows both
columns and the overhead = callback time / plain epoch time (target: at most 10% on the
default toy-birds CPU job, at most 3% for ViT-B/16 on a CUB-sized epoch on a GPU).

    python benchmarks/callback_overhead.py                     # default toy-birds job (configs/toybirds.yaml), CPU
    python benchmarks/callback_overhead.py --epochs 3
    python benchmarks/callback_overhead.py --model vit_base_patch16_224 --device cuda   # CUB-sized, bf16, GPU

CPU mode uses the shipped config's model and data (toy birds, generated under --data-dir on
first use). GPU mode uses ViT-B/16 at 224 px (random init: speed does not depend on the
weights) in bf16-mixed on a synthetic CUB-sized set (5,994 training and 5,794 validation
images, 200 classes, object boxes), batch 64, as configs/cub200_mae_vitb16.yaml trains.
The first epoch of each fit is a warm-up and is left out of the medians when --epochs > 1.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from vitlens.callbacks import ExplanationCallback  # noqa: E402
from vitlens.models import ViTClassifier  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _clocks():
    """(wall seconds, CPU seconds of this process: all its threads, not the DataLoader workers)."""
    return time.perf_counter(), time.process_time()


class EpochTimer(L.Callback):
    """Wall and main-process CPU time of each training epoch (with its validation and the other callbacks)."""

    def __init__(self):
        self.times: list[tuple[float, float]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        _sync(pl_module)
        self._start = _clocks()

    def on_train_epoch_end(self, trainer, pl_module):
        _sync(pl_module)
        self.times.append(tuple(b - a for a, b in zip(self._start, _clocks())))


class TimedExplanationCallback(ExplanationCallback):
    """The real callback, with the wall and CPU time spent in its epoch-end hook recorded."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.times: list[tuple[float, float]] = []

    def on_validation_epoch_end(self, trainer, pl_module):
        _sync(pl_module)
        start = _clocks()
        super().on_validation_epoch_end(trainer, pl_module)
        _sync(pl_module)
        if not trainer.sanity_checking:
            self.times.append(tuple(b - a for a, b in zip(start, _clocks())))


def _sync(pl_module):
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)


# ------------------------------------------------------------------------------ CPU: the default job
def toybirds_job(args):
    from vitlens.data import ImageDataModule

    config = yaml.safe_load((ROOT / "configs" / "toybirds.yaml").read_text())
    data_cfg = dict(config["data"])
    data_cfg["path"] = str(args.data_dir)
    model_cfg = dict(config["model"])

    def make():
        data = ImageDataModule(**data_cfg, backbone=model_cfg["backbone"])
        data.prepare_data()
        model = ViTClassifier(class_names=data.class_names, img_size=data.image_size, **model_cfg)
        return model, data

    trainer_kw = dict(precision=config["trainer"].get("precision", "32-true"))
    return make, trainer_kw, config.get("seed_everything", 0), shipped_callback_options(config)


def shipped_callback_options(config) -> dict:
    """init_args of the ExplanationCallback in a shipped config (what users get by default)."""
    for entry in config["trainer"].get("callbacks") or []:
        if entry.get("class_path", "").endswith("ExplanationCallback"):
            return dict(entry.get("init_args") or {})
    return {}


# ------------------------------------------------------------------------------ GPU: ViT-B/16, CUB-sized
class SyntheticBirds(Dataset):
    """CUB-sized stand-in: a pool of seeded random images reused by index, with a box per image."""

    def __init__(self, n: int, num_classes: int, size: int, seed: int, pool: int = 256):
        g = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(pool, 3, size, size, generator=g)
        self.labels = torch.randint(0, num_classes, (n,), generator=g)
        corner = torch.randint(0, size // 2, (n, 2), generator=g).float()
        self.boxes = torch.cat([corner, corner + size // 2], dim=1)
        self.class_names = [f"species_{i:03d}" for i in range(num_classes)]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.pool[i % len(self.pool)], "label": self.labels[i], "index": torch.tensor(i),
                "box": self.boxes[i], "has_box": torch.tensor(True)}


class SyntheticData(L.LightningDataModule):
    def __init__(self, size: int, batch_size: int, workers: int):
        super().__init__()
        self.size, self.batch_size, self.workers = size, batch_size, workers
        self.class_names = [f"species_{i:03d}" for i in range(200)]

    def setup(self, stage=None):
        self.train_dataset = SyntheticBirds(5994, 200, self.size, seed=0)
        self.val_dataset = SyntheticBirds(5794, 200, self.size, seed=1)

    def train_dataloader(self):
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.workers, pin_memory=True, persistent_workers=self.workers > 0)

    def val_dataloader(self):
        return DataLoader(self.val_dataset, batch_size=self.batch_size, num_workers=self.workers, pin_memory=True,
                          persistent_workers=self.workers > 0)


def vit_job(args):
    def make():
        data = SyntheticData(224, args.batch_size or 64, workers=4)
        model = ViTClassifier(backbone=args.model, class_names=data.class_names, img_size=224, lr=1e-3,
                              layer_decay=0.65, warmup_epochs=0.1)
        return model, data

    config = yaml.safe_load((ROOT / "configs" / "cub200_mae_vitb16.yaml").read_text())
    return make, dict(precision="bf16-mixed"), 0, shipped_callback_options(config)


# ------------------------------------------------------------------------------ run
def fit(make, trainer_kw, seed, args, callback):
    L.seed_everything(seed, verbose=False)
    model, data = make()
    timer = EpochTimer()
    trainer = L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, max_epochs=args.epochs, logger=False,
        callbacks=[timer] + ([callback] if callback else []), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_train_batches=_limit(args.limit_train_batches),
        limit_val_batches=_limit(args.limit_val_batches),
        default_root_dir=str(args.out), **trainer_kw,
    )
    trainer.fit(model, datamodule=data)
    return timer.times


def _limit(value):
    """Lightning reads a float as a fraction and an int as a batch count."""
    return int(value) if value is not None and value > 1 else value


def median(times, skip_first, which):
    times = times[1:] if skip_first and len(times) > 1 else times
    return statistics.median(t[which] for t in times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="timm name; default: the toy-birds config's model (CPU job)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--limit-train-batches", type=float, default=None, help="fraction or number of training batches")
    p.add_argument("--limit-val-batches", type=float, default=None, help="fraction or number of validation batches")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--data-dir", type=Path, default=ROOT / "data" / "toybirds")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "callback_overhead")
    p.add_argument("--methods", nargs="+", default=None, help="callback methods (default: the callback's default)")
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--perturbation-samples", type=int, default=None)
    p.add_argument("--precision", default=None, help="explain precision (e.g. bf16 on a GPU)")
    args = p.parse_args()
    torch.set_float32_matmul_precision("high")

    make, trainer_kw, seed, shipped = vit_job(args) if args.model else toybirds_job(args)
    options = shipped | {k: v for k, v in dict(methods=args.methods, num_samples=args.num_samples,
                                     perturbation_samples=args.perturbation_samples,
                                     precision=args.precision).items() if v is not None}
    callback = TimedExplanationCallback(strict=True, **options)

    plain = fit(make, trainer_kw, seed, args, None)
    explained = fit(make, trainer_kw, seed, args, callback)
    skip = args.epochs > 1
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    settings = dict(methods=callback.methods, num_samples=callback.num_samples,
                    perturbation_samples=callback.perturbation_samples, precision=callback.precision)
    print(f"\nExplanationCallback overhead: {args.model or 'toy-birds default job'} on {device}, "
          f"{args.epochs} epoch(s) per fit, callback {settings}")
    print(f"{'':32s}{'wall s / epoch':>16s}{'CPU s / epoch':>16s}")
    rows = {}
    for which, clock in ((0, "wall"), (1, "cpu")):
        rows[clock] = (median(plain, skip, which), median(explained, skip, which), median(callback.times, skip, which),
                       # within the same epoch of the same fit: robust to a load that changes between the fits
                       statistics.median(c[which] / (e[which] - c[which]) for e, c in
                                         (list(zip(explained, callback.times))[1:] if skip else zip(explained, callback.times))))
    for i, name in enumerate(("epoch without callback", "epoch with callback", "inside the callback")):
        print(f"{name:32s}{rows['wall'][i]:16.2f}{rows['cpu'][i]:16.2f}")
    for label, fn in (("overhead (callback / plain)", lambda r: r[2] / r[0]),
                      ("overhead (epoch difference)", lambda r: (r[1] - r[0]) / r[0]),
                      ("callback / rest of its epoch", lambda r: r[3])):
        print(f"{label:32s}{100 * fn(rows['wall']):15.1f}%{100 * fn(rows['cpu']):15.1f}%")
    print("The last row compares the callback with the rest of the same epoch (same fit, same minute): on a shared")
    print("machine, where the load changes between the two fits, it is the figure to quote.")
    print("CPU time is this process's (all its threads), without DataLoader workers: on CPU that makes the CPU")
    print("overhead an upper bound. Per-epoch (wall, CPU) seconds:")
    print(f"  plain {[(round(w, 1), round(c, 1)) for w, c in plain]}")
    print(f"  with callback {[(round(w, 1), round(c, 1)) for w, c in explained]}")
    print(f"  inside callback {[(round(w, 1), round(c, 1)) for w, c in callback.times]}")


if __name__ == "__main__":
    main()
