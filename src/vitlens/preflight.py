"""Preflight: everything that would stop or silently spoil a run, checked before it starts.

`preflight(datamodule, model, callbacks)` runs before the logger creates a W&B run and before
epoch 1 (train.py calls it from `before_fit` / `before_validate` / `before_test`). It indexes
the data (`datamodule.setup`), opens every listed image and mask cheaply (header only, in
threads, with a progress line on large sets; full decoding stays with `data.skip_corrupt`),
validates boxes and masks against the image sizes, reports image-like files the readers cannot
read, and checks the model against the data (classes, image size vs patch size) and the
explanation callback against the model (its methods run once on one blank image). Every
finding is one line naming the file, row or key and the fix; `PreflightError` carries them all.
A val split smaller than the callback's probe or perturbation set is no error: the callback
explains the whole split, and one `note:` line says so.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

from vitlens.data.errors import DataError, one_line

__all__ = ["PreflightError", "check_files", "preflight"]

# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse)
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_PROGRESS_FROM = 2000  # files; below this the check is quiet
_SHOWN = 5  # findings of one kind listed before "... and N more"


class PreflightError(DataError):
    """One or more findings, one line each (`findings`); the message joins them."""

    def __init__(self, findings: list[str]):
        self.findings = list(findings)
        super().__init__("\n".join(self.findings))


def _size(path: str) -> tuple[int, int]:
    """(width, height) as read_image will return the image: header only, EXIF orientation applied."""
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
        try:
            orientation = image.getexif().get(0x0112)
        except Exception:  # noqa: BLE001 - a broken EXIF block: read_image ignores it too
            orientation = None
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


def _check_sample(sample) -> list[str]:
    problems = []
    try:
        width, height = _size(sample.path)
    except FileNotFoundError:
        return [f"{sample.path}: image file not found"]
    except Exception as error:  # noqa: BLE001 - any decoder error names the file
        return [f"{sample.path}: not a readable image ({one_line(error)}); remove it, replace it, "
                "or set data.skip_corrupt true to drop unreadable images"]
    if sample.mask is not None:
        try:
            mask_size = _size(sample.mask)
        except Exception as error:  # noqa: BLE001
            problems.append(f"{sample.mask}: mask of {sample.path} is not a readable image ({one_line(error)})")
        else:
            if mask_size != (width, height):
                problems.append(f"{sample.mask}: mask is {mask_size[0]}x{mask_size[1]} px but its image {sample.path} is "
                                f"{width}x{height}; masks must have their image's size (after EXIF rotation)")
    if sample.box is not None:
        x0, y0, x1, y1 = sample.box
        tol = 1.0  # a pixel of rounding in annotation tools
        if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
            problems.append(f"{sample.path}: box x,y,w,h = {x0:g},{y0:g},{x1 - x0:g},{y1 - y0:g} reaches outside the "
                            f"{width}x{height} image; fix the box (pixels of the image as shown, origin top left)")
    return problems


def check_files(samples, *, workers: int = 8, label: str = "images", progress: bool | None = None) -> list[str]:
    """Header-check every sample's image (and mask, box) in threads; findings, one line each."""
    samples = list(samples)
    if progress is None:
        progress = len(samples) >= _PROGRESS_FROM and int(os.environ.get("LOCAL_RANK", "0")) == 0
    findings: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, problems in enumerate(pool.map(_check_sample, samples, chunksize=32), start=1):
            findings += problems
            if progress and (i % 1000 == 0 or i == len(samples)):
                print(f"preflight: checked {i}/{len(samples)} {label}", file=sys.stderr, flush=True)
    return findings


def _summarise(findings: list[str], what: str) -> list[str]:
    if len(findings) <= _SHOWN:
        return findings
    return findings[:_SHOWN] + [f"... and {len(findings) - _SHOWN} more {what} like these"]


def _data_findings(datamodule) -> list[str]:
    findings = []
    info = datamodule._info
    unsupported = getattr(info, "unsupported", None) or {}
    if unsupported:
        counts = ", ".join(f"{len(paths)} {ext}" for ext, paths in sorted(unsupported.items()))
        example = next(iter(sorted(unsupported.items())))[1][0]
        line = (f"{datamodule.path}: {counts} file(s) this reader cannot decode (e.g. {example}); "
                "convert them to JPEG or PNG, or move them out of the data folder")
        if datamodule.hparams.skip_corrupt:
            import warnings

            warnings.warn(f"skip_corrupt: skipping {line}", stacklevel=2)
        else:
            findings.append(line + " (or set data.skip_corrupt true to skip them)")
    if datamodule.num_classes < 2:
        findings.append(f"{datamodule.path}: only one class ({', '.join(datamodule.class_names)}); a classifier needs at "
                        "least 2 classes (one folder per class, or a label column with 2+ values)")
    splits = [("train", datamodule.train_dataset), ("val", datamodule.val_dataset), ("test", datamodule.test_dataset)]
    samples = [s for _, d in splits if d is not None for s in d.samples]
    workers = min(16, (os.cpu_count() or 2) * 2)
    findings += _summarise(check_files(samples, workers=workers), "files")
    return findings


def _model_findings(datamodule, model) -> list[str]:
    if model is None:
        return []
    findings = []
    weights = (getattr(model, "hparams", None) or {}).get("weights")
    if (isinstance(weights, str) and weights != "timm" and not getattr(model, "_initial_weights_loaded", True)
            and not Path(weights).is_file()):
        findings.append(f"model.weights: weights file not found: {weights}; give the path of a local weights file "
                        "(--model.weights FILE) or leave it out to train from scratch")
    backbone = getattr(model, "model", model)
    patch = getattr(getattr(backbone, "patch_embed", None), "patch_size", None)
    if patch is not None and datamodule is not None:
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
        size = datamodule.image_size
        if size % ph or size % pw:
            fit = max(ph, (size // ph) * ph)
            findings.append(f"data.image_size={size} is not a multiple of the model's patch size {ph}; relevance maps "
                            f"need whole patches: use --data.image_size {fit} (or {fit + ph})")
    names = getattr(model, "class_names", None)
    if datamodule is not None and names is not None and list(names) != list(datamodule.class_names):
        findings.append(f"the model's {len(names)} classes ({', '.join(map(str, names[:5]))}{', ...' if len(names) > 5 else ''}) "
                        f"differ from the {datamodule.num_classes} classes of {datamodule.path}")
    return findings


def _callback_findings(datamodule, model, callbacks, notes: list[str] | None = None) -> list[str]:
    """Findings (errors) of the explanation callback against the model; into `notes`, a val split
    smaller than its probe or perturbation set (the callback then explains the whole split)."""
    try:
        from vitlens.callbacks import ExplanationCallback
    except ImportError:  # pragma: no cover
        return []
    findings = []
    for callback in callbacks or ():
        if not isinstance(callback, ExplanationCallback):
            continue
        val = datamodule.val_dataset if datamodule is not None else None
        n_val = len(val) if val is not None else 0
        over = [f"{key}={getattr(callback, key, 0)}" for key in ("num_samples", "perturbation_samples")
                if val is not None and 0 < n_val < getattr(callback, key, 0)]
        if over and notes is not None:
            notes.append(f"the val split has {n_val} images, fewer than ExplanationCallback's {' and '.join(over)}: "
                         f"all {n_val} are explained every epoch (more val images give steadier explanation metrics)")
        if model is not None and datamodule is not None:
            findings += _dry_run(callback, model, datamodule.image_size)
    return findings


def _dry_run(callback, model, image_size: int) -> list[str]:
    """Each of the callback's methods once on one blank image: what would switch it off after epoch 1."""
    import torch

    from vitlens.relevance import explain

    findings = []
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return findings
    images = torch.zeros(1, 3, image_size, image_size, device=device)
    for method in callback.methods:
        try:
            explain(model, images, method, targets=0, **getattr(callback, "method_options", {}).get(method, {}))
        except Exception as error:  # noqa: BLE001 - name the method and the model
            depth = len(getattr(getattr(model, "model", model), "blocks", ()))
            findings.append(f"ExplanationCallback method {method!r} cannot run on this model (depth {depth}, "
                            f"image {image_size} px): {one_line(error)}; choose other methods or change the model")
    return findings


def preflight(datamodule=None, model=None, callbacks=(), *, stage: str = "fit") -> None:
    """Raise `PreflightError` (all findings) unless the data, model and callbacks fit together."""
    findings: list[str] = []
    if datamodule is not None:
        datamodule.setup(stage)  # DataError here is already one line naming the culprit
        findings += _data_findings(datamodule)
    findings += _model_findings(datamodule, model)
    notes: list[str] = []
    if stage == "fit":
        findings += _callback_findings(datamodule, model, callbacks, notes)
    if findings:
        raise PreflightError(findings)
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0:
        for note in notes:
            print(f"note: {note}", file=sys.stderr, flush=True)
