"""What the ExplanationCallback computes in one explained epoch, as typed values.

:func:`compute_shard` is the pure computation of one rank (its share of the explained images),
:func:`merge` puts the ranks' :class:`Shard` results together into one :class:`EpochResult`,
whose :meth:`EpochResult.scalars` are the numbers every logger back-end writes
(``vitlens.callbacks.backends``). A new signal is a field here and a line in ``scalars``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from vitlens.data.normalization import denormalize
from vitlens.metrics import PerturbationResult, localization, perturbation_aucs
from vitlens.metrics.localization import object_masks
from vitlens.metrics.shortcut import ShortcutEvent, ShortcutSignals, normalised_maps, shortcut_signals
from vitlens.relevance import heatmap
from vitlens.relevance.display import overlay

__all__ = ["Shard", "EpochResult", "compute_shard", "merge", "RANDOM", "AUC_KEYS", "CURVE_KEYS"]

RANDOM = "random"
AUC_KEYS = ("pos_auc", "neg_auc", "pos_auc_probability", "neg_auc_probability")
CURVE_KEYS = ("pos_accuracy", "neg_accuracy", "pos_probability", "neg_probability")
LOCALISATION_KEYS = ("pointing_game", "relevance_on_object")  # scored as explain.py evaluate does


@dataclass
class Shard:
    """One rank's results. ``positions``: places in the callback's stratified order it explained;
    the probe fields hold the probe samples among them (``probe_positions``)."""

    positions: list[int]
    labels: list[int]
    predictions: list[int]  # predicted class of every explained image (the class its maps explain)
    probe_positions: list[int]
    index: list[int]
    label: list[int]
    prediction: list[int]
    probability: list[float]
    image: list[np.ndarray]
    maps: dict[str, torch.Tensor]  # probe maps of the true class (raw grid), per method
    overlay: dict[str, list[np.ndarray]]
    overlay_predicted: dict[str, dict[int, np.ndarray]]  # probe row -> overlay of the predicted class (misclassified)
    perturbation: dict[str, tuple[int, dict]]  # method -> (image count, PerturbationResult.as_dict())
    localisation: dict[str, dict[str, torch.Tensor]]  # method -> score -> per explained image (NaN: no object)
    coarse: dict[str, torch.Tensor]  # method (and random) -> normalised maps of every explained image


@dataclass
class EpochResult:
    """Everything one explained epoch logs (global rank 0)."""

    epoch: int
    step: int
    class_names: list[str] | None
    image_size: tuple[int, int]
    positions: list[int]  # probe rows, in probe order
    index: list[int]
    label: list[int]
    prediction: list[int]
    probability: list[float]
    image: list[np.ndarray]
    maps: dict[str, list[torch.Tensor]]
    overlay: dict[str, list[np.ndarray]]
    overlay_predicted: dict[str, dict[int, np.ndarray]]
    perturbation: dict[str, PerturbationResult]
    localisation: dict[str, dict[str, np.ndarray]]  # over every explained image, in stratified order
    labels: np.ndarray  # labels of every explained image
    predictions: np.ndarray  # predicted classes of every explained image (what the coarse maps explain)
    coarse: dict[str, torch.Tensor]
    all_positions: list[int]  # stratified-order positions of every explained image
    drift: dict[str, list[float]] = field(default_factory=dict)  # per method and probe row; NaN the first time
    signals: dict[str, ShortcutSignals] = field(default_factory=dict)
    events: list[ShortcutEvent] = field(default_factory=list)  # shortcut alarms fired/cleared this epoch
    recognition: list[float] = field(default_factory=list)  # per class (class_recognition on every explained image)

    @property
    def methods(self) -> list[str]:
        """The shown methods (not the random control)."""
        return list(self.overlay)

    def name(self, label: int) -> str:
        names = self.class_names
        return names[label] if names and 0 <= label < len(names) else str(label)

    def localisation_per_sample(self) -> dict[str, list[float]]:
        """``<method>/<score>`` -> value per probe row."""
        where = {p: i for i, p in enumerate(self.all_positions)}
        return {f"{m}/{k}": [float(v[where[p]]) for p in self.positions]
                for m, scores in self.localisation.items() if m in self.overlay for k, v in scores.items()}

    def class_labels(self) -> list[str]:
        count = int(self.labels.max()) + 1 if len(self.labels) else 0
        n = max(len(self.class_names or []), count)
        return [self.name(c) for c in range(n)]

    def scalars(self) -> dict[str, float]:
        """Every number of the epoch, ``explain/...`` and ``shortcut/...`` keys (see the callback's doc)."""
        out: dict[str, float] = {}
        for method, values in self.perturbation.items():
            for key in AUC_KEYS:
                out[f"explain/{method}/{key}"] = float(getattr(values, key))
        for method, scores in self.localisation.items():
            for key, values in scores.items():
                if np.isfinite(values).any():
                    out[f"explain/{method}/{key}"] = float(np.nanmean(values))
        for method, per_sample in self.drift.items():
            finite = [v for v in per_sample if np.isfinite(v)]
            if finite:
                out[f"explain/{method}/drift"] = float(np.mean(finite))
        names = self.class_labels()
        for signals in self.signals.values():
            out.update(signals.scalars("shortcut", names))
        for name, value in zip(names, self.recognition):
            if math.isfinite(value):
                out[f"shortcut/{name}/recognition"] = value
        return out


# ---------------------------------------------------------------------------- computing (every rank)
def _to_uint8(images01: torch.Tensor) -> list[np.ndarray]:
    return list((images01 * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())


def compute_shard(
    pl_module: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    positions: list[int],
    *,
    explain: Callable,
    num_samples: int,
    perturbation_samples: int,
    mean: Sequence[float],
    std: Sequence[float],
    perturbation_batch_size: int,
    forward_context: Callable[[], Any],
    signed: str = "positive",
) -> Shard:
    """Explain one rank's images: maps (predicted class; the probe's misclassified also for the true
    class), overlays of the probe, the perturbation test, localisation and the coarse maps of the
    shortcut signals. ``explain(images, targets)`` -> (maps by method, logits).

    ``signed``: how maps with negative values are shown and enter the localisation scores, the
    rule of ``explain.py evaluate`` (:func:`vitlens.metrics.localization`): the same map gets
    the same pointing game and relevance on object in both. The perturbation test of every
    method (and the random control) runs as one :func:`perturbation_aucs` call: one clean pass
    for all maps, their perturbed rows in full batches."""
    device = next(pl_module.parameters()).device
    images = batch["image"].to(device)
    labels = batch["label"].to(device)
    where = torch.as_tensor(positions)
    probe_cpu = where < num_samples
    probe = probe_cpu.to(device)
    predicted_maps, logits = explain(images, None)
    probabilities = logits.softmax(-1)
    predictions = probabilities.argmax(-1)
    wrong = predictions != labels
    true_maps = {m: t.clone() for m, t in predicted_maps.items()}
    if (wrong & probe).any():
        again, _ = explain(images[wrong & probe], labels[wrong & probe])
        for method, maps in again.items():
            true_maps[method][wrong & probe] = maps

    perturbed = (where < perturbation_samples).to(device)
    size = tuple(images.shape[-2:])
    images01 = denormalize(images[probe], mean, std).clamp(0, 1)
    found = object_masks({k: v.to(device) for k, v in batch.items() if k in ("mask", "has_mask", "box", "has_box")}, size)
    objects = None if found is None else found[0]
    shown_wrong = wrong[probe]

    shard = Shard(
        positions=list(positions), labels=labels.tolist(), predictions=predictions.tolist(), probe_positions=where[probe_cpu].tolist(),
        index=(batch["index"] if "index" in batch else where)[probe_cpu].tolist(),
        label=labels[probe].tolist(), prediction=predictions[probe].tolist(),
        probability=probabilities[probe].gather(1, predictions[probe, None]).squeeze(1).tolist(),
        image=_to_uint8(images01), maps={}, overlay={}, overlay_predicted={}, perturbation={}, localisation={},
        coarse={},
    )
    for method in true_maps:
        shard.coarse[method] = normalised_maps(predicted_maps[method]).float().cpu()
        if method != RANDOM and probe.any():
            shard.maps[method] = true_maps[method][probe].cpu()
            shard.overlay[method] = list(overlay(images01, heatmap(true_maps[method][probe], size, signed=signed)))
            shard.overlay_predicted[method] = {}
            if shown_wrong.any():
                shown = heatmap(predicted_maps[method][probe][shown_wrong], size, signed=signed)
                tiles = overlay(images01[shown_wrong], shown)
                shard.overlay_predicted[method] = dict(zip(shown_wrong.nonzero().flatten().tolist(), tiles))
        if objects is not None:
            scores = localization(predicted_maps[method], objects, signed=signed, scores=LOCALISATION_KEYS)
            shard.localisation[method] = {k: v.cpu() for k, v in scores.items()}
    if perturbed.any():
        with forward_context():  # the trainer's autocast (bf16-mixed...), as in validation
            results = perturbation_aucs(
                pl_module, images[perturbed], {m: maps[perturbed] for m, maps in predicted_maps.items()},
                labels[perturbed], mean=mean, std=std, targets=predictions[perturbed],
                batch_size=perturbation_batch_size,
            )
        count = int(perturbed.sum())
        shard.perturbation = {m: (count, r.as_dict()) for m, r in results.items()}
    return shard


# ---------------------------------------------------------------------------- merging (global rank 0)
def merge(shards: Sequence[Shard | None], *, epoch: int, step: int, class_names: list[str] | None) -> EpochResult:
    """The ranks' shards as one result: probe rows in probe order, per-image values in stratified
    order, perturbation curves weighted by image count (the AUC is linear in the curve: exact)."""
    shards = [s for s in shards if s is not None]
    if not shards:
        raise RuntimeError("no rank explained any image (empty validation set?)")
    probe_order = sorted((p, r, i) for r, s in enumerate(shards) for i, p in enumerate(s.probe_positions))
    every = sorted((p, r, i) for r, s in enumerate(shards) for i, p in enumerate(s.positions))

    def rows(get):
        return [get(shards[r])[i] for _, r, i in probe_order]

    methods = list(shards[0].overlay)
    overlay_predicted = {}
    for method in methods:
        overlay_predicted[method] = {k: shards[r].overlay_predicted[method][i] for k, (_, r, i) in enumerate(probe_order)
                                     if i in shards[r].overlay_predicted[method]}
    perturbation = {}
    for method in shards[0].perturbation:
        parts = [s.perturbation[method] for s in shards if method in s.perturbation]
        total = sum(n for n, _ in parts)
        values = {}
        for key in (*CURVE_KEYS, *AUC_KEYS):
            mean = np.sum([np.asarray(v[key], dtype=np.float64) * n for n, v in parts], axis=0) / total
            values[key] = mean.tolist() if mean.ndim else float(mean)
        perturbation[method] = PerturbationResult(fractions=tuple(parts[0][1]["fractions"]), **values)
    localisation = {
        method: {score: np.array([float(shards[r].localisation[method][score][i]) for _, r, i in every])
                 for score in shards[0].localisation[method]}
        for method in shards[0].localisation
    }
    coarse = {m: torch.stack([shards[r].coarse[m][i] for _, r, i in every]) for m in shards[0].coarse}
    size = tuple(shards[0].image[0].shape[:2]) if shards[0].image else (0, 0)
    result = EpochResult(
        epoch=epoch, step=step, class_names=class_names, image_size=size,
        positions=[p for p, _, _ in probe_order], index=rows(lambda s: s.index), label=rows(lambda s: s.label),
        prediction=rows(lambda s: s.prediction), probability=rows(lambda s: s.probability),
        image=rows(lambda s: s.image), maps={m: rows(lambda s, m=m: s.maps[m]) for m in methods},
        overlay={m: rows(lambda s, m=m: s.overlay[m]) for m in methods}, overlay_predicted=overlay_predicted,
        perturbation=perturbation, localisation=localisation,
        labels=np.array([shards[r].labels[i] for _, r, i in every], dtype=np.int64),
        predictions=np.array([shards[r].predictions[i] for _, r, i in every], dtype=np.int64), coarse=coarse,
        all_positions=[p for p, _, _ in every],
    )
    return result


def signals_of(result: EpochResult, num_classes: int) -> dict[str, ShortcutSignals]:
    """The shortcut signals of every shown method, from the merged result's coarse maps."""
    labels = torch.as_tensor(result.labels)
    methods = [m for m in result.coarse if m != RANDOM]
    on_object = None
    random_on_object = None
    if result.localisation and all(m in result.localisation for m in methods):
        on_object = {m: torch.as_tensor(result.localisation[m]["relevance_on_object"]) for m in methods}
        if RANDOM in result.localisation:
            random_on_object = torch.as_tensor(result.localisation[RANDOM]["relevance_on_object"])
    signals = shortcut_signals({m: result.coarse[m] for m in methods}, labels, num_classes,
                               random_maps=result.coarse.get(RANDOM), on_object=on_object,
                               random_on_object=random_on_object)
    return signals


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    denominator = a.norm() * b.norm()
    return float((a @ b) / denominator) if denominator > 0 else float("nan")


def finite(values) -> list[float]:
    return [v for v in values if isinstance(v, float) and math.isfinite(v)]
