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

import copy
import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch

from vitlens.metrics.bootstrap import bootstrap_ci
from vitlens.metrics.localization import LocalizationScores, object_masks
from vitlens.metrics.perturbation import PAPER_FRACTIONS, TESTS, PerturbationResult, _perturbed_rows, _result
from vitlens.metrics.segmentation import SegmentationScores
from vitlens.relevance.heatmap import heatmap
from vitlens.relevance.registry import class_agnostic, registered, with_options

PRECISIONS = ("float32", "tf32", "bf16", "float64")  # the names of vitlens.relevance.PRECISIONS
SIGNED = ("positive", "absolute", "raw")  # how signed maps enter localisation (vitlens.relevance.heatmap)
# the built-in methods whose map does not depend on the explained class (``Method.class_agnostic``
# in vitlens.relevance.registry, which the evaluation reads, so registered methods count too):
# explained (and perturbed) once per image
CLASS_AGNOSTIC = frozenset(m.name for m in registered() if m.class_agnostic)


def check_precision(precision: str) -> str:
    """``precision`` in the vocabulary of ``vitlens.relevance.PRECISIONS`` (``"32"`` is read as float32)."""
    if precision == "32":
        return "float32"
    if precision not in PRECISIONS:
        hint = " (float16 is not offered: use bf16)" if precision in ("16", "fp16", "float16") else ""
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}{hint}")
    return precision


class PrecisionForward(torch.nn.Module):
    """``model``'s forward in ``precision`` (for the perturbation test's forwards).

    float32: full float32 matmuls whatever torch's global TF32 setting; tf32: TF32 matmuls
    (Ampere+ GPUs; float32 elsewhere); bf16: ``torch.autocast`` to bfloat16; float64: a
    float64 copy of the model (the model itself is left as it is).
    """

    def __init__(self, model: torch.nn.Module, precision: str):
        super().__init__()
        self.precision = check_precision(precision)
        self.model = copy.deepcopy(model).double() if self.precision == "float64" else model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from vitlens.relevance.backbone import float32_precision

        if self.precision == "float64":
            return self.model(images.double())
        if self.precision == "bf16":
            with torch.autocast(images.device.type, dtype=torch.bfloat16):
                return self.model(images)
        with float32_precision(self.precision == "tf32"):
            return self.model(images)


def json_safe(v):
    """``v`` with non-finite floats as None, through dicts, lists and tuples (strict JSON)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


@dataclass
class EvaluationReport:
    """Per-method scores (``methods[name][key]``), the curves, and what was evaluated."""

    methods: dict[str, dict[str, float | list[float]]]
    curves: dict[str, PerturbationResult] = field(repr=False)
    curves_target: dict[str, PerturbationResult] = field(repr=False)
    meta: dict = field(default_factory=dict)

    def to_json(self) -> str:
        clean = json_safe

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


def _clock(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class ProgressLine:
    """One progress line: ``evaluating  96/300 images  3.1 img/s  ETA 1:05``.

    On a terminal the line is rewritten in place; elsewhere (log files, CI) a whole line is
    printed at most every ``every`` seconds and at the end.
    """

    def __init__(self, total: int | None, enabled: bool = True, *, stream=None, label: str = "evaluating",
                 every: float = 15.0):
        self.total, self.enabled, self.label, self.every = total, enabled, label, every
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = 0
        self.start = time.perf_counter()
        self.last_print = -float("inf")
        self.printed = -1  # `done` when a whole line was last printed

    def text(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.done / elapsed
        of = f"/{self.total}" if self.total else ""
        line = f"{self.label}  {self.done}{of} images  {rate:.1f} img/s"
        if self.total and rate > 0 and self.done < self.total:
            line += f"  ETA {_clock((self.total - self.done) / rate)}"
        elif self.done:
            line += f"  took {elapsed:.1f} s"
        return line

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            self.stream.write("\r" + self.text() + "\033[K")
            self.stream.flush()
        elif now - self.last_print >= self.every:
            self.last_print, self.printed = now, self.done
            print(self.text(), file=self.stream, flush=True)

    def close(self) -> None:
        if not self.enabled or not self.done:
            return
        if self.tty:
            self.stream.write("\r" + self.text() + "\033[K\n")
        elif self.printed != self.done:
            print(self.text(), file=self.stream)
        self.stream.flush()


def evaluate_explanations(
    model: torch.nn.Module,
    batches: Iterable[dict],
    methods: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    limit: int | None = None,
    perturbation_batch_size: int = 64,
    precision: str = "float32",
    signed: str = "positive",
    fractions: Sequence[float] = PAPER_FRACTIONS,
    n_resamples: int = 1000,
    seed: int = 0,
    progress: bool = True,
    total_images: int | None = None,
    method_options: Mapping[str, Mapping] | None = None,
) -> EvaluationReport:
    """Explain and score every method on up to ``limit`` images of ``batches``.

    Args:
        model: a ``ViTClassifier`` or a timm ViT, on the device to run on.
        batches: batch dicts (``image``, ``label``, optional ``mask``/``has_mask``,
            ``box``/``has_box``), images normalised with ``mean``/``std``.
        methods: relevance method names (``vitlens.relevance.METHODS``; ``random`` is the
            chance level).
        perturbation_batch_size: perturbed images per forward pass.
        precision: ``"float32"``, ``"tf32"``, ``"bf16"`` or ``"float64"`` (the names of
            ``vitlens.relevance.PRECISIONS``) for the relevance pass and the perturbation
            forwards (see :class:`PrecisionForward`); ``"32"`` is read as float32.
        signed: how maps with negative values (LRP family) enter the localisation scores
            (pointing game, relevance on object, ROC AUC): ``"positive"`` (their positive part,
            as LRP papers show them; the default), ``"absolute"`` or ``"raw"`` (plain min-max,
            which puts a signed map's zero at mid-scale). Non-negative maps score the same
            under all three. The perturbation and segmentation tests always follow the paper
            (raw min-max; the perturbation test only uses the maps' order).
        n_resamples, seed: the bootstrap intervals (``n_resamples=0``: none).
        total_images: for the progress line's ETA.
        method_options: options per method (``{"transformer_attribution": {"start_layer": 0}}``).

    Cost: per batch, one relevance pass for all methods (predicted class), one more for the
    class-specific methods on the misclassified images (target class), one clean forward, and
    the perturbed forwards of every distinct map: a class-agnostic method's map
    (``Method.class_agnostic``) is perturbed once and serves both the predicted and the target
    class (their probabilities are read from the same logits).
    """
    from vitlens.relevance import explain_many

    precision = check_precision(precision)
    if signed not in SIGNED:
        raise ValueError(f"signed must be one of {', '.join(SIGNED)}, got {signed!r}")
    methods = list(dict.fromkeys(methods))
    requested = with_options(methods, method_options)
    agnostic = {m for m in methods if class_agnostic(m)}
    specific = [m for m in methods if m not in agnostic]
    device = next(model.parameters()).device
    forward_model = PrecisionForward(model, precision)
    pred_parts = {m: [] for m in methods}
    target_parts = {m: [] for m in methods}
    seg = {m: SegmentationScores() for m in methods}
    loc = {m: LocalizationScores() for m in methods}
    any_masks = any_boxes = False
    seen = correct = 0
    bar = ProgressLine(total_images if limit is None or total_images is None else min(total_images, limit), progress)
    fractions = tuple(float(f) for f in fractions)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            if limit is not None and seen >= limit:
                break
            take = len(batch["label"]) if limit is None else min(len(batch["label"]), limit - seen)
            images = batch["image"][:take].to(device)
            labels = batch["label"][:take].to(device)
            out = explain_many(model, images, requested, None, precision=precision)
            pred = out.targets
            correct += int((pred == labels).sum())
            wrong = (pred != labels).nonzero().flatten()
            out_target = (explain_many(model, images[wrong], {m: requested[m] for m in specific}, labels[wrong],
                                       precision=precision)
                          if len(wrong) and specific else None)
            with torch.inference_mode():  # one clean pass for every map and test
                clean_logits = forward_model(images)
                if isinstance(clean_logits, (tuple, list)):
                    clean_logits = clean_logits[0]
                clean_logits = clean_logits.float()
            clean_correct = clean_logits.argmax(1) == labels
            clean_prob = clean_logits.softmax(1)
            clean_pred_prob = clean_prob.gather(1, pred[:, None])[:, 0]
            clean_label_prob = clean_prob.gather(1, labels[:, None])[:, 0]
            # every distinct (image, map) once: the predicted-class map of each method (probability
            # read for the predicted and the true class), the true-class map of the class-specific
            # methods on the misclassified images
            both = torch.stack([pred, labels], 1)
            entries = [(images, labels, both, out.maps[m].float()) for m in methods]
            if out_target is not None:
                truth = torch.stack([labels[wrong], labels[wrong]], 1)
                entries += [(images[wrong], labels[wrong], truth, out_target.maps[m].float()) for m in specific]
            rel = [e[3] for e in entries]
            cors, probs = [None] * len(entries), [None] * len(entries)
            by_shape: dict[tuple, list[int]] = {}  # maps of one shape stream through one call
            for idx, e in enumerate(entries):
                by_shape.setdefault(tuple(e[3].shape[1:]), []).append(idx)
            for idxs in by_shape.values():
                sizes = [len(entries[i][0]) for i in idxs]
                c, p = _perturbed_rows(
                    forward_model, *(torch.cat([entries[i][part] for i in idxs]) for part in (0, 3, 1, 2)), mean, std,
                    fractions=fractions, batch_size=perturbation_batch_size, mode="pixels", fill="black",
                    patch_size=None, blur_sigma=8.0, tests=TESTS, clean=False)
                for i, ci, pi in zip(idxs, c.cpu().split(sizes), p.cpu().split(sizes)):
                    cors[i], probs[i] = ci, pi
            wrong_cpu = wrong.cpu()
            clean_c, clean_pp, clean_lp = clean_correct.cpu(), clean_pred_prob.cpu(), clean_label_prob.cpu()
            h, w = images.shape[-2:]
            # a sample's mask where it has one, else its box (the same rule as the callback's)
            found = object_masks({k: v[:take].to(device) for k, v in batch.items()
                                  if k in ("mask", "has_mask", "box", "has_box")}, (h, w))
            masks, valid = found if found is not None else (None, None)
            if "mask" in batch:
                any_masks |= bool(batch.get("has_mask", torch.ones(take, dtype=torch.bool))[:take].any())
            if "box" in batch:
                any_boxes |= bool(batch.get("has_box", torch.ones(take, dtype=torch.bool))[:take].any())
            for i, m in enumerate(methods):
                res = _result(cors[i], probs[i][..., 0], fractions, TESTS, clean=(clean_c, clean_pp))
                pred_parts[m].append(res)
                per = {k: v.clone() for k, v in res.per_image().items()}
                if len(wrong):
                    if m in agnostic:  # same map: the same rows, the true class's probability
                        res_t = _result(cors[i][wrong_cpu], probs[i][wrong_cpu][..., 1], fractions, TESTS,
                                        clean=(clean_c[wrong_cpu], clean_lp[wrong_cpu]))
                    else:
                        j = len(methods) + specific.index(m)
                        res_t = _result(cors[j], probs[j][..., 0], fractions, TESTS,
                                        clean=(clean_c[wrong_cpu], clean_lp[wrong_cpu]))
                    for key, v in res_t.per_image().items():
                        per[key][wrong_cpu] = v
                # correctly classified images: the target class is the predicted one
                target_parts[m].append(PerturbationResult.from_per_image(res.fractions, **per))
                if masks is not None and bool(valid.any()):
                    if "mask" in batch:
                        seg[m].update(heatmap(rel[i], (h, w)), batch["mask"][:take].to(device), batch.get(
                            "has_mask", torch.ones(take, dtype=torch.bool))[:take].to(device))
                    loc[m].add(rel[i], masks, valid, signed=signed)  # the callback's rule too
            seen += take
            bar.update(take)
    finally:
        bar.close()
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
            "precision": precision, "signed": signed, "bootstrap_resamples": n_resamples, "has_masks": any_masks,
            "has_boxes": any_boxes}
    return EvaluationReport(report, curves, curves_target, meta)

