"""How far each relevance precision is from float64, per method, on one device.

For every method and every precision (float32, tf32, bf16) it prints the relative L2 error
(largest over the images) and the smallest per-image Pearson correlation against float64
maps computed on the same device, beside the issue's bound (2e-2 and 0.999). On a CPU TF32
does not exist: ``--emulate-tf32`` rounds float32 matmuls to TF32 wherever torch's switch asks
for it (``vitlens.profiling.EmulatedTF32``), as an Ampere+ GPU would. ``--global-tf32`` also
sets ``torch.set_float32_matmul_precision("high")`` for the whole run, as Lightning advises on
GPUs, to show that float32 maps ignore it.

    python benchmarks/precision_check.py --model vit_small_patch16_224 --emulate-tf32
    python benchmarks/precision_check.py --checkpoint checkpoints/<run>/last.ckpt \
        --images 'data/toybirds/images/val/*/*.png' --emulate-tf32
    python benchmarks/precision_check.py --model vit_base_patch16_224 --device cuda
"""
from __future__ import annotations

import argparse
import contextlib
import glob

import timm
import torch

from vitlens.profiling import EmulatedTF32
from vitlens.relevance import METHODS, explain_many


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return ((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-300)).max().item()


def pearson_min(a: torch.Tensor, b: torch.Tensor) -> float:
    vals = [torch.corrcoef(torch.stack([x, y]))[0, 1].item()
            for x, y in zip(a.flatten(1).double(), b.flatten(1).double()) if y.std() > 0]
    return min(vals) if vals else float("nan")


def load(args, device):
    if args.checkpoint:
        from vitlens.data import eval_transform, read_image
        from vitlens.models import load_classifier

        model = load_classifier(args.checkpoint, map_location="cpu").eval()
        files = sorted(glob.glob(args.images, recursive=True))
        if not files:
            raise SystemExit(f"--images {args.images!r} matches no file")
        files = files[:: max(1, len(files) // args.batch_size)][: args.batch_size]
        # the model's own eval pipeline, as explain.py uses it
        transform = eval_transform(model.model.patch_embed.img_size[0], model.mean, model.std, "resize", boxes=False)
        images = torch.stack([torch.from_numpy(transform(image=read_image(f))["image"]).permute(2, 0, 1)
                              for f in files])
        name = f"{args.checkpoint} on {len(files)} images"
    else:
        torch.manual_seed(0)
        model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes).eval()
        images = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
        name = f"{args.model} (random init) on {args.batch_size} random images"
    return model.to(device), images.to(device), name


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--checkpoint", default=None, help="a vitlens .ckpt instead of a random timm model")
    ap.add_argument("--images", default=None, help="glob of images for --checkpoint")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "random"],
                    choices=METHODS)
    ap.add_argument("--emulate-tf32", action="store_true", help="CPU: round matmuls where TF32 is asked for")
    ap.add_argument("--global-tf32", action="store_true",
                    help='torch.set_float32_matmul_precision("high") for the whole run')
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    model, images, name = load(args, device)
    if args.global_tf32:
        torch.set_float32_matmul_precision("high")
    emulate = EmulatedTF32() if args.emulate_tf32 else contextlib.nullcontext()
    exact = explain_many(model, images, args.methods, precision="float64")
    targets = exact.targets
    results = {}
    with emulate:
        for precision in ("float32", "tf32", "bf16"):
            # methods one at a time: attention-only methods then run their own (rounded) forward
            results[precision] = {m: explain_many(model, images, [m], targets, precision=precision).maps[m]
                                  for m in args.methods}
    tf32_note = ("TF32 emulated" if args.emulate_tf32 else
                 "real TF32" if device.type == "cuda" else "no TF32 on CPU: tf32 = float32 arithmetic")
    print(f"{name}; device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}; "
          f"{tf32_note}; global matmul precision {torch.get_float32_matmul_precision()}")
    print("relative L2 error (max over images) / Pearson (min over images) against float64; "
          "bound 2e-2 / 0.999")
    print(f"{'method':<25}" + "".join(f"{p:>22}" for p in results))
    for m in args.methods:
        cells = []
        for p in results:
            e, r = rel_err(results[p][m], exact.maps[m]), pearson_min(results[p][m], exact.maps[m])
            flag = "" if e <= 2e-2 and r >= 0.999 else " *"
            cells.append(f"{e:9.2e} / {r:7.5f}{flag:2}")
        print(f"{m:<25}" + "".join(f"{c:>22}" for c in cells))
    print("* outside the bound")


if __name__ == "__main__":
    main()
