"""Explain and score any checkpoint.

    python explain.py maps --ckpt RUN.ckpt --images photo.jpg birds/ 'more/*.png' --out maps/
    python explain.py maps --model vit_small_patch16_224 --weights vit_s16.safetensors --images a.jpg --out maps/
    python explain.py evaluate --ckpt RUN.ckpt --data.path data/toybirds --split val --limit 500 \\
        --methods transformer_attribution grad_rollout rollout random --out eval/
    python explain.py audit --ckpt RUN.ckpt --data.path data/toybirds_shortcut --split val --out audit/

``maps`` writes, per image, ``<name>.png`` (the image captioned with class and probability,
beside an overlay per method; one row per explained class), ``<name>.<method>.npy`` (the raw
maps: (h, w), or (k, h, w) with ``--topk k``), plus ``contact_sheet.png`` and ``index.json``.
``evaluate`` writes ``report.json``, ``report.md`` and ``perturbation_curves.png`` (see
``vitlens.metrics.evaluate``). ``audit`` looks for shortcuts (``vitlens.metrics.shortcut_audit``):
``audit.md``, ``audit.json`` and per-class mean maps / hotspot PNGs. Errors are one line on stderr with exit status 2
(``VITLENS_DEBUG=1`` shows the traceback).
"""
from __future__ import annotations

import glob
import json
import os
import sys
from pathlib import Path

DEFAULT_METHODS = ["transformer_attribution", "grad_rollout"]


class UserError(Exception):
    """A problem with the command's input, reported as one line."""


# ---------------------------------------------------------------------------- parser
def build_parser():
    from jsonargparse import ArgumentParser

    from vitlens.data import ImageDataModule

    def common(p):
        p.add_argument("--ckpt", type=str | None, default=None, help="a vitlens checkpoint (.ckpt)")
        p.add_argument("--methods", type=str, nargs="+", default=DEFAULT_METHODS,
                       help="relevance methods (vitlens.relevance.METHODS; 'random' = chance level)")
        p.add_argument("--out", type=str, required=True, help="output folder")
        p.add_argument("--device", type=str, default="cuda" if _cuda() else "cpu")
        p.add_argument("--batch-size", type=int, default=16, help="images per relevance pass")
        p.add_argument("--precision", type=str, default="32", choices=["32", "bf16", "16"])
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    maps = ArgumentParser(description="Relevance maps of images as PNG overlays and .npy arrays.")
    common(maps)
    maps.add_argument("--model", type=str | None, default=None, help="timm model name (instead of --ckpt)")
    maps.add_argument("--weights", type=str | None, default=None, help="weights file for --model")
    maps.add_argument("--img-size", type=int | None, default=None, help="input size for --model")
    maps.add_argument("--images", type=str, nargs="+", required=True, help="files, folders or globs")
    maps.add_argument("--target", type=str | None, default=None,
                      help="class name or index to explain (default: the predicted class)")
    maps.add_argument("--topk", type=int, default=1, help="explain each of the k most probable classes")
    maps.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    maps.add_argument("--colormap", type=str, default="jet")
    maps.add_argument("--resize", type=str, default="resize", choices=["resize", "center_crop"],
                      help="how images are brought to the model's size")
    maps.add_argument("--ncols", type=int, default=2, help="columns of the contact sheet")

    evaluate = ArgumentParser(description="Perturbation, segmentation and localisation scores of relevance methods.")
    common(evaluate)
    evaluate.add_class_arguments(ImageDataModule, "data", skip={"image_size", "mean", "std", "backbone",
                                                                "batch_size", "eval_batch_size"})
    evaluate.set_defaults({"data.eval_resize": "resize", "data.num_workers": 0})
    evaluate.add_argument("--split", type=str, default="val", choices=["train", "val", "test"])
    evaluate.add_argument("--limit", type=int | None, default=None, help="at most this many images")
    evaluate.add_argument("--perturbation-batch-size", type=int, default=64,
                          help="perturbed images per forward pass")
    evaluate.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (0: no intervals)")
    evaluate.add_argument("--wandb", action="store_true", help="also log to a W&B run (offline unless WANDB_MODE)")
    evaluate.add_argument("--wandb-project", type=str, default="vitlens")

    audit = ArgumentParser(description="Shortcut audit: per-class mean maps, off-object hotspots, a verdict per class.")
    common(audit)
    audit.add_class_arguments(ImageDataModule, "data", skip={"image_size", "mean", "std", "backbone",
                                                             "batch_size", "eval_batch_size"})
    audit.set_defaults({"data.eval_resize": "resize", "data.num_workers": 0})
    audit.add_argument("--split", type=str, default="val", choices=["train", "val", "test"])
    audit.add_argument("--limit", type=int | None, default=None, help="at most this many images")
    audit.add_argument("--thresholds", type=dict | None, default=None,
                       help="overrides of vitlens.metrics.shortcut.ShortcutThresholds, e.g. '{position_fire: 2.5}'")
    audit.add_argument("--examples", type=int, default=6, help="hotspot example images per suspected class")
    audit.add_argument("--wandb", action="store_true", help="also log to a W&B run (offline unless WANDB_MODE)")
    audit.add_argument("--wandb-project", type=str, default="vitlens")

    parser = ArgumentParser(prog="explain.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subcommands(dest="command")
    sub.add_subcommand("maps", maps)
    sub.add_subcommand("evaluate", evaluate)
    sub.add_subcommand("audit", audit)
    return parser


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------------------- models
def load_model(args, device):
    """(model, class_names, mean, std, image_size) from --ckpt or --model/--weights."""
    from vitlens.data import backbone_normalization
    from vitlens.models import create_backbone, load_classifier

    if args.ckpt and getattr(args, "model", None):
        raise UserError("give either --ckpt or --model/--weights, not both")
    if args.ckpt:
        model = load_classifier(args.ckpt, map_location=device)
        return model, list(model.class_names), model.mean, model.std, int(model.model.patch_embed.img_size[0])
    if not getattr(args, "model", None):
        raise UserError("no model: give --ckpt RUN.ckpt (or --model NAME --weights FILE)")
    num_classes = _head_classes(args.weights) if args.weights else 1000
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    vit = create_backbone(args.model, num_classes, weights=args.weights, **kwargs).to(device).eval()
    mean, std = backbone_normalization(args.model)
    return vit, _timm_class_names(num_classes), mean, std, int(vit.patch_embed.img_size[0])


def _head_classes(weights: str) -> int:
    from vitlens.models.weights import read_checkpoint_file, unwrap_state_dict

    state, _ = unwrap_state_dict(read_checkpoint_file(weights), source=str(weights))
    head = next((v for k, v in state.items() if k.endswith("head.weight")), None)
    return int(head.shape[0]) if head is not None else 1000


def _timm_class_names(num_classes: int) -> list[str]:
    if num_classes == 1000:
        try:
            from timm.data import ImageNetInfo

            info = ImageNetInfo()
            return [info.index_to_description(i).split(",")[0] for i in range(1000)]
        except Exception:  # older timm: indices
            pass
    return [str(i) for i in range(num_classes)]


def resolve_target(target: str | None, class_names: list[str]) -> int | None:
    if target is None:
        return None
    if target in class_names:
        return class_names.index(target)
    if target.lstrip("-").isdigit():
        index = int(target)
        if 0 <= index < len(class_names):
            return index
        raise UserError(f"--target {index} is out of range: the model has {len(class_names)} classes (0..{len(class_names) - 1})")
    shown = ", ".join(class_names[:10]) + (f", ... ({len(class_names)} in all)" if len(class_names) > 10 else "")
    raise UserError(f"--target {target!r} is not a class of this model; known classes: {shown}")


# ---------------------------------------------------------------------------- maps
def find_images(paths: list[str]) -> list[Path]:
    """Files, folders (their images, sorted, not recursive) and globs -> image paths."""
    from vitlens.data import IMAGE_EXTENSIONS

    found: list[Path] = []
    for p in paths:
        if any(c in p for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(p, recursive=True) if Path(m).is_file())
            if not matches:
                raise UserError(f"no file matches {p}")
            found += matches
        elif Path(p).is_dir():
            matches = sorted(f for f in Path(p).iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not matches:
                raise UserError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in folder {p}")
            found += matches
        elif Path(p).is_file():
            found.append(Path(p))
        else:
            raise UserError(f"image not found: {p}")
    return found


def _unique_names(paths: list[Path]) -> list[str]:
    """Output names: the file's stem, prefixed by its folder's name where stems repeat."""
    names, used = [], set()
    stems = [p.stem for p in paths]
    for p in paths:
        base = p.stem if stems.count(p.stem) == 1 else f"{p.parent.name}_{p.stem}"
        name, i = base, 1
        while name in used:
            name, i = f"{base}_{i}", i + 1
        used.add(name)
        names.append(name)
    return names


def run_maps(args) -> None:
    import numpy as np
    import torch

    from vitlens.data import denormalize, eval_transform, read_image
    from vitlens.relevance import explain_many
    from vitlens.relevance.display import contact_sheet, explanation_panel, save_png

    device = torch.device(args.device)
    model, class_names, mean, std, size = load_model(args, device)
    target = resolve_target(args.target, class_names)
    if args.topk < 1:
        raise UserError(f"--topk must be >= 1, got {args.topk}")
    topk = 1 if target is not None else min(args.topk, len(class_names))
    paths = find_images(args.images)
    names = _unique_names(paths)
    transform = eval_transform(size, mean, std, args.resize)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    precision = "bf16" if args.precision == "bf16" else None
    no_boxes = np.zeros((0, 4), np.float32)
    panels, index = [], []
    progress = _track(range(0, len(paths), args.batch_size), "explaining", not args.no_progress)
    for start in progress:
        chunk = paths[start:start + args.batch_size]
        images = torch.stack([torch.from_numpy(transform(image=read_image(p), bboxes=no_boxes, box_ids=[])["image"]).permute(2, 0, 1)
                              for p in chunk]).to(device)
        with torch.inference_mode():
            logits = model(images).float()
        probs = logits.softmax(1)
        if target is not None:
            classes = torch.full((len(chunk), 1), target, device=device)
        else:
            classes = probs.topk(topk, dim=1).indices
        maps = [explain_many(model, images, args.methods, classes[:, k], precision=precision).maps
                for k in range(classes.shape[1])]
        images01 = denormalize(images.cpu(), mean, std).clamp(0, 1)
        for i, (p, name) in enumerate(zip(chunk, names[start:start + len(chunk)])):
            rows = []
            for k in range(classes.shape[1]):
                c = int(classes[i, k])
                title = f"{class_names[c]} {float(probs[i, c]):.2f}"
                rows.append(explanation_panel(images01[i], {m: maps[k][m][i].float().cpu() for m in args.methods},
                                              title, alpha=args.alpha, colormap=args.colormap))
            panel = np.concatenate(rows, axis=0)
            save_png(panel, out / f"{name}.png")
            panels.append(panel)
            for m in args.methods:
                arr = torch.stack([maps[k][m][i] for k in range(classes.shape[1])]).float().cpu().numpy()
                np.save(out / f"{name}.{m}.npy", arr[0] if classes.shape[1] == 1 else arr)
            index.append({"image": str(p), "name": name,
                          "predicted": class_names[int(probs[i].argmax())],
                          "probability": float(probs[i].max()),
                          "explained": [{"class": class_names[int(c)], "index": int(c), "probability": float(probs[i, c])}
                                        for c in classes[i]]})
    save_png(contact_sheet(panels, args.ncols), out / "contact_sheet.png")
    (out / "index.json").write_text(json.dumps({"methods": args.methods, "images": index}, indent=2))
    print(f"wrote {len(paths)} overlays, {len(paths) * len(args.methods)} maps and contact_sheet.png to {out}")


def _track(iterable, description: str, enabled: bool):
    if not enabled:
        return iterable
    from rich.progress import track

    return track(iterable, description=description, transient=False)


# ---------------------------------------------------------------------------- evaluate
def run_evaluate(args) -> None:
    import torch

    from vitlens.data import ImageDataModule
    from vitlens.metrics.evaluate import evaluate_explanations
    from vitlens.relevance.display import plot_perturbation_curves

    if not args.ckpt:
        raise UserError("evaluate needs --ckpt RUN.ckpt")
    device = torch.device(args.device)
    model, class_names, mean, std, size = load_model(args, device)
    data_args = dict(args.data)
    dm = ImageDataModule(**data_args, image_size=size, mean=mean, std=std, batch_size=1,
                         eval_batch_size=args.batch_size)
    if list(dm.class_names) != class_names:
        raise UserError(f"{args.data.path} has classes {_short(dm.class_names)} but the checkpoint "
                        f"{args.ckpt} has {_short(class_names)}")
    dm.setup("fit" if args.split != "test" else "test")
    dataset = {"train": dm.train_dataset, "val": dm.val_dataset, "test": dm.test_dataset}[args.split]
    if dataset is None:
        raise UserError(f"{args.data.path} has no {args.split} split")
    if args.split == "train":  # explain un-augmented training images
        dataset.transform = dm.eval_transform()
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.data.num_workers)
    n = len(dataset) if args.limit is None else min(len(dataset), args.limit)
    report = evaluate_explanations(model, loader, args.methods, mean, std, limit=args.limit,
                                   perturbation_batch_size=args.perturbation_batch_size, precision=args.precision,
                                   n_resamples=args.bootstrap, progress=not args.no_progress,
                                   total_batches=-(-n // args.batch_size))
    report.meta.update(model=Path(args.ckpt).name, checkpoint=str(args.ckpt), data=str(args.data.path),
                       split=args.split, methods=list(args.methods))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(report.to_json())
    (out / "report.md").write_text(report.to_markdown())
    fig = plot_perturbation_curves(report.curves, out / "perturbation_curves.png",
                                   title=f"{Path(args.ckpt).name}: {report.meta['n_images']} {args.split} images")
    if args.wandb:
        log_to_wandb(report, fig, out, args)
    print(report.to_markdown())
    print(f"\nwrote report.json, report.md and perturbation_curves.png to {out}")


def _short(names, limit: int = 8) -> str:
    names = list(names)
    return "[" + ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "") + "]"


def log_to_wandb(report, fig, out: Path, args) -> None:
    """One W&B run (offline unless WANDB_MODE says otherwise) with the report's numbers, table and curves."""
    import wandb

    from vitlens.relevance.display import figure_to_array

    run = wandb.init(project=args.wandb_project, dir=str(out), job_type="explain-evaluate",
                     mode=os.environ.get("WANDB_MODE", "offline"), config={**report.meta})
    try:
        flat = {f"eval/{m}/{k}": v for m, scores in report.methods.items() for k, v in scores.items()
                if isinstance(v, (int, float))}
        run.log(flat)
        run.summary.update(flat)
        keys = sorted({k for s in report.methods.values() for k, v in s.items() if isinstance(v, (int, float))})
        table = wandb.Table(columns=["method"] + keys,
                            data=[[m] + [s.get(k) for k in keys] for m, s in report.methods.items()])
        run.log({"eval/report": table, "eval/perturbation_curves": wandb.Image(figure_to_array(fig))})
    finally:
        run.finish()


# ---------------------------------------------------------------------------- audit
def run_audit(args) -> None:
    """Thin: the analysis and the report are vitlens.metrics.shortcut_audit."""
    import torch

    from vitlens.metrics.shortcut import ShortcutThresholds
    from vitlens.metrics.shortcut_audit import audit_checkpoint

    if not args.ckpt:
        raise UserError("audit needs --ckpt RUN.ckpt")
    device = torch.device(args.device)
    model, class_names, mean, std, size = load_model(args, device)
    report = audit_checkpoint(model, class_names, mean, std, size, data_args=dict(args.data), split=args.split,
                              methods=args.methods, out=args.out, batch_size=args.batch_size, limit=args.limit,
                              precision="bf16" if args.precision == "bf16" else None,
                              thresholds=ShortcutThresholds.from_options(args.thresholds), examples=args.examples,
                              use_wandb=args.wandb, wandb_project=args.wandb_project, checkpoint=args.ckpt)
    for method in report.methods:
        found = report.suspected[method]
        print(f"{method}: " + (f"shortcut suspected for {', '.join(found)}" if found else "no shortcut suspected"))
    print(f"wrote audit.md, audit.json and PNGs to {args.out}")


# ---------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command
    sub_args = args[command]
    try:
        from vitlens.relevance import METHODS

        unknown = [m for m in sub_args.methods if m not in METHODS]
        if unknown:
            raise UserError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
        {"maps": run_maps, "evaluate": run_evaluate, "audit": run_audit}[command](sub_args)
    except (UserError, ValueError, OSError, KeyError, TypeError) as error:
        if os.environ.get("VITLENS_DEBUG"):
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        if isinstance(error, KeyError):
            message = f"missing key {message}"
        print(f"explain.py {command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
