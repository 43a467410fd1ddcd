"""The positive / negative perturbation test (Chefer et al. 2021, Table 1; spec section 5).

Defaults follow the paper exactly:

* the relevance map (patch grid or pixel resolution) is upsampled bilinearly and min-max
  normalised per image (:func:`vitlens.relevance.heatmap`);
* for each fraction ``f`` in 0.1 .. 0.9 the ``int(f * H * W)`` pixels with the highest
  (positive test) or lowest (negative test) map value are set to 0 in all three channels
  *in [0, 1] space* (in model space that is ``-mean / std``); every step starts from the
  clean image;
* accuracy is top-1 against the labels over all images (also those misclassified at the
  start); AUC is ``trapz(y, x) * 100`` over ``x = [0, 0.1, ..., 0.9]`` with ``y[0]`` the
  clean accuracy (maximum 90). Positive: lower is better; negative: higher is better.

Ties in the map are broken deterministically by a stable sort: among pixels with equal value,
the one with the smaller row-major index (top-left first) is removed first, in both tests.
(The authors' code uses ``torch.topk``, whose tie order is unspecified.)

Everything is batched: the pixel ranks are computed once per image with one sort, the mask
of a step is ``rank < k``, and all steps of all images (clean, positive, negative) stream
through the model in chunks of ``batch_size`` rows on the model's device under
``torch.inference_mode``. There is no Python loop over images.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from vitlens.data.normalization import denormalize, normalize
from vitlens.relevance.heatmap import heatmap

PAPER_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MODES = ("pixels", "patches")
FILLS = ("black", "mean", "blur")
TESTS = ("positive", "negative")


@dataclass
class PerturbationResult:
    """Curves and AUCs of the perturbation test.

    ``fractions`` is the x axis *including* the clean point 0.0, so every curve has
    ``len(fractions)`` entries and ``curve[0]`` is the clean value. Per-image tensors (on the
    CPU) keep what a bootstrap needs: ``pos_correct`` (N, S+1) bool, ``pos_target_probability``
    (N, S+1) float; the AUC is linear in them, so ``pos_auc == pos_auc_per_image.mean()`` and
    ``bootstrap_ci(result.pos_auc_per_image)`` is the bootstrap over images. Fields of a test
    that was not run are ``None``.
    """

    fractions: tuple[float, ...]
    pos_accuracy: list[float] | None = None
    neg_accuracy: list[float] | None = None
    pos_probability: list[float] | None = None
    neg_probability: list[float] | None = None
    pos_auc: float | None = None
    neg_auc: float | None = None
    pos_auc_probability: float | None = None
    neg_auc_probability: float | None = None
    pos_correct: torch.Tensor | None = field(default=None, repr=False)
    neg_correct: torch.Tensor | None = field(default=None, repr=False)
    pos_target_probability: torch.Tensor | None = field(default=None, repr=False)
    neg_target_probability: torch.Tensor | None = field(default=None, repr=False)

    @property
    def pos_auc_per_image(self) -> torch.Tensor | None:
        """(N,) each image's AUC of its 0/1 correctness curve; their mean is ``pos_auc``."""
        return None if self.pos_correct is None else _auc(self.pos_correct.double(), self.fractions)

    @property
    def neg_auc_per_image(self) -> torch.Tensor | None:
        return None if self.neg_correct is None else _auc(self.neg_correct.double(), self.fractions)

    @classmethod
    def from_per_image(cls, fractions: Sequence[float], **per_image: torch.Tensor | None) -> "PerturbationResult":
        """Curves and AUCs from per-image tensors (``pos_correct``, ``pos_target_probability``,
        ``neg_correct``, ``neg_target_probability``, each (N, S+1); a test's pair may be absent)."""
        result = cls(fractions=tuple(float(f) for f in fractions))
        for prefix in ("pos", "neg"):
            cor, pr = per_image.get(f"{prefix}_correct"), per_image.get(f"{prefix}_target_probability")
            if cor is None:
                continue
            acc, mp = cor.double().mean(0), pr.double().mean(0)
            setattr(result, f"{prefix}_accuracy", acc.tolist())
            setattr(result, f"{prefix}_probability", mp.tolist())
            setattr(result, f"{prefix}_auc", float(_auc(acc, result.fractions)))
            setattr(result, f"{prefix}_auc_probability", float(_auc(mp, result.fractions)))
            setattr(result, f"{prefix}_correct", cor)
            setattr(result, f"{prefix}_target_probability", pr)
        return result

    @classmethod
    def concat(cls, results: Sequence["PerturbationResult"]) -> "PerturbationResult":
        """One result over the images of several (e.g. the batches of a data set)."""
        if not results:
            raise ValueError("concat needs at least one PerturbationResult")
        if any(r.fractions != results[0].fractions for r in results):
            raise ValueError("cannot concatenate perturbation results with different fractions")
        keys = ("pos_correct", "pos_target_probability", "neg_correct", "neg_target_probability")
        per_image = {k: torch.cat([getattr(r, k) for r in results]) for k in keys
                     if getattr(results[0], k) is not None}
        return cls.from_per_image(results[0].fractions, **per_image)

    def per_image(self) -> dict[str, torch.Tensor]:
        """The per-image tensors of the tests that ran (the inverse of ``from_per_image``)."""
        keys = ("pos_correct", "pos_target_probability", "neg_correct", "neg_target_probability")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    def as_dict(self) -> dict:
        """Plain numbers (JSON-ready): fractions, curves and AUCs."""
        keys = ("pos_accuracy", "neg_accuracy", "pos_probability", "neg_probability", "pos_auc",
                "neg_auc", "pos_auc_probability", "neg_auc_probability")
        out = {"fractions": list(self.fractions)}
        out.update({k: getattr(self, k) for k in keys if getattr(self, k) is not None})
        return out


def _auc(curves: torch.Tensor, fractions: Sequence[float]) -> torch.Tensor:
    """trapz(y, x) * 100 along the last dimension."""
    x = torch.as_tensor(fractions, dtype=torch.float64, device=curves.device)
    return torch.trapezoid(curves.double(), x, dim=-1) * 100.0


def curve_auc(curve: Sequence[float], fractions: Sequence[float] = (0.0,) + PAPER_FRACTIONS) -> float:
    """The paper's AUC of one curve: ``trapz(curve, fractions) * 100`` (curve[0] is the clean value)."""
    if len(curve) != len(fractions):
        raise ValueError(f"curve has {len(curve)} points but fractions has {len(fractions)}")
    return float(_auc(torch.as_tensor(curve, dtype=torch.float64), fractions))


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _model_patch_size(model) -> int | None:
    for m in (model, getattr(model, "model", None)):
        embed = getattr(m, "patch_embed", None)
        if embed is not None and getattr(embed, "patch_size", None) is not None:
            ps = embed.patch_size
            ps = tuple(ps) if isinstance(ps, (tuple, list)) else (ps, ps)
            if ps[0] != ps[1]:
                raise ValueError(f"patches mode needs square patches, the model has {ps}")
            return int(ps[0])
    return None


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(3 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    c = images.shape[1]
    out = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def removal_ranks(heatmaps: torch.Tensor, *, descending: bool) -> torch.Tensor:
    """(B, H, W) maps -> (B, H*W) int64 removal order of each pixel (0 = removed first).

    One stable sort per image: equal values keep row-major order (top-left first).
    """
    flat = heatmaps.flatten(1)
    order = torch.sort(flat, dim=1, descending=descending, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


def perturbation_auc(
    model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    relevance: torch.Tensor,
    labels: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    targets: torch.Tensor | None = None,
    fractions: Sequence[float] = PAPER_FRACTIONS,
    batch_size: int = 64,
    mode: str = "pixels",
    fill: str = "black",
    patch_size: int | None = None,
    blur_sigma: float = 8.0,
    tests: Sequence[str] = TESTS,
) -> PerturbationResult:
    """Run the positive and negative perturbation tests on one set of images.

    Args:
        model: maps a normalised (B, 3, H, W) batch to logits: a timm model or a
            ``ViTClassifier``. Runs on its own device, in eval mode (its mode is restored).
        images: (N, 3, H, W) normalised with ``mean`` / ``std``.
        relevance: (N, h, w) raw maps (patch grid or pixel resolution).
        labels: (N,) ground-truth classes (accuracy is measured against them).
        mean, std: the normalisation of ``images`` (3 floats each).
        targets: (N,) the explained class of each image, for the probability curves
            (default: ``labels``).
        fractions: removed fractions (the paper's 0.1 .. 0.9 by default).
        batch_size: rows (perturbed images) per model call.
        mode: ``"pixels"`` (the paper) or ``"patches"``: whole patches ranked by their mean map
            value, ``int(f * number_of_patches)`` of them removed per step.
        fill: ``"black"`` (the paper: 0 in [0, 1] space), ``"mean"`` (the normalisation mean
            colour, i.e. 0 in model space) or ``"blur"`` (a Gaussian blur of the clean image,
            ``blur_sigma`` pixels).
        patch_size: for ``mode="patches"`` (default: the model's ``patch_embed.patch_size``).
        tests: which of ``"positive"`` / ``"negative"`` to run.
    """
    tests, fractions = _check_options(mode, fill, tests, fractions, batch_size)
    targets = _check_shapes(images, relevance, labels, targets)
    labels = torch.as_tensor(labels)
    correct, prob = _perturbed_rows(model, images, relevance, labels, targets[:, None], mean, std,
                                    fractions=fractions, batch_size=batch_size, mode=mode, fill=fill,
                                    patch_size=patch_size, blur_sigma=blur_sigma, tests=tests, clean=True)
    return _result(correct, prob[..., 0], fractions, tests, clean=None)


def _check_options(mode, fill, tests, fractions, batch_size) -> tuple[tuple[str, ...], tuple[float, ...]]:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    tests = tuple(tests)
    if not tests or any(t not in TESTS for t in tests):
        raise ValueError(f"tests must be a non-empty subset of {TESTS}, got {tests!r}")
    fractions = tuple(float(f) for f in fractions)
    if any(not 0.0 < f <= 1.0 for f in fractions):
        raise ValueError(f"fractions must lie in (0, 1], got {fractions}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return tests, fractions


def _check_shapes(images, relevance, labels, targets) -> torch.Tensor:
    """Validates the inputs of one set of maps; returns the targets (default: the labels)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}")
    n = images.shape[0]
    if relevance.dim() != 3 or relevance.shape[0] != n:
        raise ValueError(f"relevance must be ({n}, h, w) for {n} images, got shape {tuple(relevance.shape)}")
    labels = torch.as_tensor(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels must be ({n},), got shape {tuple(labels.shape)}")
    targets = labels if targets is None else torch.as_tensor(targets)
    if targets.shape != (n,):
        raise ValueError(f"targets must be ({n},), got shape {tuple(targets.shape)}")
    return targets


def perturbation_aucs(
    model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    relevance: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    targets: torch.Tensor | None = None,
    fractions: Sequence[float] = PAPER_FRACTIONS,
    batch_size: int = 64,
    mode: str = "pixels",
    fill: str = "black",
    patch_size: int | None = None,
    blur_sigma: float = 8.0,
    tests: Sequence[str] = TESTS,
) -> dict[str, PerturbationResult]:
    """:func:`perturbation_auc` of several maps of the same images (``relevance``: name -> (N, h, w)).

    The same numbers as one :func:`perturbation_auc` call per map, with fewer model rows: the
    clean images go through the model once for all maps (not once per map), and the perturbed
    rows of all maps of one shape stream through the model together, in full ``batch_size``
    chunks (a partial chunk per map is what makes small sets slow on a CPU).
    """
    tests, fractions = _check_options(mode, fill, tests, fractions, batch_size)
    if not relevance:
        return {}
    names = list(relevance)
    for name in names:
        targets = _check_shapes(images, relevance[name], labels, targets)
    labels = torch.as_tensor(labels)
    n = images.shape[0]
    device = _model_device(model) if isinstance(model, torch.nn.Module) else images.device
    was_training = model.training if isinstance(model, torch.nn.Module) else None
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        with torch.inference_mode():  # the clean point, once
            x = images.to(device)
            logits = torch.cat([_logits(model, x[i : i + batch_size]) for i in range(0, n, batch_size)])
    finally:
        if was_training:
            model.train()
    clean = (logits.argmax(1) == labels.to(device), logits.softmax(1).gather(1, targets.to(device)[:, None])[:, 0])
    out: dict[str, PerturbationResult] = {}
    by_shape: dict[tuple, list[str]] = {}
    for name in names:
        by_shape.setdefault(tuple(relevance[name].shape[1:]), []).append(name)
    for group in by_shape.values():
        k = len(group)
        correct, prob = _perturbed_rows(
            model, images.repeat(k, 1, 1, 1), torch.cat([relevance[m].to(images.device) for m in group]),
            labels.repeat(k), targets.repeat(k)[:, None], mean, std, fractions=fractions, batch_size=batch_size,
            mode=mode, fill=fill, patch_size=patch_size, blur_sigma=blur_sigma, tests=tests, clean=False)
        for name, c, p in zip(group, correct.split(n), prob.split(n)):
            out[name] = _result(c, p[..., 0], fractions, tests, clean=clean)
    return {name: out[name] for name in names}


def _logits(model, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.float()


def _result(correct: torch.Tensor, prob: torch.Tensor, fractions: tuple[float, ...], tests: Sequence[str],
            clean: tuple[torch.Tensor, torch.Tensor] | None) -> PerturbationResult:
    """Per-image rows -> a result. ``correct``/``prob`` (N, S): the clean column first unless
    ``clean`` = (correct (N,), prob (N,)) gives it separately (one clean pass shared by many maps)."""
    correct, prob = correct.cpu(), prob.cpu()
    if clean is not None:
        correct = torch.cat([clean[0].cpu().view(-1, 1), correct], 1)
        prob = torch.cat([clean[1].cpu().view(-1, 1).to(prob.dtype), prob], 1)
    per_image, col = {}, 1
    for name in TESTS:
        if name not in tests:
            continue
        idx = [0] + list(range(col, col + len(fractions)))
        col += len(fractions)
        prefix = "pos" if name == "positive" else "neg"
        per_image[f"{prefix}_correct"] = correct[:, idx]
        per_image[f"{prefix}_target_probability"] = prob[:, idx]
    return PerturbationResult.from_per_image((0.0,) + tuple(fractions), **per_image)


def _perturbed_rows(model, images, relevance, labels, targets, mean, std, *, fractions, batch_size, mode, fill,
                    patch_size, blur_sigma, tests, clean):
    """Every perturbed image (and the clean one first when ``clean``) through the model.

    ``targets`` (N, T): the classes whose probability is read from each row's logits (several
    per image, so one forward serves e.g. the predicted and the true class). Returns
    ``correct`` (N, S) bool against ``labels`` and ``prob`` (N, S, T), S = [1 +] 9 per test.
    """
    device = _model_device(model) if isinstance(model, torch.nn.Module) else images.device
    n, _, h, w = images.shape
    images = images.to(device)
    labels = labels.to(device)
    targets = targets.to(device)
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=device).view(1, 3, 1, 1)
    if mean_t.numel() != 3 or std_t.numel() != 3:
        raise ValueError(f"mean and std need 3 values each, got {list(mean)} and {list(std)}")

    if mode == "patches":
        patch_size = patch_size or (_model_patch_size(model) if isinstance(model, torch.nn.Module) else None)
        if not patch_size:
            raise ValueError("mode='patches' needs patch_size (the model has no patch_embed.patch_size)")
        if h % patch_size or w % patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of patch_size={patch_size}")
        n_units = (h // patch_size) * (w // patch_size)
    else:
        n_units = h * w
    # Number removed at each step, exactly int(f * H * W) (int(f * patches) in patches mode).
    counts = [int(f * n_units) for f in fractions]

    # Rows per image: clean (when asked), then every step of every test that runs.
    step_test = [0] * clean + [1] * len(counts) * ("positive" in tests) + [2] * len(counts) * ("negative" in tests)
    step_k = [0] * clean + counts * ("positive" in tests) + counts * ("negative" in tests)
    n_steps = len(step_k)
    step_test_t = torch.tensor(step_test, device=device)
    step_k_t = torch.tensor(step_k, device=device)

    was_training = model.training if isinstance(model, torch.nn.Module) else None
    if isinstance(model, torch.nn.Module):
        model.eval()
    correct = torch.empty(n, n_steps, dtype=torch.bool, device=device)
    prob = torch.empty(n, n_steps, targets.shape[1], dtype=torch.float32, device=device)
    try:
        with torch.inference_mode():
            # batch_size images per group: their n_steps * batch_size rows fill whole model calls
            group = batch_size
            for start in range(0, n, group):
                sl = slice(start, min(start + group, n))
                c, p = _run_group(
                    model, images[sl], relevance[sl].to(device), labels[sl], targets[sl],
                    mean_t, std_t, step_test_t, step_k_t, batch_size=batch_size, mode=mode,
                    fill=fill, patch_size=patch_size, blur_sigma=blur_sigma, size=(h, w),
                )
                correct[sl] = c
                prob[sl] = p
    finally:
        if was_training:
            model.train()
    return correct, prob


def _run_group(model, images, relevance, labels, targets, mean_t, std_t, step_test, step_k, *,
               batch_size, mode, fill, patch_size, blur_sigma, size):
    """All rows (clean + steps) of a few images -> (m, S) correctness and (m, S, T) target probabilities."""
    m = images.shape[0]
    h, w = size
    maps = heatmap(relevance, size)
    if mode == "patches":
        maps = F.avg_pool2d(maps.unsqueeze(1), patch_size).squeeze(1)
    ranks = torch.stack([removal_ranks(maps, descending=True), removal_ranks(maps, descending=False)])

    if fill == "black":
        fill_values = ((0.0 - mean_t) / std_t).expand(m, 3, h, w)
    elif fill == "mean":
        fill_values = torch.zeros_like(images)
    else:
        fill_values = normalize(_gaussian_blur(denormalize(images, mean_t.flatten(), std_t.flatten()), blur_sigma),
                                mean_t.flatten(), std_t.flatten())

    n_steps = step_k.shape[0]
    rows_image = torch.arange(m, device=images.device).repeat_interleave(n_steps)
    rows_step = torch.arange(n_steps, device=images.device).repeat(m)
    logits_correct = torch.empty(m * n_steps, dtype=torch.bool, device=images.device)
    logits_prob = torch.empty(m * n_steps, targets.shape[1], dtype=torch.float32, device=images.device)
    for start in range(0, m * n_steps, batch_size):
        r = slice(start, min(start + batch_size, m * n_steps))
        img_i, step_i = rows_image[r], rows_step[r]
        test_i = step_test[step_i]
        # Clean rows (test 0) use the positive ranks with k = 0: nothing removed.
        rank = ranks[(test_i - 1).clamp_min(0), img_i]
        remove = rank < step_k[step_i].unsqueeze(1)
        if mode == "patches":
            remove = remove.view(-1, 1, h // patch_size, w // patch_size)
            remove = remove.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)
        else:
            remove = remove.view(-1, 1, h, w)
        batch = torch.where(remove, fill_values[img_i], images[img_i])
        logits = model(batch)
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        logits = logits.float()
        logits_correct[r] = logits.argmax(1) == labels[img_i]
        logits_prob[r] = logits.softmax(1).gather(1, targets[img_i])
    return logits_correct.view(m, n_steps), logits_prob.view(m, n_steps, -1)
