"""Score relevance methods over a data set: the paper's Tables 1 and 2, localisation, CIs.

:func:`evaluate_explanations` streams batches (the DESIGN.md batch dicts), explains every
image once per method for the predicted class (one shared pass for all methods,
``vitlens.relevance.explain_many``) and, for the images the model gets wrong, once more for
the ground-truth class, then runs

* the perturbation test (spec section 5) for the predicted and the target class;
* the segmentation test (section 6) on samples with a mask;
* the localisation scores on samples with a mask (else their box).

:class:`EvaluationReport` holds the numbers and renders ``report.json`` / ``report.md``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from vitlens.metrics.bootstrap import bootstrap_ci
from vitlens.metrics.localization import LocalizationScores, object_masks
from vitlens.metrics.perturbation import PAPER_FRACTIONS, PerturbationResult, perturbation_auc
from vitlens.metrics.segmentation import SegmentationScores
from vitlens.relevance.heatmap import heatmap

AUTOCAST_DTYPES = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


class Autocast(torch.nn.Module):
    """Runs ``model``'s forward under ``torch.autocast`` (for the perturbation test's forwards)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.dtype is None:
            return self.model(images)
        with torch.autocast(images.device.type, dtype=self.dtype):
            return self.model(images)


@dataclass
class EvaluationReport:
    """Per-method scores (``methods[name][key]``), the curves, and what was evaluated."""

    methods: dict[str, dict[str, float | list[float]]]
    curves: dict[str, PerturbationResult] = field(repr=False)
    curves_target: dict[str, PerturbationResult] = field(repr=False)
    meta: dict = field(default_factory=dict)

    def to_json(self) -> str:
        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            return v

        out = {"meta": self.meta, "methods": self.methods,
               "curves": {m: {"predicted": self.curves[m].as_dict(), "target": self.curves_target[m].as_dict()}
                          for m in self.curves}}
        return json.dumps(clean(out), indent=2)

    def to_markdown(self) -> str:
        names = list(self.methods)

        def cell(method, key, scale):
            v = self.methods[method].get(key)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                return "–"
            ci = self.methods[method].get(f"{key}_ci")
            text = f"{v * scale:.2f}"
            if ci and ci[0] is not None and not math.isnan(ci[0]):
                text += f" [{ci[0] * scale:.1f}, {ci[1] * scale:.1f}]"
            return text

        def table(title, rows):
            lines = [f"### {title}", "", "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
            for label, key, scale in rows:
                lines.append(f"| {label} | " + " | ".join(cell(m, key, scale) for m in names) + " |")
            return lines + [""]

        m = self.meta
        lines = [f"# Relevance evaluation: {m.get('model', '')}", "",
                 f"{m.get('n_images', 0)} images ({m.get('split', '')} split of `{m.get('data', '')}`), "
                 f"top-1 accuracy {100 * m.get('accuracy', float('nan')):.2f}%. "
                 "Bootstrap 95% intervals over images in brackets.", ""]
        lines += table("Perturbation test (the paper's Table 1; AUC, x 100 fractions; positive: lower is "
                       "better, negative: higher is better)", [
                           ("negative AUC, predicted", "neg_auc", 1), ("positive AUC, predicted", "pos_auc", 1),
                           ("negative AUC, target", "neg_auc_target", 1), ("positive AUC, target", "pos_auc_target", 1),
                       ])
        if any("pixel_acc" in v for v in self.methods.values()):
            lines += table("Segmentation (the paper's Table 2, %)", [
                ("pixel accuracy", "pixel_acc", 100), ("mAP", "map", 100), ("mIoU", "miou", 100)])
        if any("pointing_game" in v for v in self.methods.values()):
            lines += table("Localisation (%)", [
                ("pointing game", "pointing_game", 100), ("relevance on object", "relevance_on_object", 100),
                ("ROC AUC of the map", "roc_auc", 100)])
        return "\n".join(lines)


def _progress(total: int | None, enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("explaining + scoring"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), transient=False)
    progress.start()
    task = progress.add_task("batches", total=total)
    return progress, task


def evaluate_explanations(
    model: torch.nn.Module,
    batches: Iterable[dict],
    methods: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    limit: int | None = None,
    perturbation_batch_size: int = 64,
    precision: str = "32",
    fractions: Sequence[float] = PAPER_FRACTIONS,
    n_resamples: int = 1000,
    seed: int = 0,
    progress: bool = True,
    total_batches: int | None = None,
) -> EvaluationReport:
    """Explain and score every method on up to ``limit`` images of ``batches``.

    Args:
        model: a ``ViTClassifier`` or a timm ViT, on the device to run on.
        batches: batch dicts (``image``, ``label``, optional ``mask``/``has_mask``,
            ``box``/``has_box``), images normalised with ``mean``/``std``.
        methods: relevance method names (``vitlens.relevance.METHODS``; ``random`` is the
            chance level).
        precision: ``"32"``, ``"bf16"`` or ``"16"``: autocast for the perturbation forwards
            (and bf16 matmuls for the relevance pass when ``"bf16"``).
        n_resamples, seed: the bootstrap intervals (``n_resamples=0``: none).
    """
    from vitlens.relevance import explain_many

    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision must be one of {list(AUTOCAST_DTYPES)}, got {precision!r}")
    methods = list(dict.fromkeys(methods))
    device = next(model.parameters()).device
    forward_model = Autocast(model, AUTOCAST_DTYPES[precision])
    explain_precision = "bf16" if precision == "bf16" else None
    pred_parts = {m: [] for m in methods}
    target_parts = {m: [] for m in methods}
    seg = {m: SegmentationScores() for m in methods}
    loc = {m: LocalizationScores() for m in methods}
    any_masks = any_boxes = False
    seen = correct = 0
    bar = _progress(total_batches, progress)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            if limit is not None and seen >= limit:
                break
            take = len(batch["label"]) if limit is None else min(len(batch["label"]), limit - seen)
            images = batch["image"][:take].to(device)
            labels = batch["label"][:take].to(device)
            out = explain_many(model, images, methods, None, precision=explain_precision)
            pred = out.targets
            correct += int((pred == labels).sum())
            wrong = (pred != labels).nonzero().flatten()
            out_target = (explain_many(model, images[wrong], methods, labels[wrong], precision=explain_precision)
                          if len(wrong) else None)
            h, w = images.shape[-2:]
            # a sample's mask where it has one, else its box (the same rule as the callback's)
            found = object_masks({k: v[:take].to(device) for k, v in batch.items()
                                  if k in ("mask", "has_mask", "box", "has_box")}, (h, w))
            masks, valid = found if found is not None else (None, None)
            if "mask" in batch:
                any_masks |= bool(batch.get("has_mask", torch.ones(take, dtype=torch.bool))[:take].any())
            if "box" in batch:
                any_boxes |= bool(batch.get("has_box", torch.ones(take, dtype=torch.bool))[:take].any())
            for m in methods:
                rel = out.maps[m].float()
                res = perturbation_auc(forward_model, images, rel, labels, mean, std, targets=pred,
                                       fractions=fractions, batch_size=perturbation_batch_size)
                pred_parts[m].append(res)
                per = {k: v.clone() for k, v in res.per_image().items()}
                if out_target is not None:
                    # correctly classified images: the target class is the predicted one
                    res_t = perturbation_auc(forward_model, images[wrong], out_target.maps[m].float(), labels[wrong],
                                             mean, std, fractions=fractions, batch_size=perturbation_batch_size)
                    for k, v in res_t.per_image().items():
                        per[k][wrong.cpu()] = v
                target_parts[m].append(PerturbationResult.from_per_image(res.fractions, **per))
                if masks is not None and bool(valid.any()):
                    maps = heatmap(rel, (h, w))
                    if "mask" in batch:
                        seg[m].update(maps, batch["mask"][:take].to(device), batch.get(
                            "has_mask", torch.ones(take, dtype=torch.bool))[:take].to(device))
                    loc[m].update(maps, masks, valid)
            seen += take
            if bar is not None:
                bar[0].update(bar[1], advance=1)
    finally:
        if bar is not None:
            bar[0].stop()
        if was_training:
            model.train()
    if seen == 0:
        raise ValueError("no images to evaluate (empty split or --limit 0)")

    report: dict[str, dict] = {}
    curves, curves_target = {}, {}

    def with_ci(scores: dict, key: str, value: float, per_image: torch.Tensor | None):
        scores[key] = value
        if per_image is not None and n_resamples > 0:
            scores[f"{key}_ci"] = list(bootstrap_ci(per_image, n_resamples=n_resamples, seed=seed))

    for m in methods:
        p = curves[m] = PerturbationResult.concat(pred_parts[m])
        t = curves_target[m] = PerturbationResult.concat(target_parts[m])
        scores: dict = {}
        with_ci(scores, "pos_auc", p.pos_auc, p.pos_auc_per_image)
        with_ci(scores, "neg_auc", p.neg_auc, p.neg_auc_per_image)
        with_ci(scores, "pos_auc_target", t.pos_auc, t.pos_auc_per_image)
        with_ci(scores, "neg_auc_target", t.neg_auc, t.neg_auc_per_image)
        scores["pos_auc_probability"] = p.pos_auc_probability
        scores["neg_auc_probability"] = p.neg_auc_probability
        if any_masks:
            s = seg[m].compute()
            scores["pixel_acc"] = s["pixel_acc"]
            scores["miou"] = s["miou"]
            with_ci(scores, "map", s["map"], seg[m].ap_per_image)
        if any_masks or any_boxes:
            l_scores, per = loc[m].compute(), loc[m].per_image
            for key in ("pointing_game", "relevance_on_object", "roc_auc"):
                with_ci(scores, key, l_scores[key], per[key])
            scores["n_localised"] = l_scores["n_images"]
        report[m] = scores
    meta = {"n_images": seen, "accuracy": correct / seen, "fractions": list(curves[methods[0]].fractions),
            "precision": precision, "bootstrap_resamples": n_resamples, "has_masks": any_masks,
            "has_boxes": any_boxes}
    return EvaluationReport(report, curves, curves_target, meta)
