"""Cost of ``attnlrp`` / ``cp_lrp`` beside the model's own forward + backward pass.

One process, one model, one batch: every round calls each contender once, in turn
(interleaved, so a load change on a shared machine hits all of them alike); the table gives
the median wall-clock and process CPU ms/image over the rounds and their ratios to the
forward + backward pass (gradients into the parameters and the input, as in training). On a
loaded machine the CPU-time ratio is the steadier one (``--threads 1`` steadier still). The issue's bound:
attnlrp / cp_lrp at most 1.5x the forward + backward pass.

    python benchmarks/lrp_cost.py                                   # toy-birds ViT (64 px, patch 8, depth 4), batch 32
    python benchmarks/lrp_cost.py --model vit_small_patch16_224 --img-size 224 --batch-size 16
    python benchmarks/lrp_cost.py --profile attnlrp                 # torch.profiler table of one call
    python benchmarks/lrp_cost.py --baseline 67c8e02                # + attnlrp / cp_lrp with that commit's lrp_gradient.py
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import timm
import torch

from vitlens.relevance import explain

TOY = dict(model="vit_tiny_patch16_224", img_size=64,
           kwargs=dict(patch_size=8, embed_dim=192, depth=4, num_heads=3, num_classes=8))


def build(args):
    if args.model == "toy":
        model = timm.create_model(TOY["model"], pretrained=False, img_size=TOY["img_size"], **TOY["kwargs"])
        size = TOY["img_size"]
    else:
        model = timm.create_model(args.model, pretrained=False, img_size=args.img_size, num_classes=8)
        size = args.img_size
    torch.manual_seed(0)
    return model.eval(), torch.randn(args.batch_size, 3, size, size)


def baseline_contenders(model, methods, rev):
    """attnlrp / cp_lrp with ``lrp_gradient.py`` of git revision ``rev`` loaded beside the
    current one, called on the same ``Backbone`` (as ``explain`` does: read, relevance)."""
    import importlib.util
    import pathlib
    import subprocess
    import sys
    import tempfile

    from vitlens.relevance import families

    root = pathlib.Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "show", f"{rev}:src/vitlens/relevance/lrp_gradient.py"], cwd=root,
                         check=True, capture_output=True, text=True).stdout
    path = pathlib.Path(tempfile.mkdtemp()) / f"lrp_gradient_{rev}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"lrp_gradient_{rev}", path)
    old = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = old
    spec.loader.exec_module(old)

    def run(x, m):
        bb = families.read(model, dtype=x.dtype, mm_dtype=x.dtype, rounding=False, tf32=False)
        return old.relevance(bb, m, x, lambda logits: logits.argmax(-1), gamma_linear=0.05, gamma_conv=0.25)[0]

    return {f"{m} ({rev})": (lambda x, m=m: run(x, m)) for m in methods if m in old.RULE_SETS}


def contenders(model, methods):
    def fwd_bwd(x):
        model.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_()
        model(x).max(-1).values.sum().backward()
        model.zero_grad(set_to_none=True)
        return x.grad

    rows = {"forward+backward": fwd_bwd}
    for m in methods:
        rows[m] = lambda x, m=m: explain(model, x, m)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy", help="'toy' (the toy-birds ViT) or a timm model name")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--methods", nargs="+", default=["attnlrp", "cp_lrp", "transformer_attribution"])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--profile", default=None, help="print a torch.profiler table of one call of this method")
    ap.add_argument("--baseline", default=None, help="git revision whose lrp_gradient.py also runs (attnlrp / cp_lrp)")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, x = build(args)
    rows = contenders(model, args.methods)
    if args.baseline:
        rows.update(baseline_contenders(model, args.methods, args.baseline))
    for fn in rows.values():  # warm-up
        fn(x)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        fn = rows[args.profile]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn(x)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        return
    wall, cpu = {k: [] for k in rows}, {k: [] for k in rows}
    load = os.getloadavg()[0]
    for _ in range(args.rounds):
        for k, fn in rows.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn(x)
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    B = x.shape[0]
    uw, uc = statistics.median(wall["forward+backward"]), statistics.median(cpu["forward+backward"])
    print(f"# {args.model} {tuple(x.shape[1:])}, batch {B}, {args.rounds} interleaved rounds (medians), "
          f"torch threads {torch.get_num_threads()}, load {load:.2f} -> {os.getloadavg()[0]:.2f}")
    print("| method | wall ms/image | x fwd+bwd (wall) | CPU ms/image | x fwd+bwd (CPU) |")
    print("|---|---|---|---|---|")
    for k in rows:
        mw, mc = statistics.median(wall[k]), statistics.median(cpu[k])
        print(f"| {k} | {1000 * mw / B:.2f} | {mw / uw:.2f} | {1000 * mc / B:.2f} | {mc / uc:.2f} |")


if __name__ == "__main__":
    main()
