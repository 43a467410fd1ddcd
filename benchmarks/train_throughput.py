"""Training throughput: our Lightning loop (ViTClassifier + Trainer) vs a plain PyTorch loop.

Same model, data (in-memory tensors through the same DataLoader), optimiser (AdamW with the
same layer-decay groups), lr schedule, loss, precision and batch size. The first
`--warmup` steps of each run are not timed. Runs alternate (plain, lightning, plain, ...)
`--repeats` times so a shared CPU's load hits both alike; the table shows the median of the
wall-clock images/s and of images per CPU-second of the process.

    python benchmarks/train_throughput.py                       # the default job's model, CPU
    python benchmarks/train_throughput.py --steps 60 --batch-size 64 --repeats 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import lightning as L
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, Dataset

from vitlens.models import ViTClassifier
from vitlens.models.optim import param_groups_layer_decay, warmup_cosine

REPO = Path(__file__).resolve().parents[1]


def job_model(config: Path) -> dict:
    """The model section of a train.py config (default: the default job's)."""
    model = yaml.safe_load(config.read_text())["model"]
    data = yaml.safe_load(config.read_text())["data"]
    return dict(backbone=model["backbone"], img_size=data["image_size"],
                backbone_kwargs=dict(model.get("backbone_kwargs") or {}))


class TensorDataset(Dataset):
    """In-memory images/labels in the DESIGN.md batch-dict form."""

    def __init__(self, n: int, num_classes: int, size: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, size, size, generator=g)
        self.labels = torch.randint(0, num_classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": self.labels[i], "index": torch.tensor(i)}


def make_model(args) -> ViTClassifier:
    torch.manual_seed(args.seed)
    return ViTClassifier(class_names=[f"c{i}" for i in range(args.num_classes)], lr=1e-3, weight_decay=0.05,
                         layer_decay=0.75, warmup_epochs=0.1, label_smoothing=0.1, **args.model)


def loader(args) -> DataLoader:
    data = TensorDataset(args.batch_size * args.steps, args.num_classes, args.model["img_size"])
    return DataLoader(data, batch_size=args.batch_size, shuffle=True, num_workers=0, drop_last=True)


def plain_loop(args) -> float:
    """images/s of a hand-written loop doing the same work."""
    module = make_model(args)
    model = module.model.train()
    groups = param_groups_layer_decay(model, lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    total = args.steps
    warm = round(0.1 * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup_steps=warm, total_steps=total))
    start = cpu_start = None
    for step, batch in enumerate(loader(args)):
        if step == args.warmup:
            start, cpu_start = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed"):
            logits = model(batch["image"])
        loss = F.cross_entropy(logits.float(), batch["label"], label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss.item()  # Lightning reads the loss for the progress bar / logs each step too
    images = (args.steps - args.warmup) * args.batch_size
    return images / (time.perf_counter() - start), images / (time.process_time() - cpu_start)


class _Timer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end = (time.perf_counter(), time.process_time())


def lightning_loop(args, root: str) -> float:
    """images/s of ViTClassifier under a Trainer with the default job's progress bar, lr monitor and a CSV logger."""
    from lightning.pytorch.callbacks import LearningRateMonitor, RichProgressBar
    from lightning.pytorch.loggers import CSVLogger

    module = make_model(args)
    timer = _Timer(args.warmup)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, precision=args.precision,
                        logger=CSVLogger(root), enable_checkpointing=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=50,
                        callbacks=[timer, LearningRateMonitor("step"), RichProgressBar()])
    trainer.fit(module, train_dataloaders=loader(args))
    images = (args.steps - args.warmup) * args.batch_size
    return images / (timer.end[0] - timer.start[0]), images / (timer.end[1] - timer.start[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=8, help="untimed first steps of each run")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-classes", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "toybirds.yaml",
                        help="train.py config whose model is measured")
    args = parser.parse_args()
    args.model = job_model(args.config)
    import tempfile

    names = ("plain PyTorch loop", "vitlens (Lightning)")
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as root:
        for r in range(args.repeats):
            for name, run in zip(names, (lambda: plain_loop(args), lambda: lightning_loop(args, root))):
                w, c = run()
                wall[name].append(w)
                cpu[name].append(c)
            print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(
                f"{n}: {wall[n][-1]:.1f} img/s wall, {cpu[n][-1]:.1f} img/CPU-s" for n in names), flush=True)
    print(f"\nmodel {args.model['backbone']} {args.model['backbone_kwargs']} at {args.model['img_size']} px, "
          f"batch {args.batch_size}, {args.precision}, {args.steps} steps ({args.warmup} untimed), "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print("img/CPU-s: images per second of this process's CPU time (all its threads); on a busy machine both "
          "columns are noisy (spinning OpenMP threads count as CPU time): compare runs on an idle one")
    base_wall, base_cpu = statistics.median(wall[names[0]]), statistics.median(cpu[names[0]])
    print(f"{'loop':<22} {'img/s wall':>11} {'vs plain':>9} {'img/CPU-s':>10} {'vs plain':>9}   wall runs")
    for name in names:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        runs = ", ".join(f"{v:.1f}" for v in wall[name])
        print(f"{name:<22} {w:>11.1f} {w / base_wall:>9.1%} {c:>10.1f} {c / base_cpu:>9.1%}   {runs}")


if __name__ == "__main__":
    main()
