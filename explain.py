"""Explain and score any checkpoint.

    python explain.py maps --ckpt RUN.ckpt --images photo.jpg birds/ 'more/*.png' --out maps/
    python explain.py maps --model vit_small_patch16_224 --weights vit_s16.safetensors --images a.jpg --out maps/
    python explain.py evaluate --ckpt RUN.ckpt --data.path data/toybirds --split val --limit 500 \\
        --methods transformer_attribution grad_rollout rollout random --out eval/
    python explain.py maps --ckpt RUN.ckpt --images a.jpg --methods transformer_attribution attnlrp \\
        --option transformer_attribution.start_layer=0 --option attnlrp.resolution=patch --out maps/
    python explain.py methods          # every relevance method, its options and their defaults

``maps`` writes, per image, ``<name>.png`` (the image captioned with class and probability,
beside an overlay per method; one row per explained class), ``<name>.<method>.npy`` (the raw
maps: (h, w), or (k, h, w) with ``--topk k``), plus ``contact_sheet.png`` and ``index.json``.
``evaluate`` writes ``report.json``, ``report.md`` and ``perturbation_curves.png`` (see
``vitlens.metrics.evaluate``) on the split the checkpoint was trained with (its saved data
settings; ``--data.*`` overrides them, ``vitlens.data.from_checkpoint``). ``audit`` looks for
shortcuts on that split (``vitlens.metrics.shortcut_audit``): ``audit.md``, ``audit.json`` and
per-class mean maps / hotspot PNGs. ``methods`` lists the registered relevance methods
(``vitlens.relevance.registry``). Errors are one line on stderr with exit status 2
(``VITLENS_DEBUG=1`` shows the traceback).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no update check (and its warning) on every run

DEFAULT_METHODS = ["transformer_attribution", "grad_rollout"]
# the names of vitlens.relevance.PRECISIONS (not imported here: `--help` must not load torch)
PRECISIONS = ("float32", "tf32", "bf16", "float64")
SIGNED = ("positive", "absolute", "raw")


class UserError(Exception):
    """A problem with the command's input, reported as one line."""


# ---------------------------------------------------------------------------- parser
# Each subcommand is a Command in COMMANDS: its options and its runner. Runners import what
# they need (torch, Lightning, vitlens) when they run, so `--help` stays fast.
@dataclass
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


def _precision(value: str) -> str:
    if value == "32":  # the name used before 2026-12; float16 is not offered
        return "float32"
    if value not in PRECISIONS:
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(PRECISIONS)})")
    return value


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", metavar="FILE", help="a vitlens checkpoint (.ckpt) written by train.py")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, metavar="METHOD",
                   help="relevance methods, names from vitlens.relevance.METHODS ('explain.py methods' lists "
                        "them), e.g. transformer_attribution grad_rollout rollout attnlrp full_lrp random "
                        "('random' = chance level) (default: %(default)s)")
    p.add_argument("--option", action="append", default=[], metavar="METHOD.NAME=VALUE",
                   help="an option of one of the --methods, e.g. transformer_attribution.start_layer=0 or "
                        "attnlrp.resolution=patch (repeatable; 'explain.py methods' lists every option and its "
                        "default)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--device", default="auto",
                   help="torch device: cpu, cuda, cuda:1, ... (default: auto = cuda when available, else cpu)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N",
                   help="images per relevance pass (default: %(default)s)")
    p.add_argument("--precision", type=_precision, default="float32", metavar="{" + ",".join(PRECISIONS) + "}",
                   help="arithmetic of the relevance pass and the model's forwards, as "
                        "vitlens.relevance.PRECISIONS: float32 (exact), tf32 (TF32 matmuls, Ampere+ GPUs), bf16 "
                        "(bfloat16 matmuls; faster, maps within ~1e-2), float64 (reference; slow) "
                        "(default: %(default)s; '32' is read as float32)")
    p.add_argument("--signed", choices=SIGNED, default="positive",
                   help="how maps with negative values (LRP family) are shown and scored for localisation: "
                        "their positive part (as LRP papers show them), absolute value, or raw min-max (zero at "
                        "mid-scale) (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress line")


def add_maps_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.add_argument("--model", metavar="NAME", help="timm model name (instead of --ckpt)")
    p.add_argument("--weights", metavar="FILE", help="weights file for --model (.safetensors, .pth, .bin)")
    p.add_argument("--img-size", type=int, metavar="PX", help="input size for --model (default: the model's)")
    p.add_argument("--images", nargs="+", required=True, metavar="PATH", help="image files, folders or globs")
    p.add_argument("--target", metavar="CLASS",
                   help="class name or index to explain (default: the predicted class)")
    p.add_argument("--topk", type=int, default=1, metavar="K",
                   help="explain each of the K most probable classes (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity, 0..1 (default: %(default)s)")
    p.add_argument("--colormap", default="jet", help="matplotlib colormap of the overlays (default: %(default)s)")
    p.add_argument("--resize", choices=["resize", "center_crop"], default="resize",
                   help="how images are brought to the model's size (default: %(default)s)")
    p.add_argument("--ncols", type=int, default=2, help="columns of the contact sheet (default: %(default)s)")


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    data = p.add_argument_group(
        "data", "The checkpoint's own data settings are used (the split and eval transform it was trained "
                "with); these override them. An override that puts training images into the evaluated split "
                "is an error.")
    data.add_argument("--data.path", dest="data_path", metavar="PATH",
                      help="image folder, CSV manifest or CUB-200-2011 root (default: the checkpoint's)")
    data.add_argument("--data.val_fraction", dest="data_val_fraction", type=float, metavar="F",
                      help="fraction of train that is val when the source has no val split (default: the checkpoint's)")
    data.add_argument("--data.seed", dest="data_seed", type=int, metavar="N",
                      help="seed of that val split (default: the checkpoint's)")
    data.add_argument("--data.eval_resize", dest="data_eval_resize", choices=["center_crop", "resize"],
                      help="eval transform (default: the checkpoint's)")
    data.add_argument("--data.crop_pct", dest="data_crop_pct", type=float, metavar="F",
                      help="centre-crop fraction for center_crop (default: the checkpoint's)")
    data.add_argument("--data.mask_column", dest="data_mask_column", metavar="NAME",
                      help="CSV column of the object masks, e.g. parts_mask (default: the checkpoint's)")
    data.add_argument("--data.num_workers", dest="data_num_workers", type=int, default=0, metavar="N",
                      help="DataLoader worker processes (default: %(default)s)")
    p.add_argument("--split", choices=["train", "val", "test"], default="val",
                   help="which split to evaluate (default: %(default)s)")
    p.add_argument("--limit", type=int, metavar="N", help="at most N images (default: all)")


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    add_data_arguments(p)
    p.add_argument("--perturbation-batch-size", type=int, metavar="N",
                   help="perturbed images per forward pass (default: 64 on a CPU, 256 on a GPU)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap resamples for the 95%% intervals, 0 = none (default: %(default)s)")
    p.add_argument("--wandb", action="store_true", help="also log to a W&B run (offline unless WANDB_MODE says otherwise)")
    p.add_argument("--wandb-project", default="vitlens", help="W&B project (default: %(default)s)")


def add_audit_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    add_data_arguments(p)
    p.add_argument("--thresholds", type=json.loads, metavar="JSON",
                   help="overrides of vitlens.metrics.shortcut.ShortcutThresholds as JSON, "
                        "e.g. '{\"position_fire\": 2.5}' (default: the documented thresholds)")
    p.add_argument("--examples", type=int, default=6, metavar="N",
                   help="hotspot example images per suspected class (default: %(default)s)")
    p.add_argument("--wandb", action="store_true", help="also log to a W&B run (offline unless WANDB_MODE says otherwise)")
    p.add_argument("--wandb-project", default="vitlens", help="W&B project (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="explain.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Run 'explain.py COMMAND --help' for a command's options.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
    from vitlens.metrics.evaluate import ProgressLine
    from vitlens.relevance import explain_many
    from vitlens.relevance.display import contact_sheet, explanation_panel, save_png
    from vitlens.relevance.registry import with_options

    device = _device(args.device)
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
    precision = args.precision
    no_boxes = np.zeros((0, 4), np.float32)
    panels, index = [], []
    bar = ProgressLine(len(paths), not args.no_progress, label="explaining")
    for start in range(0, len(paths), args.batch_size):
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
        requested = with_options(args.methods, args.method_options)
        maps = [explain_many(model, images, requested, classes[:, k], precision=precision).maps
                for k in range(classes.shape[1])]
        images01 = denormalize(images.cpu(), mean, std).clamp(0, 1)
        for i, (p, name) in enumerate(zip(chunk, names[start:start + len(chunk)])):
            rows = []
            for k in range(classes.shape[1]):
                c = int(classes[i, k])
                title = f"{class_names[c]} {float(probs[i, c]):.2f}"
                rows.append(explanation_panel(images01[i], {m: maps[k][m][i].float().cpu() for m in args.methods},
                                              title, alpha=args.alpha, colormap=args.colormap, signed=args.signed))
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
        bar.update(len(chunk))
    bar.close()
    save_png(contact_sheet(panels, args.ncols), out / "contact_sheet.png")
    (out / "index.json").write_text(json.dumps({"methods": args.methods, "images": index}, indent=2))
    print(f"wrote {len(paths)} overlays, {len(paths) * len(args.methods)} maps and contact_sheet.png to {out}")


# ---------------------------------------------------------------------------- checkpoint data
def checkpoint_data(args, class_names, mean, std, size):
    """The checkpoint's own split with the --data.* overrides (evaluate and audit), notes printed."""
    from vitlens.data.from_checkpoint import evaluation_datamodule

    overrides = {key: getattr(args, f"data_{key}") for key in
                 ("path", "val_fraction", "seed", "eval_resize", "crop_pct", "mask_column")}
    data = evaluation_datamodule(args.ckpt, overrides, split=args.split, class_names=class_names, image_size=size,
                                 mean=mean, std=std, batch_size=1, eval_batch_size=args.batch_size,
                                 num_workers=args.data_num_workers)
    for note in data.notes:
        print(f"note: {note}", file=sys.stderr)
    return data


# ---------------------------------------------------------------------------- evaluate
def run_evaluate(args) -> None:
    import torch

    from vitlens.metrics.evaluate import evaluate_explanations
    from vitlens.relevance.display import plot_perturbation_curves

    if not args.ckpt:
        raise UserError("evaluate needs --ckpt RUN.ckpt")
    device = _device(args.device)
    model, class_names, mean, std, size = load_model(args, device)
    data = checkpoint_data(args, class_names, mean, std, size)
    dm = data.datamodule
    dm.setup("fit" if args.split != "test" else "test")
    dataset = {"train": dm.train_dataset, "val": dm.val_dataset, "test": dm.test_dataset}[args.split]
    if dataset is None:
        raise UserError(f"{dm.path} has no {args.split} split")
    if args.split == "train":  # explain un-augmented training images
        dataset.transform = dm.eval_transform()
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.data_num_workers)
    n = len(dataset) if args.limit is None else min(len(dataset), args.limit)
    report = evaluate_explanations(model, loader, args.methods, mean, std, limit=args.limit,
                                   perturbation_batch_size=args.perturbation_batch_size or (256 if device.type == "cuda" else 64),
                                   precision=args.precision, signed=args.signed, n_resamples=args.bootstrap,
                                   progress=not args.no_progress, total_images=n,
                                   method_options=args.method_options)
    report.meta.update(model=Path(args.ckpt).name, checkpoint=str(args.ckpt), data=str(dm.path),
                       split=args.split, methods=list(args.methods),
                       data_settings={k: data.settings[k] for k in data.settings if k != "generate_options"},
                       data_settings_origin=data.origin)
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
    """Thin: the data is the checkpoint's own split (as for evaluate); the analysis and the
    report are vitlens.metrics.shortcut_audit."""
    from vitlens.metrics.shortcut import ShortcutThresholds
    from vitlens.metrics.shortcut_audit import audit_checkpoint

    if not args.ckpt:
        raise UserError("audit needs --ckpt RUN.ckpt")
    thresholds = ShortcutThresholds.from_options(args.thresholds)  # bad keys fail before any work
    device = _device(args.device)
    model, class_names, mean, std, size = load_model(args, device)
    data = checkpoint_data(args, class_names, mean, std, size)
    data_args = {**data.settings, "num_workers": args.data_num_workers}
    report = audit_checkpoint(model, class_names, mean, std, size, data_args=data_args, split=args.split,
                              methods=args.methods, out=args.out, batch_size=args.batch_size, limit=args.limit,
                              precision=args.precision, thresholds=thresholds, examples=args.examples,
                              use_wandb=args.wandb, wandb_project=args.wandb_project, checkpoint=args.ckpt,
                              method_options=args.method_options)
    for method in report.methods:
        found = report.suspected[method]
        print(f"{method}: " + (f"shortcut suspected for {', '.join(found)}" if found else "no shortcut suspected"))
    print(f"wrote audit.md, audit.json and PNGs to {args.out}")


# ---------------------------------------------------------------------------- methods
def add_methods_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the list as JSON")


def run_methods(args) -> None:
    """The registered methods: name, map resolution, options with defaults, help."""
    from vitlens.relevance.registry import describe

    entries = describe()
    if args.json:
        print(json.dumps(entries, indent=2, default=str))
        return
    for e in entries:
        flags = [e["resolution"] if e["resolution"] != "option" else "resolution by option"]
        if e["class_agnostic"]:
            flags.append("class-agnostic")
        if e["float64_in_float32"]:
            flags.append("float64 when float32 is asked")
        print(f"{e['name']}  ({', '.join(flags)})")
        print(f"    {e['help']}")
        for name, o in e["options"].items():
            print(f"    --option {e['name']}.{name}={o['default']}   {o['help']}")


# ---------------------------------------------------------------------------- main
COMMANDS: dict[str, Command] = {
    "maps": Command("Relevance maps of images as PNG overlays and .npy arrays.", add_maps_arguments, run_maps),
    "evaluate": Command("Perturbation, segmentation and localisation scores of relevance methods on a "
                        "checkpoint's validation (or test) split.", add_evaluate_arguments, run_evaluate),
    "audit": Command("Shortcut audit of a checkpoint over a split: per-class mean maps, off-object hotspots, "
                     "a verdict per class.", add_audit_arguments, run_audit),
    "methods": Command("The relevance methods (the registry): their options, defaults and map resolution.",
                       add_methods_arguments, run_methods),
}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command
    try:
        if hasattr(args, "methods"):
            from vitlens.relevance import METHODS

            from vitlens.relevance.registry import parse_option, with_options

            unknown = [m for m in args.methods if m not in METHODS]
            if unknown:
                raise UserError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
            args.method_options = {}
            for text in args.option:
                method, name, value = parse_option(text)
                args.method_options.setdefault(method, {})[name] = value
            with_options(args.methods, args.method_options)  # options of a method not asked for: an error
        COMMANDS[command].run(args)
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
