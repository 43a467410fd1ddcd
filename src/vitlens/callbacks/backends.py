"""One small back-end per logger: what the ExplanationCallback writes where.

Each back-end takes the typed :class:`~vitlens.callbacks.result.EpochResult` of an explained
epoch (``log``), the shortcut alarms of that epoch (``alarm``) and the end of fitting
(``finish``). :func:`backend_for` picks one per Lightning logger; with no logger at all the
callback uses :class:`FilesBackend` under ``trainer.default_root_dir``. A new logger (MLflow)
is one class here.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vitlens.callbacks.result import EpochResult
from vitlens.metrics.shortcut import ShortcutAlarm, ShortcutEvent
from vitlens.relevance.display import (
    caption,
    colorize,
    contact_sheet,
    figure_to_array,
    plot_perturbation_curves,
    save_png,
    side_by_side,
    upscale,
)

__all__ = ["Backend", "WandbBackend", "TensorBoardBackend", "CSVBackend", "FilesBackend", "backend_for",
           "class_mean_map_tiles", "ALARM_COLUMNS"]

ALARM_COLUMNS = ["epoch", "kind", "signal", "method", "class", "value", "threshold", "region", "box", "message"]


# ---------------------------------------------------------------------------- pictures shared by back-ends
def _caption(result: EpochResult, i: int, method: str, *, both: bool = True) -> str:
    label, prediction = result.label[i], result.prediction[i]
    text = (f"#{result.index[i]} true: {result.name(label)} | predicted: {result.name(prediction)}"
            f" ({result.probability[i]:.2f})")
    if both and i in result.overlay_predicted.get(method, {}):
        text += f" | left: map of {result.name(label)}, right: map of {result.name(prediction)}"
    return text


def _panels(result: EpochResult, method: str) -> list[np.ndarray]:
    """One picture per probe sample: the true class's overlay, beside the predicted one's if they differ."""
    panels = []
    for i, true_overlay in enumerate(result.overlay[method]):
        other = result.overlay_predicted[method].get(i)
        panels.append(true_overlay if other is None else side_by_side([true_overlay, other]))
    return panels


def _sheet(result: EpochResult, method: str) -> np.ndarray:
    """All probe samples of one method in one captioned picture."""
    tiles = []
    for i, panel in enumerate(_panels(result, method)):
        text = f"{result.name(result.label[i])} -> {result.name(result.prediction[i])} {result.probability[i]:.2f}"
        tiles.append(caption(panel, text))
    return contact_sheet(tiles)


def class_mean_map_tiles(result: EpochResult, method: str, *, min_size: int = 96) -> list[tuple[np.ndarray, str]]:
    """Per class: its mean map (colour, each scaled to its own maximum) and a caption with the ratio and region."""
    signals = result.signals.get(method)
    if signals is None:
        return []
    position = signals.position
    tiles = []
    for c, name in enumerate(result.class_labels()):
        if position.counts[c] == 0:
            continue
        m = position.mean_maps[c].float()
        m = (m / m.max()).clamp(0, 1) if float(m.max()) > 0 else m
        tile = upscale(colorize(m[None].numpy())[0], min_size)
        tiles.append((tile, f"{name}: {position.lift[c]:.1f}x others, {position.region[c]} (n={position.counts[c]})"))
    return tiles


def _mean_map_sheet(result: EpochResult, method: str) -> np.ndarray | None:
    tiles = class_mean_map_tiles(result, method)
    if not tiles:
        return None
    return contact_sheet([caption(t, f"{text.split(':')[0][:14]} {text.split(': ')[1].split(' ')[0]}") for t, text in tiles])


def _alarm_rows(events: Sequence[ShortcutEvent]) -> list[list[Any]]:
    return [[e.epoch, e.kind, e.signal, e.method, e.class_name, float(e.value), float(e.threshold), e.region,
             json.dumps(list(e.box)) if e.box else "", e.message()] for e in events]


def _write_alarms_csv(path: Path, events: Sequence[ShortcutEvent]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(ALARM_COLUMNS)
        writer.writerows(_alarm_rows(events))


def _write_pngs(folder: Path, result: EpochResult) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for method in result.methods:
        save_png(_sheet(result, method), folder / f"{method}.png")
        sheet = _mean_map_sheet(result, method)
        if sheet is not None:
            save_png(sheet, folder / f"{method}.class_mean_maps.png")
    if result.perturbation:
        plot_perturbation_curves(result.perturbation, folder / "perturbation_curves.png")


# ---------------------------------------------------------------------------- back-ends
class Backend:
    """Does nothing; the base of every back-end."""

    def log(self, result: EpochResult, scalars: dict[str, float]) -> None:  # noqa: D102
        pass

    def alarm(self, events: Sequence[ShortcutEvent], result: EpochResult) -> None:  # noqa: D102
        pass

    def finish(self, alarm: ShortcutAlarm) -> None:  # noqa: D102
        pass


class WandbBackend(Backend):
    """Images, an incremental table, scalars, a line plot, per-class mean maps; alarms as ``run.alert``
    plus the run's summary and a ``shortcut/alarms`` table (both survive ``wandb sync``)."""

    def __init__(self, logger, *, log_table: bool = True) -> None:
        self.logger = logger
        self.log_table = log_table
        self._table = None
        self._alarms: list[list[Any]] = []
        self._pending = None

    def log(self, result, scalars):
        import wandb

        payload: dict[str, Any] = dict(scalars)
        payload["epoch"] = result.epoch
        for method in result.methods:  # same-size images per key, as the W&B UI wants
            payload[f"explain/{method}/maps"] = [
                wandb.Image(tile, caption=_caption(result, i, method, both=False))
                for i, tile in enumerate(result.overlay[method])
            ]
            predicted = result.overlay_predicted[method]
            if predicted:
                payload[f"explain/{method}/maps_predicted"] = [
                    wandb.Image(tile, caption=_caption(result, i, method, both=False) + " | map of the predicted class")
                    for i, tile in sorted(predicted.items())
                ]
            tiles = class_mean_map_tiles(result, method)
            if tiles:
                payload[f"shortcut/{method}/class_mean_maps"] = [wandb.Image(t, caption=text) for t, text in tiles]
        if result.perturbation:
            ys, keys = [], []
            for method, values in result.perturbation.items():
                for test, name in (("pos", "positive"), ("neg", "negative")):
                    ys.append(list(getattr(values, f"{test}_accuracy")))
                    keys.append(f"{method} {name}")
            payload["explain/perturbation_curves"] = wandb.plot.line_series(
                xs=list(values.fractions), ys=ys, keys=keys,
                title=f"Perturbation test, epoch {result.epoch}: accuracy vs fraction of pixels removed",
                xname="fraction removed",
            )
        if self.log_table and result.overlay:
            payload["explain/table"] = self._table_rows(result)
        if self._pending is not None:
            payload["shortcut/alarms"], self._pending = self._pending, None
        self.logger.log_metrics(payload, step=result.step)

    def _table_rows(self, result):
        import wandb

        methods = result.methods
        columns = ["epoch", "sample_id", "image", *methods, "label", "prediction", "probability"]
        located = result.localisation_per_sample()
        columns += [f"{m}/drift" for m in methods] + list(located)
        if self._table is None or list(self._table.columns) != columns:
            self._table = wandb.Table(columns=columns, log_mode="INCREMENTAL")
        panels = {m: _panels(result, m) for m in methods}
        for i, index in enumerate(result.index):
            self._table.add_data(
                result.epoch, int(index), wandb.Image(result.image[i]),
                *[wandb.Image(panels[m][i], caption=_caption(result, i, m)) for m in methods],
                result.name(result.label[i]), result.name(result.prediction[i]), float(result.probability[i]),
                *[float(result.drift.get(m, [float("nan")] * len(result.index))[i]) for m in methods],
                *[float(v[i]) for v in located.values()],
            )
        return self._table

    def alarm(self, events, result):
        import wandb

        run = self.logger.experiment
        fired = [e for e in events if e.kind == "fired"]
        for method in dict.fromkeys(e.method for e in fired):
            mine = [e for e in fired if e.method == method]
            classes = ", ".join(e.class_name for e in mine)
            run.alert(title=f"vitlens: shortcut suspected at epoch {result.epoch} ({method})",
                      text="\n".join(e.message() for e in mine) + f"\nclasses: {classes}",
                      level=wandb.AlertLevel.WARN, wait_duration=0)
        self._alarms += _alarm_rows(events)
        # logged with this epoch's step (the callback calls alarm() before log())
        self._pending = wandb.Table(columns=ALARM_COLUMNS, data=[list(r) for r in self._alarms])
        self._summary(run, fired)

    def _summary(self, run, fired):
        if fired:
            run.summary["shortcut/alarm"] = True
            if "shortcut/first_alarm_epoch" not in run.summary.keys():
                run.summary["shortcut/first_alarm_epoch"] = fired[0].epoch
        run.summary["shortcut/alarm_log"] = [dict(zip(ALARM_COLUMNS, r)) for r in self._alarms]

    def finish(self, alarm):
        run = self.logger.experiment
        run.summary["shortcut/alarm"] = bool(alarm.fired)
        run.summary["shortcut/alarms_fired"] = len(alarm.fired)
        run.summary["shortcut/alarms_active"] = sorted(alarm.active)
        run.summary["shortcut/summary"] = alarm.summary()


class TensorBoardBackend(Backend):
    """Images (one contact sheet per method, per-class mean maps), the curves, scalars; alarms as text."""

    def __init__(self, logger) -> None:
        self.logger = logger

    def log(self, result, scalars):
        writer = self.logger.experiment
        for method in result.methods:
            writer.add_image(f"explain/{method}/maps", _sheet(result, method), global_step=result.step, dataformats="HWC")
            sheet = _mean_map_sheet(result, method)
            if sheet is not None:
                writer.add_image(f"shortcut/{method}/class_mean_maps", sheet, global_step=result.step, dataformats="HWC")
        if result.perturbation:
            curves = figure_to_array(plot_perturbation_curves(result.perturbation))
            writer.add_image("explain/perturbation_curves", curves, global_step=result.step, dataformats="HWC")
        self.logger.log_metrics(scalars, step=result.step)

    def alarm(self, events, result):
        text = "\n\n".join(e.message() for e in events)
        self.logger.experiment.add_text("shortcut/alarms", text, global_step=result.step)

    def finish(self, alarm):
        self.logger.experiment.add_text("shortcut/summary", alarm.summary().replace("\n", "\n\n"))


class CSVBackend(Backend):
    """Scalars in the logger's metrics file, PNGs and ``shortcut_alarms.csv`` in its log folder."""

    def __init__(self, logger) -> None:
        self.logger = logger

    def log(self, result, scalars):
        self.logger.log_metrics(scalars, step=result.step)
        if hasattr(self.logger, "log_dir"):
            _write_pngs(Path(self.logger.log_dir) / "explain" / f"epoch={result.epoch:03d}", result)

    def alarm(self, events, result):
        if hasattr(self.logger, "log_dir"):
            _write_alarms_csv(Path(self.logger.log_dir) / "shortcut_alarms.csv", events)


class FilesBackend(Backend):
    """No logger: PNGs and ``shortcut_alarms.csv`` under ``<default_root_dir>/explain``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root) / "explain"

    def log(self, result, scalars):
        _write_pngs(self.root / f"epoch={result.epoch:03d}", result)

    def alarm(self, events, result):
        _write_alarms_csv(self.root / "shortcut_alarms.csv", events)


def backend_for(logger, *, log_table: bool = True) -> Backend:
    """The back-end of a Lightning logger (any other logger: its ``log_metrics`` gets the scalars)."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    if isinstance(logger, WandbLogger):
        return WandbBackend(logger, log_table=log_table)
    if isinstance(logger, TensorBoardLogger):
        return TensorBoardBackend(logger)
    if isinstance(logger, CSVLogger):
        return CSVBackend(logger)
    backend = CSVBackend(logger)  # log_metrics only (no log_dir: no files)
    return backend
