"""Float32 maps against float64 maps of the same trained weights, on real images, per method.

The issue's bound: for every method, the worst image's float32 map within 1e-3 of the
float64 map, measured as max |r32 - r64| / max |r64| per image. The model is copied and cast
(``.float()`` vs ``.double()``: same weights); both explain the float64 model's predicted
class. Prints the worst and median image error and how many images exceed 1e-3, and beside
them two references:

- ``explain_many``: the worst image's difference between one ``explain_many`` call for every
  method and single ``explain`` calls (float32), to the same bound;
- ``own conditioning``: the worst image's change of the *float64* map when every weight is
  moved by about one float32 rounding (``w * (1 + 6e-8 N(0, 1))``, seeded): how far the
  method's map moves for input changes as small as float32's rounding. A float32 forward
  cannot be expected to get closer to the float64 map than this;
- ``--records64``: transformer_attribution with the forward pass (the records whose sums and
  products the rules divide by) in float64 and the rules' matmuls in float32: error only.

    python benchmarks/float32_check.py --checkpoint checkpoints/<run>/last.ckpt \
        --images 'data/toybirds/images/val/*/*.png' --num-images 128
"""
from __future__ import annotations

import argparse
import copy
import os

import torch

from vitlens.relevance import METHODS, explain, explain_many


def main(argv=None):
    from faithfulness import load  # benchmarks/faithfulness.py: checkpoint + images

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--num-images", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "random"], choices=METHODS)
    ap.add_argument("--records64", action="store_true",
                    help="add transformer_attribution with float64 records and float32 rule matmuls")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(True)
    clf, images, _ = load(args)
    m32 = clf.model.float().eval()
    m64 = copy.deepcopy(m32).double()
    with torch.no_grad():
        t = m64(images.double()).argmax(-1)
    print(f"# {args.checkpoint}: {len(images)} images, load {os.getloadavg()[0]:.2f}")
    moved = copy.deepcopy(m64)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in moved.parameters():
            p.mul_(1 + 6e-8 * torch.randn(p.shape, generator=g, dtype=torch.float64))

    def err(a, b):
        a, b = a.double(), b.double()
        return (a - b).flatten(1).abs().amax(1) / b.flatten(1).abs().amax(1).clamp_min(1e-300)

    print("| method | worst image | median image | images > 1e-3 | explain_many vs explain (worst) "
          "| own conditioning (float64, weights moved ~1 rounding; worst) |")
    print("|---|---|---|---|---|---|")
    errs = {m: [] for m in args.methods}
    many = {m: [] for m in args.methods}
    cond = {m: [] for m in args.methods}
    for i in range(0, len(images), args.batch_size):
        x, ti = images[i:i + args.batch_size], t[i:i + args.batch_size]
        together = explain_many(m32, x, args.methods, ti).maps
        for m in args.methods:
            r32 = explain(m32, x, m, ti)
            r64 = explain(m64, x.double(), m, ti)
            errs[m].append(err(r32, r64))
            many[m].append(err(together[m], r32))
            cond[m].append(err(explain(moved, x.double(), m, ti), r64))
    for m in args.methods:
        e, d, c = torch.cat(errs[m]), torch.cat(many[m]), torch.cat(cond[m])
        print(f"| {m} | {e.max().item():.2e} | {e.median().item():.2e} | {(e > 1e-3).sum().item()} "
              f"| {d.max().item():.2e} | {c.max().item():.2e} |", flush=True)
    if args.records64:
        from records64_cost import RECORDS64, transformer_attribution
        e = []
        for i in range(0, len(images), args.batch_size):
            x, ti = images[i:i + args.batch_size], t[i:i + args.batch_size]
            r = transformer_attribution(m32, x, ti, RECORDS64)
            e.append(err(r, explain(m64, x.double(), "transformer_attribution", ti)))
        e = torch.cat(e)
        print(f"| transformer_attribution, float64 records + float32 rule matmuls | {e.max().item():.2e} "
              f"| {e.median().item():.2e} | {(e > 1e-3).sum().item()} | | |")


if __name__ == "__main__":
    main()
