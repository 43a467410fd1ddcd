"""What an exact float32 transformer_attribution would cost: float64 records, float32 matmuls.

transformer_attribution's float32 maps can be a few percent off the float64 maps on some
images (``benchmarks/float32_check.py``): the rules divide by residual sums and attention
products of the forward pass that cancel to ~1e-8 of their terms, so the forward's own
float32 rounding decides them. Running the forward (the records) in float64 and only the
rules' matmuls in float32 fixes that; this script measures the price, side by side in one
process (rounds interleaved), on a random ViT with random inputs:

| contender | what runs in float64 |
|---|---|
| float32 | nothing (the default) |
| float64 records + float32 rule matmuls | the forward, the gradient pass's elementwise work, the rules' elementwise work |
| float64 | everything (``precision="float64"``) |

    python benchmarks/records64_cost.py                       # ViT-S/16, 224 px, batch 16
    python benchmarks/records64_cost.py --model vit_tiny_patch16_224 --rounds 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import timm
import torch

from vitlens.relevance import families
from vitlens.relevance.methods import _run
from vitlens.relevance.precision import Precision


RECORDS64 = Precision(torch.float64, torch.float32, False, False)
"""float64 records (the forward and all elementwise work), float32 matmuls in the rules."""


def transformer_attribution(model, images, targets, precision: Precision) -> torch.Tensor:
    """transformer_attribution (start_layer 1) under an explicit ``Precision`` plan, which
    ``explain``'s ``precision=`` names cannot express for ``RECORDS64``."""
    bb = families.read(model, dtype=precision.dtype, mm_dtype=precision.mm_dtype,
                       rounding=precision.rounding, tf32=precision.tf32)
    req = {"transformer_attribution": {"start_layer": 1}}
    return _run(bb, images.to(precision.dtype), req, targets, precision).maps["transformer_attribution"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(True)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, img_size=args.img_size, num_classes=8).eval()
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    targets = torch.arange(args.batch_size) % 8
    contenders = {
        "float32": Precision(torch.float32, torch.float32, False, False),
        "float64 records + float32 rule matmuls": RECORDS64,
        "float64": Precision(torch.float64, torch.float64, False, False),
    }

    def run(p: Precision) -> torch.Tensor:
        return transformer_attribution(model, x, targets, p)

    ref = run(contenders["float64"])
    errors = {}
    times = {k: [] for k in contenders}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, p in contenders.items():
            t0 = time.perf_counter()
            out = run(p)
            if r:
                times[name].append(time.perf_counter() - t0)
            else:
                e = (out.double() - ref).flatten(1).abs().amax(1) / ref.flatten(1).abs().amax(1)
                errors[name] = e.max().item()
    base = statistics.median(times["float32"])
    print(f"# {args.model} {args.img_size}px batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds, load {os.getloadavg()[0]:.2f}")
    print("| contender | worst image vs float64 | ms/image (median) | x float32 |")
    print("|---|---|---|---|")
    for name in contenders:
        med = statistics.median(times[name])
        print(f"| {name} | {errors[name]:.2e} | {1000 * med / args.batch_size:.1f} | {med / base:.2f} |")


if __name__ == "__main__":
    main()
