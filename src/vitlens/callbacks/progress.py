"""Progress for logs that are not a terminal (SLURM output, CI, ``nohup``, ``| tee``).

Rich and tqdm bars redraw one line in place: in a file they print nothing useful (Rich) or
one ever-growing line of carriage returns (tqdm). ``LineProgress`` prints whole lines instead:
a few per training epoch (batch, images/s, loss, time left in the epoch) and one per
validation with its metrics. ``progress_bar()`` picks Rich on a terminal and this elsewhere.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.trainer.states import TrainerFn


def progress_bar(stream=None) -> ProgressBar:
    """``RichProgressBar`` when ``stream`` (default stdout) is a terminal, else ``LineProgress``."""
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return RichProgressBar() if isatty is not None and isatty() else LineProgress(stream=stream)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class LineProgress(ProgressBar):
    """Whole-line progress, ``lines_per_epoch`` training lines per epoch (at evenly spaced
    batches, by count, never by clock) and one line per validation with the scalar ``val*``
    metrics (not per-class ones). Rank 0 only.

        epoch 1/12  batch 15/37  148.9 img/s  epoch left 0:09  train/loss 1.82
        epoch 1/12 validation  val/acc 0.5521  val/acc_top5 0.9583  val/loss 1.306
    """

    def __init__(self, lines_per_epoch: int = 10, stream=None):
        super().__init__()
        if lines_per_epoch < 1:
            raise ValueError(f"LineProgress: lines_per_epoch must be >= 1, got {lines_per_epoch}")
        self.lines_per_epoch = lines_per_epoch
        self._stream = stream
        self._enabled = True
        self._epoch_start = 0.0
        self._samples = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._enabled:
            print(*args, file=self._stream or sys.stdout, flush=True, **kwargs)

    def _epochs(self, trainer: Trainer) -> str:
        return f"{trainer.current_epoch + 1}/{trainer.max_epochs}" if trainer.max_epochs not in (None, -1) \
            else str(trainer.current_epoch + 1)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_start = time.perf_counter()
        self._samples = 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if not self._enabled:
            return
        self._samples += _batch_size(batch)
        total = self.total_train_batches
        done = batch_idx + 1
        if math.isinf(total) or total <= 0:
            every = 50
            due = done % every == 0
        else:
            total = int(total)
            marks = {max(1, round(total * k / self.lines_per_epoch)) for k in range(1, self.lines_per_epoch + 1)}
            due = done in marks
        if not due:
            return
        elapsed = time.perf_counter() - self._epoch_start
        parts = [f"epoch {self._epochs(trainer)}", f"batch {done}/{total if not math.isinf(total) else '?'}"]
        if elapsed > 0:
            parts.append(f"{self._samples / elapsed:.1f} img/s")
            if not math.isinf(total) and done < total:
                parts.append(f"epoch left {_duration(elapsed / done * (total - done))}")
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        parts += [f"{k} {_fmt(v)}" for k, v in metrics.items() if not k.startswith("val")]
        self.print("  ".join(parts))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._enabled or trainer.sanity_checking:
            return
        # scalar validation metrics, not the per-class ones (200 of them on CUB)
        metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val") and k.count("/") <= 1}
        fitting = trainer.state.fn == TrainerFn.FITTING
        parts = [f"epoch {self._epochs(trainer)} validation" if fitting else "validation"]
        parts += [f"{k} {_fmt(float(v))}" for k, v in sorted(metrics.items()) if getattr(v, "numel", lambda: 1)() == 1]
        self.print("  ".join(parts))


def _batch_size(batch) -> int:
    if isinstance(batch, dict):
        batch = batch.get("image", next(iter(batch.values()), None))
    elif isinstance(batch, (list, tuple)) and batch:
        batch = batch[0]
    shape = getattr(batch, "shape", None)
    return int(shape[0]) if shape else 0
