"""``explain.py audit``: the shortcut analysis over a whole split of a trained checkpoint.

Writes, under ``out``: ``audit.md`` (a verdict per class and method, the hotspots), ``audit.json``
(the numbers), ``mean_maps.<method>.png`` (each class's mean map, in image coordinates) and for
every suspected class ``hotspots.<method>.<class>.png`` (the class's images with the most
relevance in its hotspot, overlaid with their map and the hotspot's box); with ``wandb=True``
also one W&B run (offline unless WANDB_MODE says otherwise). The signals and verdicts are
:func:`vitlens.metrics.shortcut.audit_shortcuts`: the same analysis as the training callback's.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from vitlens.metrics.shortcut import AuditReport, ShortcutThresholds, audit_shortcuts

__all__ = ["audit_checkpoint", "write_audit"]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def audit_checkpoint(model: torch.nn.Module, class_names: Sequence[str], mean, std, image_size: int, *,
                     data_args: dict, split: str, methods: Sequence[str], out: str | Path, batch_size: int = 32,
                     limit: int | None = None, precision: str | None = None,
                     thresholds: ShortcutThresholds | None = None, examples: int = 6, use_wandb: bool = False,
                     wandb_project: str = "vitlens", checkpoint: str = "",
                     method_options: dict | None = None) -> AuditReport:
    """Load ``split`` of the data set ``data_args`` describes, audit it, write the report (see the module doc)."""
    from vitlens.data import ImageDataModule

    dm = ImageDataModule(**data_args, image_size=image_size, mean=mean, std=std, batch_size=1,
                         eval_batch_size=batch_size)
    if list(dm.class_names) != list(class_names):
        raise ValueError(f"{data_args.get('path')} has classes {list(dm.class_names)[:8]} but the checkpoint has "
                         f"{list(class_names)[:8]}: audit a data set with the checkpoint's classes")
    dm.setup("fit" if split != "test" else "test")
    dataset = {"train": dm.train_dataset, "val": dm.val_dataset, "test": dm.test_dataset}[split]
    if dataset is None:
        raise ValueError(f"{data_args.get('path')} has no {split} split")
    if split == "train":  # audit un-augmented training images
        dataset.transform = dm.eval_transform()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=data_args.get("num_workers", 0))
    report = audit_shortcuts(model, loader, methods, class_names, thresholds=thresholds, limit=limit,
                             precision=precision, examples=examples, method_options=method_options)
    report.meta.update(model=Path(checkpoint).name if checkpoint else type(model).__name__, checkpoint=str(checkpoint),
                       data=str(data_args.get("path")), split=split, methods=list(report.methods))
    write_audit(report, out, model=model, dataset=dataset, mean=mean, std=std, precision=precision)
    if use_wandb:
        _log_to_wandb(report, Path(out), wandb_project)
    return report


def write_audit(report: AuditReport, out: str | Path, *, model=None, dataset=None, mean=None, std=None,
                precision: str | None = None) -> dict[str, str]:
    """audit.md, audit.json and the PNGs; returns {name: file} of the pictures."""
    from vitlens.relevance.display import caption, colorize, contact_sheet, save_png, upscale

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images: dict[str, str] = {}
    for method in report.methods:
        position = report.signals[method].position
        tiles = []
        for c, name in enumerate(report.class_names):
            if position.counts[c] == 0:
                continue
            m = position.mean_maps[c].float()
            m = (m / m.max()).clamp(0, 1) if float(m.max()) > 0 else m
            tile = upscale(colorize(m[None].numpy())[0], 128)
            tiles.append(caption(tile, f"{name[:18]} {position.lift[c]:.1f}x"))
        if tiles:
            file = f"mean_maps.{_safe(method)}.png"
            save_png(contact_sheet(tiles, ncols=min(8, len(tiles))), out / file)
            images[method] = file
        if model is not None and dataset is not None:
            for name in report.suspected[method]:
                indices = report.examples[method].get(name, [])
                if not indices:
                    continue
                c = report.class_names.index(name)
                sheet = _hotspot_sheet(model, dataset, indices, method, c, position.box[c], mean, std, precision,
                                       report.meta.get("method_options", {}).get(method, {}))
                file = f"hotspots.{_safe(method)}.{_safe(name)}.png"
                save_png(sheet, out / file)
                images[f"{method}/{name}"] = file
    (out / "audit.md").write_text(report.to_markdown(images))
    (out / "audit.json").write_text(json.dumps(_json(report), indent=1))
    return images


def _hotspot_sheet(model, dataset, indices, method, label, box, mean, std, precision, options=None):
    from vitlens.data import denormalize
    from vitlens.relevance import explain_many
    from vitlens.relevance.display import caption, contact_sheet, overlay, upscale

    device = next(model.parameters()).device
    samples = [dataset[int(i)] for i in indices]
    images = torch.stack([s["image"] for s in samples]).to(device)
    maps = explain_many(model, images, {method: dict(options or {})}, torch.full((len(samples),), label, device=device),
                        precision=precision).maps[method].float()
    tiles = overlay(denormalize(images.cpu(), mean, std).clamp(0, 1), maps.cpu())
    h, w = tiles.shape[1:3]
    x0, y0, x1, y1 = round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)
    out = []
    for tile, i in zip(tiles, indices):
        tile = tile.copy()
        x1c, y1c = min(x1, w) - 1, min(y1, h) - 1
        for x, y in ((slice(x0, x1c + 1), y0), (slice(x0, x1c + 1), y1c)):
            tile[y, x] = (255, 255, 255)
        for y, x in ((slice(y0, y1c + 1), x0), (slice(y0, y1c + 1), x1c)):
            tile[y, x] = (255, 255, 255)
        out.append(caption(upscale(tile, 128), f"#{int(i)}"))
    return contact_sheet(out, ncols=min(6, len(out)))


def _json(report: AuditReport) -> dict:
    from vitlens.metrics.evaluate import json_safe as clean

    methods = {}
    for m in report.methods:
        s = report.signals[m]
        per_class = {}
        for c, name in enumerate(report.class_names):
            per_class[name] = {
                "images": s.position.counts[c], "recognition": report.recognition[c], "position_lift": s.position.lift[c], "position_ratio": s.position.ratio[c],
                "peak_mass": s.position.peak_mass[c], "chance_mass": s.position.chance_mass[c],
                "hotspot": s.position.region[c], "hotspot_box": list(s.position.box[c]),
                "object_share": None if s.objects is None else s.objects.share[c],
                "object_ratio": None if s.objects is None else s.objects.ratio[c],
                "verdict": report.verdicts[m][name], "examples": report.examples[m].get(name, []),
            }
        methods[m] = {"suspected": report.suspected[m], "classes": per_class}
    return clean({"meta": report.meta, "thresholds": report.thresholds.__dict__, "methods": methods})


def _log_to_wandb(report: AuditReport, out: Path, project: str) -> None:
    import wandb

    run = wandb.init(project=project, dir=str(out), job_type="explain-audit",
                     mode=os.environ.get("WANDB_MODE", "offline"), config={**report.meta})
    try:
        rows = []
        for m in report.methods:
            s = report.signals[m]
            for c, name in enumerate(report.class_names):
                rows.append([m, name, s.position.counts[c], s.position.lift[c], s.position.region[c],
                             None if s.objects is None else s.objects.ratio[c], report.verdicts[m][name]])
        payload = {"audit/classes": wandb.Table(columns=["method", "class", "images", "position_lift", "hotspot",
                                                         "object_ratio", "verdict"], data=rows)}
        for png in sorted(out.glob("*.png")):
            payload[f"audit/{png.stem}"] = wandb.Image(str(png))
        run.log(payload)
        run.summary.update({f"audit/{m}/suspected": report.suspected[m] for m in report.methods})
        if any(report.suspected.values()):
            run.alert(title="vitlens audit: shortcut suspected",
                      text="; ".join(f"{m}: {', '.join(v)}" for m, v in report.suspected.items() if v),
                      level=wandb.AlertLevel.WARN, wait_duration=0)
    finally:
        run.finish()
