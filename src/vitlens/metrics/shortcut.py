"""Shortcut signals: is the model looking at the object, or at a fixed place in the image?

A model that learns a shortcut (a watermark, a ruler, the photographer's perch, a corner
mark) keeps a high validation accuracy when the shortcut is in the validation split too;
only its relevance maps show it. Two signals, both cheap (they reuse maps already computed):

* **Position consistency** (no masks needed). The maps of a class, each normalised to sum to
  1, averaged in image coordinates: the class's *mean map*. Objects sit anywhere, so a model
  that looks at the object has a spread-out mean map; one that looks at a mark in a fixed
  place has its mean map's mass piled up there. The *peak mass* is the mean map's mass in its
  hottest window (a quarter of the image side square); its chance level is the same statistic
  of the ``random`` control's maps of the same images (the uniform window share when there is
  no control). The *ratio* peak / chance is the signal: about 1-2 for a model that looks at
  objects in random places, several times that for a fixed-place shortcut.
* **Relevance on the object** (with masks or boxes): the share of each map's relevance that
  falls on the object (``relevance_on_object``), per class, against the random control's
  share (the object's area); the ratio drops towards 1 when the model looks elsewhere.

:class:`ShortcutAlarm` turns the per-epoch signals into alarms with hysteresis: a (method,
class) pair fires after its signal crossed the *fire* threshold for ``patience`` explained
epochs in a row, and is cleared only when it comes back past the *clear* threshold.
A class is judged only when the model *recognises* it (:func:`class_recognition`): a model
that cannot tell a class apart has learned no cue for it, shortcut or otherwise, and the maps
of a near-chance model wander (in a clean fit they can leave the object for a few epochs); a
real shortcut gives a high accuracy, since the shortcut is in the validation split too.
:func:`audit_shortcuts` runs the same analysis over a whole split (``explain.py audit``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "ShortcutThresholds",
    "PositionConsistency",
    "ObjectShare",
    "ShortcutSignals",
    "ShortcutEvent",
    "ShortcutAlarm",
    "normalised_maps",
    "position_consistency",
    "object_share",
    "shortcut_signals",
    "region_name",
    "class_recognition",
    "replay_alarm",
    "judged_values",
    "audit_shortcuts",
    "AuditReport",
]

MAX_GRID = 16  # maps finer than this (pixel maps) are pooled to MAX_GRID x MAX_GRID cells


@dataclass(frozen=True)
class ShortcutThresholds:
    """When the alarm fires (chosen from measurements: BENCHMARKS.md, "Shortcut alarm").

    Args:
        position_fire: fire when a class's mean-map peak mass is at least this many times the
            random control's.
        position_clear: clear a fired (method, class) when its ratio falls below this.
        object_fire: fire when a class's relevance-on-object share is at most this many times
            the random control's (needs masks or boxes; 1.0 = no better than chance).
        object_clear: clear when the object ratio rises above this.
        min_images: classes with fewer explained images are not judged.
        min_recognition: classes the model does not recognise yet are not judged: the class's
            *recognition* on the explained images (:func:`class_recognition`: the smaller of its
            recall and precision, chance-corrected, 0 = chance, 1 = every image right and no
            other image called it) must be at least this. ``None``: judge every class.
        patience: explained epochs in a row past the fire threshold before it fires.
        warmup_epochs: epochs (0-based ``current_epoch`` below this) that never fire: the maps
            of a barely trained model say nothing.
    """

    position_fire: float = 3.0
    position_clear: float = 2.5
    object_fire: float = 0.8
    object_clear: float = 1.2
    min_images: int = 4
    min_recognition: float | None = 0.5
    patience: int = 2
    warmup_epochs: int = 2

    def __post_init__(self) -> None:
        if not self.position_clear <= self.position_fire:
            raise ValueError(f"shortcut thresholds: position_clear ({self.position_clear}) must be <= position_fire ({self.position_fire})")
        if not self.object_fire <= self.object_clear:
            raise ValueError(f"shortcut thresholds: object_clear ({self.object_clear}) must be >= object_fire ({self.object_fire})")
        if self.min_recognition is not None and not (isinstance(self.min_recognition, (int, float))
                                                     and -1 <= self.min_recognition <= 1):
            raise ValueError(f"shortcut thresholds: min_recognition must be a number in [-1, 1] or None (judge every "
                             f"class), got {self.min_recognition!r}")
        for name in ("min_images", "patience", "warmup_epochs"):
            value = getattr(self, name)
            if int(value) != value or value < (1 if name == "patience" else 0):
                raise ValueError(f"shortcut thresholds: {name} must be an integer >= {1 if name == 'patience' else 0}, got {value!r}")

    @classmethod
    def from_options(cls, options: "ShortcutThresholds | dict | None") -> "ShortcutThresholds":
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"shortcut thresholds: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
        return cls(**dict(options))


# ---------------------------------------------------------------------------- signals
def normalised_maps(maps: torch.Tensor) -> torch.Tensor:
    """(N, h, w) relevance -> (N, g, g') non-negative maps summing to 1 (pooled to <= MAX_GRID cells a side).

    Negative relevance is clipped to 0; an all-zero map becomes uniform."""
    maps = maps.detach().double().clamp(min=0)
    if maps.dim() != 3:
        raise ValueError(f"relevance maps must be (N, h, w), got shape {tuple(maps.shape)}")
    h, w = maps.shape[-2:]
    if h > MAX_GRID or w > MAX_GRID:
        maps = F.adaptive_avg_pool2d(maps[:, None], (min(h, MAX_GRID), min(w, MAX_GRID)))[:, 0]
    total = maps.flatten(1).sum(1).view(-1, 1, 1)
    uniform = torch.full_like(maps, 1.0 / maps[0].numel()) if len(maps) else maps
    return torch.where(total > 0, maps / total.clamp(min=1e-300), uniform)


def _window(grid: tuple[int, int]) -> tuple[int, int]:
    return max(1, round(grid[0] / 4)), max(1, round(grid[1] / 4))


def _peak(mean_maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, g, g') -> mass of the hottest window (C,) and its top-left cell (C, 2)."""
    kh, kw = _window(tuple(mean_maps.shape[-2:]))
    sums = F.avg_pool2d(mean_maps[:, None], (kh, kw), stride=1)[:, 0] * (kh * kw)  # (C, g-kh+1, g'-kw+1)
    flat = sums.flatten(1)
    mass, where = flat.max(1)
    cols = sums.shape[-1]
    return mass, torch.stack([where // cols, where % cols], 1)


def region_name(row: float, col: float) -> str:
    """A window centre (fractions of height/width, 0..1) in words: 'top-left corner', 'centre'..."""
    v = "top" if row < 1 / 3 else ("bottom" if row > 2 / 3 else "middle")
    h = "left" if col < 1 / 3 else ("right" if col > 2 / 3 else "centre")
    if v == "middle" and h == "centre":
        return "centre"
    if v == "middle":
        return f"{h} edge"
    if h == "centre":
        return f"{v} edge"
    return f"{v}-{h} corner"


NULL_DRAWS = 64


def class_recognition(labels, predictions, num_classes: int) -> list[float]:
    """Per class: how well the model tells it apart on these images, chance-corrected.

    ``min(recall, precision)`` of the class (recall: share of its images predicted as it;
    precision: share of the images predicted as it that are it; 0 if none is), mapped so that
    chance (``1/C``) is 0 and perfect is 1: ``(x - 1/C) / (1 - 1/C)``. The minimum of the two:
    a model that calls every image class A has recall 1 on A but precision ``1/C``; it has
    learned nothing about A. NaN for classes without images."""
    labels = torch.as_tensor(labels).cpu().long().flatten()
    predictions = torch.as_tensor(predictions).cpu().long().flatten()
    if labels.shape != predictions.shape:
        raise ValueError(f"class_recognition: {len(labels)} labels but {len(predictions)} predictions")
    chance = 1.0 / max(num_classes, 2)
    out = []
    for c in range(num_classes):
        members, called = labels == c, predictions == c
        n = int(members.sum())
        if n == 0:
            out.append(float("nan"))
            continue
        hits = int((members & called).sum())
        recall = hits / n
        precision = hits / int(called.sum()) if called.any() else 0.0
        out.append((min(recall, precision) - chance) / (1 - chance))
    return out


def _null_peaks(norm: torch.Tensor, counts: list[int], draws: int = NULL_DRAWS, seed: int = 0) -> dict[int, float]:
    """For each class size n: the mean peak mass of the mean map of n images drawn (without
    replacement, seeded) from ALL classes: the chance level of a class's peak mass when labels do
    not matter. It has the maps' own centre bias and blobs, and the same small-sample noise
    (the max over windows of a mean of n maps) as the class's statistic."""
    total = len(norm)
    out: dict[int, float] = {}
    if total == 0:
        return out
    generator = torch.Generator().manual_seed(seed)
    for n in sorted({c for c in counts if c > 0}):
        if len(set(counts) - {0}) and n >= total:
            continue  # one class only: no chance level
        picks = torch.rand((draws, total), generator=generator).argsort(1)[:, :n]  # (draws, n)
        means = norm[picks].mean(1)  # (draws, g, g')
        peaks, _ = _peak(means)
        out[n] = float(peaks.mean())
    return out


@dataclass
class PositionConsistency:
    """Per class: its mean map, the peak window's mass, the chance level, where the peak is."""

    mean_maps: torch.Tensor  # (C, g, g') float64, NaN for classes without images
    counts: list[int]
    peak_mass: list[float]
    chance_mass: list[float]
    ratio: list[float]  # peak mass / the random control's
    null_mass: list[float]  # peak mass of the mean map of as many images drawn from every class
    lift: list[float]  # peak mass / null_mass: the alarm's signal
    region: list[str]  # e.g. 'top-left corner'
    box: list[tuple[float, float, float, float]]  # peak window, fractions of the image (x0, y0, x1, y1)

    def pixel_box(self, c: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
        x0, y0, x1, y1 = self.box[c]
        h, w = size
        return round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h)


def position_consistency(maps: torch.Tensor, labels: torch.Tensor, num_classes: int,
                         random_maps: torch.Tensor | None = None) -> PositionConsistency:
    """Per-class mean maps and their peak mass against the random control's (see the module doc)."""
    norm = normalised_maps(maps)
    labels = torch.as_tensor(labels).cpu().long()
    grid = tuple(norm.shape[-2:])
    one_hot = F.one_hot(labels, num_classes).double()  # (N, C)
    counts = one_hot.sum(0)
    mean_maps = torch.einsum("nc,nhw->chw", one_hot, norm.cpu()) / counts.clamp(min=1).view(-1, 1, 1)
    mean_maps[counts == 0] = float("nan")
    peak, corner = _peak(torch.nan_to_num(mean_maps))
    kh, kw = _window(grid)
    if random_maps is not None:
        rnorm = normalised_maps(random_maps).cpu()
        rmean = torch.einsum("nc,nhw->chw", one_hot, rnorm) / counts.clamp(min=1).view(-1, 1, 1)
        chance, _ = _peak(rmean)
    else:
        chance = torch.full((num_classes,), kh * kw / (grid[0] * grid[1]), dtype=torch.float64)
    null = _null_peaks(norm.cpu(), counts.long().tolist())
    out = PositionConsistency(mean_maps, counts.long().tolist(), [], [], [], [], [], [], [])
    for c in range(num_classes):
        if counts[c] == 0:
            for values in (out.peak_mass, out.chance_mass, out.ratio, out.null_mass, out.lift):
                values.append(float("nan"))
            out.region.append("")
            out.box.append((float("nan"),) * 4)
            continue
        r, q = (int(v) for v in corner[c])
        out.peak_mass.append(float(peak[c]))
        out.chance_mass.append(float(chance[c]))
        out.ratio.append(float(peak[c] / chance[c]) if chance[c] > 0 else float("nan"))
        mass = null.get(int(counts[c]), float("nan"))
        out.null_mass.append(mass)
        out.lift.append(float(peak[c]) / mass if mass > 0 else float("nan"))
        out.region.append(region_name((r + kh / 2) / grid[0], (q + kw / 2) / grid[1]))
        out.box.append((q / grid[1], r / grid[0], (q + kw) / grid[1], (r + kh) / grid[0]))
    return out


@dataclass
class ObjectShare:
    """Per class (and overall): mean share of relevance on the object, the random control's, their ratio."""

    share: list[float]
    chance: list[float]
    ratio: list[float]
    counts: list[int]
    overall: float
    overall_chance: float

    @property
    def overall_ratio(self) -> float:
        return self.overall / self.overall_chance if self.overall_chance > 0 else float("nan")


def object_share(on_object: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 chance: torch.Tensor | None = None) -> ObjectShare:
    """Per-class means of per-image shares on the object (NaN = no mask, left out).

    ``chance``: the random control's per-image shares (default: no control, ratio vs 1/1 = share)."""
    on_object = torch.as_tensor(on_object).double().cpu()
    labels = torch.as_tensor(labels).cpu().long()
    chance = torch.ones_like(on_object) if chance is None else torch.as_tensor(chance).double().cpu()
    valid = on_object.isfinite() & chance.isfinite()
    share, base, ratio, counts = [], [], [], []
    for c in range(num_classes):
        keep = valid & (labels == c)
        n = int(keep.sum())
        counts.append(n)
        s = float(on_object[keep].mean()) if n else float("nan")
        b = float(chance[keep].mean()) if n else float("nan")
        share.append(s)
        base.append(b)
        ratio.append(s / b if n and b > 0 else float("nan"))
    total = float(on_object[valid].mean()) if valid.any() else float("nan")
    total_chance = float(chance[valid].mean()) if valid.any() else float("nan")
    return ObjectShare(share, base, ratio, counts, total, total_chance)


@dataclass
class ShortcutSignals:
    """One method's signals on one set of images."""

    method: str
    position: PositionConsistency
    objects: ObjectShare | None = None

    def scalars(self, prefix: str, class_names: Sequence[str]) -> dict[str, float]:
        """``{prefix}/<method>/position_ratio`` (worst class), ``.../<class>/position_ratio``, object shares."""
        out: dict[str, float] = {}
        base = f"{prefix}/{self.method}"
        finite = [r for r in self.position.lift if math.isfinite(r)]
        if finite:
            out[f"{base}/position_lift_max"] = max(finite)
        finite = [r for r in self.position.ratio if math.isfinite(r)]
        if finite:
            out[f"{base}/position_ratio_max"] = max(finite)
        for c, name in enumerate(class_names):
            if math.isfinite(self.position.ratio[c]):
                out[f"{base}/{name}/position_ratio"] = self.position.ratio[c]
                out[f"{base}/{name}/peak_mass"] = self.position.peak_mass[c]
            if math.isfinite(self.position.lift[c]):
                out[f"{base}/{name}/position_lift"] = self.position.lift[c]
        if self.objects is not None and math.isfinite(self.objects.overall):
            out[f"{base}/object_share"] = self.objects.overall
            out[f"{base}/object_ratio"] = self.objects.overall_ratio
            finite = [r for r in self.objects.ratio if math.isfinite(r)]
            if finite:
                out[f"{base}/object_ratio_min"] = min(finite)
            for c, name in enumerate(class_names):
                if math.isfinite(self.objects.ratio[c]):
                    out[f"{base}/{name}/object_share"] = self.objects.share[c]
                    out[f"{base}/{name}/object_ratio"] = self.objects.ratio[c]
        return out


def shortcut_signals(maps: dict[str, torch.Tensor], labels: torch.Tensor, num_classes: int, *,
                     random_maps: torch.Tensor | None = None,
                     on_object: dict[str, torch.Tensor] | None = None,
                     random_on_object: torch.Tensor | None = None) -> dict[str, ShortcutSignals]:
    """The signals of every method (``maps[method]``: (N, h, w) maps of ``labels``' images)."""
    out = {}
    for method, m in maps.items():
        objects = None
        if on_object is not None and method in on_object:
            objects = object_share(on_object[method], labels, num_classes, random_on_object)
        out[method] = ShortcutSignals(method, position_consistency(m, labels, num_classes, random_maps), objects)
    return out


# ---------------------------------------------------------------------------- alarm
@dataclass
class ShortcutEvent:
    """An alarm that fired (or was cleared) for one method and class."""

    kind: str  # "fired" or "cleared"
    signal: str  # "position" or "object"
    method: str
    class_name: str
    epoch: int
    value: float
    threshold: float
    region: str = ""
    box: tuple[int, int, int, int] | None = None  # pixel box of the hotspot (position signal)

    def message(self) -> str:
        if self.signal == "position":
            what = (f"relevance of class {self.class_name!r} piles up in the {self.region}"
                    + (f" (pixels x {self.box[0]}-{self.box[2]}, y {self.box[1]}-{self.box[3]})" if self.box else "")
                    + f": peak mass {self.value:.1f}x its chance level with the labels shuffled (alarm at {self.threshold:g}x)")
        else:
            what = (f"relevance of class {self.class_name!r} is no longer on the object: share on object "
                    f"{self.value:.2f}x the random control's (alarm at {self.threshold:g}x)")
        if self.kind == "cleared":
            return f"shortcut alarm cleared at epoch {self.epoch} for {self.method}: {what}"
        return f"shortcut suspected at epoch {self.epoch} by {self.method}: {what}"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["box"] = list(self.box) if self.box else None
        return d


@dataclass
class ShortcutAlarm:
    """Hysteresis over the per-epoch signals; its state goes into the callback's checkpoint state."""

    thresholds: ShortcutThresholds = field(default_factory=ShortcutThresholds)
    streak: dict[str, int] = field(default_factory=dict)  # "signal|method|class" -> epochs in a row past fire
    active: dict[str, int] = field(default_factory=dict)  # "signal|method|class" -> epoch it fired
    events: list[ShortcutEvent] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)  # per explained epoch: the values (judged or not)
    not_judged: dict[str, float] = field(default_factory=dict)  # the last epoch's unrecognised classes -> recognition

    def update(self, epoch: int, signals: dict[str, ShortcutSignals], class_names: Sequence[str],
               image_size: tuple[int, int] | None = None,
               recognition: Sequence[float] | None = None) -> list[ShortcutEvent]:
        """Judge one explained epoch; returns the events (fired/cleared) of this epoch.

        ``recognition``: per class, :func:`class_recognition` on the explained images (None: every
        class is recognised). A class below ``min_recognition`` is not judged this epoch (its
        streak restarts; an active alarm stays active): :attr:`not_judged` names them. The
        history keeps every value (``recognition|<class>`` too), so :func:`replay_alarm` can
        re-judge it under other thresholds."""
        t = self.thresholds
        new: list[ShortcutEvent] = []
        row: dict[str, float] = {"epoch": epoch}
        self.not_judged = {}
        for c, name in enumerate(class_names):
            if recognition is not None and c < len(recognition) and math.isfinite(recognition[c]):
                row[f"recognition|{name}"] = float(recognition[c])
                if not _recognised(row, name, t):
                    self.not_judged[name] = float(recognition[c])
        for method, s in signals.items():
            for c, name in enumerate(class_names):
                pos = s.position
                lift = pos.lift[c]
                if pos.counts[c] >= t.min_images and math.isfinite(lift):
                    box = pos.pixel_box(c, image_size) if image_size else None
                    row[f"position|{method}|{name}"] = lift
                    new += self._judge("position", method, name, epoch, lift, lift >= t.position_fire,
                                       lift < t.position_clear, t.position_fire, pos.region[c], box,
                                       judged=name not in self.not_judged)
                objects = s.objects
                if objects is not None and objects.counts[c] >= t.min_images and math.isfinite(objects.ratio[c]):
                    r = objects.ratio[c]
                    row[f"object|{method}|{name}"] = r
                    new += self._judge("object", method, name, epoch, r, r <= t.object_fire, r > t.object_clear,
                                       t.object_fire, judged=name not in self.not_judged)
        self.history.append(row)
        self.events += new
        return new

    def not_judged_message(self, epoch: int) -> str:
        """One line naming the classes not judged this epoch and why ('' if every class was)."""
        if not self.not_judged:
            return ""
        names = ", ".join(f"{name} ({value:.2f})" for name, value in self.not_judged.items())
        return (f"shortcut alarm, epoch {epoch}: not judged, the model does not recognise them yet (recognition "
                f"below min_recognition={self.thresholds.min_recognition:g}): {names}")

    def _judge(self, signal, method, name, epoch, value, past_fire, past_clear, threshold, region="", box=None,
               judged=True):
        key = f"{signal}|{method}|{name}"
        if not judged:  # no evidence either way: the streak restarts, an active alarm stays active
            if key not in self.active:
                self.streak[key] = 0
            return []
        if key in self.active:
            if past_clear:
                del self.active[key]
                self.streak[key] = 0
                return [ShortcutEvent("cleared", signal, method, name, epoch, value, threshold, region, box)]
            return []
        self.streak[key] = self.streak.get(key, 0) + 1 if past_fire else 0
        if epoch >= self.thresholds.warmup_epochs and self.streak[key] >= self.thresholds.patience:
            self.active[key] = epoch
            return [ShortcutEvent("fired", signal, method, name, epoch, value, threshold, region, box)]
        return []

    @property
    def fired(self) -> list[ShortcutEvent]:
        return [e for e in self.events if e.kind == "fired"]

    def summary(self) -> str:
        """One paragraph for the end of fitting: what fired, when, and what is still active."""
        fired = self.fired
        skipped = self._not_judged_summary()
        if not fired:
            return "shortcut alarm: no shortcut suspected in any explained epoch" + skipped
        groups: dict[tuple[str, str, int], list[ShortcutEvent]] = {}
        for e in fired:
            groups.setdefault((e.method, e.signal, e.epoch), []).append(e)
        lines = [f"shortcut alarm: {len(fired)} alarm(s), {len(self.active)} still active at the end of fitting"]
        for (method, signal, epoch), events in groups.items():
            classes = ", ".join(f"{e.class_name}" + (f" ({e.region})" if e.region else "") for e in events)
            lines.append(f"  epoch {epoch}, {method}, {signal} signal: {classes}")
        return "\n".join(lines) + skipped

    def _not_judged_summary(self) -> str:
        epochs: dict[str, list[int]] = {}
        for row in self.history:
            for key in row:
                if key.startswith("recognition|") and not _recognised(row, key.split("|", 1)[1], self.thresholds):
                    epochs.setdefault(key.split("|", 1)[1], []).append(int(row["epoch"]))
        if not epochs:
            return ""
        return ("\n  not judged while the model did not recognise the class (recognition below min_recognition="
                f"{self.thresholds.min_recognition:g}): "
                + "; ".join(f"{name} in epoch(s) {', '.join(map(str, e))}" for name, e in epochs.items()))

    def state_dict(self) -> dict[str, Any]:
        return {"thresholds": asdict(self.thresholds), "streak": dict(self.streak), "active": dict(self.active),
                "events": [e.as_dict() for e in self.events], "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streak = {k: int(v) for k, v in state.get("streak", {}).items()}
        self.active = {k: int(v) for k, v in state.get("active", {}).items()}
        events = []
        for e in state.get("events", []):
            e = dict(e)
            e["box"] = tuple(e["box"]) if e.get("box") else None
            events.append(ShortcutEvent(**e))
        self.events = events
        self.history = [dict(h) for h in state.get("history", [])]


def _recognised(row: Mapping[str, float], class_name: str, thresholds: ShortcutThresholds) -> bool:
    """Whether a history row's class is judged under ``thresholds`` (no recognition value: yes)."""
    value = row.get(f"recognition|{class_name}")
    return thresholds.min_recognition is None or value is None or value >= thresholds.min_recognition


def judged_values(row: Mapping[str, float], thresholds: ShortcutThresholds) -> dict[str, float]:
    """The ``signal|method|class`` values of a history row that ``thresholds`` judge."""
    return {k: v for k, v in row.items() if k.split("|")[0] in ("position", "object")
            and _recognised(row, k.split("|", 2)[2], thresholds)}


def replay_alarm(history: Iterable[dict[str, float]], thresholds: ShortcutThresholds) -> list[tuple[int, str]]:
    """Re-judge logged values (``ShortcutAlarm.history``) under other thresholds: [(epoch, key)] that fire.

    For choosing thresholds from measurements without re-training. A class whose
    ``recognition|<class>`` value is below ``min_recognition`` is not judged (as in
    :meth:`ShortcutAlarm.update`)."""
    streak: dict[str, int] = {}
    active: set[str] = set()
    fired = []
    for row in history:
        epoch = int(row["epoch"])
        for key, value in row.items():
            signal = key.split("|")[0]
            if signal not in ("position", "object"):
                continue
            if not _recognised(row, key.split("|", 2)[2], thresholds):
                if key not in active:
                    streak[key] = 0
                continue
            past_fire = value >= thresholds.position_fire if signal == "position" else value <= thresholds.object_fire
            past_clear = value < thresholds.position_clear if signal == "position" else value > thresholds.object_clear
            if key in active:
                if past_clear:
                    active.discard(key)
                    streak[key] = 0
                continue
            streak[key] = streak.get(key, 0) + 1 if past_fire else 0
            if epoch >= thresholds.warmup_epochs and streak[key] >= thresholds.patience:
                active.add(key)
                fired.append((epoch, key))
    return fired


# ---------------------------------------------------------------------------- audit (a whole split)
@dataclass
class AuditReport:
    """The audit of one split: per method its signals, per class a verdict and hotspot examples."""

    methods: list[str]
    class_names: list[str]
    signals: dict[str, ShortcutSignals]
    verdicts: dict[str, dict[str, str]]  # method -> class -> verdict text
    suspected: dict[str, list[str]]  # method -> classes suspected
    examples: dict[str, dict[str, list[int]]]  # method -> class -> dataset indices of the images hottest in the hotspot
    thresholds: ShortcutThresholds
    meta: dict = field(default_factory=dict)
    recognition: list[float] = field(default_factory=list)  # per class, class_recognition over the split

    def to_markdown(self, images: dict[str, str] | None = None) -> str:
        m = self.meta
        lines = [f"# Shortcut audit: {m.get('model', '')}", "",
                 f"{m.get('n_images', 0)} images ({m.get('split', '')} split of `{m.get('data', '')}`), "
                 f"top-1 accuracy {100 * m.get('accuracy', float('nan')):.2f}%. Position lift: the mass of a class's "
                 f"mean map in its hottest window over the same with the labels shuffled (suspected at >= "
                 f"{self.thresholds.position_fire:g}x); "
                 f"object ratio: share of relevance on the object over the control's (suspected at <= "
                 f"{self.thresholds.object_fire:g}x).", ""]
        for method in self.methods:
            s = self.signals[method]
            suspected = self.suspected[method]
            lines += [f"## {method}", "",
                      (f"**Shortcut suspected** for {len(suspected)} of {len(self.class_names)} classes: "
                       + ", ".join(suspected) if suspected else "No shortcut suspected."), ""]
            header = "| class | images | recognition | position lift | hotspot | object ratio | verdict |"
            lines += [header, "|---|---|---|---|---|---|---|"]
            for c, name in enumerate(self.class_names):
                obj = "–" if s.objects is None or not math.isfinite(s.objects.ratio[c]) else f"{s.objects.ratio[c]:.2f}"
                ratio = s.position.lift[c]
                known = f"{self.recognition[c]:.2f}" if c < len(self.recognition) else "–"
                lines.append(f"| {name} | {s.position.counts[c]} | {known} | {ratio:.2f} | {s.position.region[c]} | {obj} | "
                             f"{self.verdicts[method][name]} |")
            lines.append("")
            if images and method in images:
                lines += [f"![per-class mean maps, {method}]({images[method]})", ""]
            for name in suspected:
                key = f"{method}/{name}"
                if images and key in images:
                    lines += [f"Hotspot examples, {name}: ![{key}]({images[key]})", ""]
        return "\n".join(lines)


def audit_shortcuts(model: torch.nn.Module, batches: Iterable[dict], methods: Sequence[str],
                    class_names: Sequence[str], *, thresholds: ShortcutThresholds | None = None,
                    limit: int | None = None, precision: str | None = None, examples: int = 6,
                    signed: str = "positive",
                    method_options: Mapping[str, Mapping] | None = None) -> AuditReport:
    """Explain every image of ``batches`` (true class) with ``methods`` and the random control; judge each class.
    ``method_options``: options per method (``{"transformer_attribution": {"start_layer": 0}}``).

    ``signed``: how signed maps enter relevance on object (as in the callback and ``evaluate``).

    Keeps only the coarse maps (``MAX_GRID`` cells a side), so memory is small for any split size."""
    from vitlens.metrics.localization import localization, object_masks
    from vitlens.relevance import explain_many
    from vitlens.relevance.registry import with_options

    thresholds = thresholds or ShortcutThresholds()
    methods = [m for m in dict.fromkeys(methods) if m != "random"]
    requested = with_options([*methods, "random"], method_options)
    device = next(model.parameters()).device
    kept: dict[str, list[torch.Tensor]] = {m: [] for m in [*methods, "random"]}
    on_obj: dict[str, list[torch.Tensor]] = {m: [] for m in [*methods, "random"]}
    labels, indices, predictions = [], [], []
    seen = correct = 0
    any_objects = False
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            if limit is not None and seen >= limit:
                break
            take = len(batch["label"]) if limit is None else min(len(batch["label"]), limit - seen)
            images = batch["image"][:take].to(device)
            y = batch["label"][:take].to(device)
            out = explain_many(model, images, requested, y, precision=precision)
            correct += int((out.logits.argmax(-1) == y).sum())
            predictions.append(out.logits.argmax(-1).cpu())
            size = tuple(images.shape[-2:])
            found = object_masks({k: v[:take] for k, v in batch.items() if k in ("mask", "has_mask", "box", "has_box")}, size)
            objects = None if found is None else found[0]
            for m in kept:
                maps = out.maps[m].detach().float()
                kept[m].append(normalised_maps(maps).float().cpu())
                if objects is not None:
                    on_obj[m].append(localization(maps, objects.to(device), signed=signed,
                                                  scores=("relevance_on_object",))["relevance_on_object"].cpu())
            any_objects |= objects is not None
            labels.append(y.cpu())
            indices.append((batch["index"][:take] if "index" in batch else torch.arange(seen, seen + take)).cpu())
            seen += take
    finally:
        if was_training:
            model.train()
    if seen == 0:
        raise ValueError("no images to audit (empty split or --limit 0)")
    labels_t, index_t = torch.cat(labels), torch.cat(indices)
    maps = {m: torch.cat(v) for m, v in kept.items()}
    signals = shortcut_signals(
        {m: maps[m] for m in methods}, labels_t, len(class_names), random_maps=maps["random"],
        on_object={m: torch.cat(on_obj[m]) for m in methods} if any_objects else None,
        random_on_object=torch.cat(on_obj["random"]) if any_objects else None)
    recognition = class_recognition(labels_t, torch.cat(predictions), len(class_names))
    verdicts, suspected, hot = {}, {}, {}
    for m in methods:
        s = signals[m]
        verdicts[m], suspected[m], hot[m] = {}, [], {}
        for c, name in enumerate(class_names):
            reasons = []
            if s.position.counts[c] < thresholds.min_images:
                verdicts[m][name] = f"too few images ({s.position.counts[c]})"
                continue
            if thresholds.min_recognition is not None and not recognition[c] >= thresholds.min_recognition:
                verdicts[m][name] = (f"not judged: the model does not recognise this class (recognition "
                                     f"{recognition[c]:.2f} < min_recognition {thresholds.min_recognition:g})")
                continue
            if s.position.lift[c] >= thresholds.position_fire:
                reasons.append(f"relevance piles up in the {s.position.region[c]} ({s.position.lift[c]:.1f}x chance "
                               "with the labels shuffled)")
            if s.objects is not None and math.isfinite(s.objects.ratio[c]) and s.objects.ratio[c] <= thresholds.object_fire:
                reasons.append(f"relevance not on the object ({s.objects.ratio[c]:.2f}x chance)")
            if reasons:
                suspected[m].append(name)
                verdicts[m][name] = "**shortcut suspected**: " + "; ".join(reasons)
            else:
                verdicts[m][name] = "ok"
            # the class's images with the most relevance inside its hotspot window
            x0, y0, x1, y1 = s.position.box[c]
            g = maps[m].shape[-2:]
            r0, r1, q0, q1 = round(y0 * g[0]), round(y1 * g[0]), round(x0 * g[1]), round(x1 * g[1])
            members = (labels_t == c).nonzero().flatten()
            mass = maps[m][members, r0:r1, q0:q1].flatten(1).sum(1)
            top = members[mass.argsort(descending=True)[:examples]]
            hot[m][name] = index_t[top].tolist()
    meta = {"n_images": seen, "accuracy": correct / seen, "has_objects": any_objects}
    if any(method_options or {}):  # what the maps were made with (the hotspot sheets reuse it)
        meta["method_options"] = {m: dict(o) for m, o in method_options.items() if o}
    return AuditReport(list(methods), list(class_names), signals, verdicts, suspected, hot, thresholds, meta,
                       recognition)
