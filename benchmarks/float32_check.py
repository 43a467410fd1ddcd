"""Float32 maps against float64 maps of the same trained weights, on real images, per method.

The issue's bound: for every method, the worst image's float32 map within 1e-3 of the
float64 map, measured as max |r32 - r64| / max |r64| per image. The model is copied and cast
(``.float()`` vs ``.double()``: same weights); both explain the float64 model's predicted
class. Prints the worst and median image error and how many images exceed 1e-3.

    python benchmarks/float32_check.py --checkpoint checkpoints/<run>/last.ckpt \
        --images 'data/toybirds/images/val/*/*.png' --num-images 128
"""
from __future__ import annotations

import argparse
import copy
import os

import torch

from vitlens.relevance import METHODS, explain


def main(argv=None):
    from faithfulness import load  # benchmarks/faithfulness.py: checkpoint + images

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--num-images", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "random"], choices=METHODS)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(True)
    clf, images, _ = load(args)
    m32 = clf.model.float().eval()
    m64 = copy.deepcopy(m32).double()
    with torch.no_grad():
        t = m64(images.double()).argmax(-1)
    print(f"# {args.checkpoint}: {len(images)} images, load {os.getloadavg()[0]:.2f}")
    print("| method | worst image | median image | images > 1e-3 |")
    print("|---|---|---|---|")
    for m in args.methods:
        errs = []
        for i in range(0, len(images), args.batch_size):
            x, ti = images[i:i + args.batch_size], t[i:i + args.batch_size]
            r32 = explain(m32, x, m, ti).double()
            r64 = explain(m64, x.double(), m, ti)
            errs.append((r32 - r64).flatten(1).abs().amax(1) / r64.flatten(1).abs().amax(1).clamp_min(1e-300))
        e = torch.cat(errs)
        print(f"| {m} | {e.max().item():.2e} | {e.median().item():.2e} | {(e > 1e-3).sum().item()} |", flush=True)


if __name__ == "__main__":
    main()
