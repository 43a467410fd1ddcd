"""Throughput and peak memory of every relevance method beside the model's own passes.

For each batch size this measures, in one run and on one model: the forward pass (no grad,
fused attention), the forward + backward pass (gradients into the parameters, as in training)
and every method of ``vitlens.relevance``; it prints images/s, ms/image, the ratio to the
forward pass and the peak memory of each.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated before the
call; on CPU the peak resident set size (Linux VmHWM, reset through /proc/self/clear_refs)
above the resident size before the call, which includes allocator caching.

Two device-free columns come from running the same call on the ``meta`` device (no data, no
compute, a second each): ``tensor GiB``, the peak tensor memory (``vitlens.profiling
.TensorMemory``: what ``max_memory_allocated`` reports on a GPU, less allocator rounding and
cuBLAS workspaces), and ``GFLOP/img``, the matmul and convolution FLOPs (torch's
FlopCounterMode; elementwise work is not counted). ``--cost-only`` prints only those, so a CPU
machine can check a GPU memory budget. On CUDA, ``--check-sync`` runs each method once under
``torch.cuda.set_sync_debug_mode("error")`` and reports whether it synchronised with the host.

``--authors PATH``: the authors' implementation side by side (Chefer, Gur & Wolf, a local clone
of github.com/hila-chefer/Transformer-Explainability; it is not installable and needs
``einops``). Their ViT copy (``baselines/ViT/ViT_LRP.py``) gets the timm model's weights, their
``LRP.generate_LRP`` runs at batch 1 (all it supports) with its ``.cuda()`` calls made the
identity on CPU for the duration of the call (their files are not modified); their map is first
checked against ours on a few images, then both are timed interleaved in one process
(``--repeats`` rounds, medians): ours at each ``--batch-sizes``, theirs at batch 1, the forward
pass at the largest batch. Without ``--authors`` the ratio to the forward pass is the yardstick.
``--baseline-src SRC`` adds the rows of another vitlens source tree (an older commit's ``src``),
interleaved in the same rounds: before/after in one process.

    python benchmarks/relevance_throughput.py --model vit_small_patch16_224 --img-size 224 \
        --batch-sizes 1 16 --device cpu
    python benchmarks/relevance_throughput.py --model vit_base_patch16_224 --batch-sizes 64 \
        --precision bf16 --cost-only
    python benchmarks/relevance_throughput.py --authors ~/src/Transformer-Explainability \
        --methods transformer_attribution --batch-sizes 16 1 --device cpu --repeats 5
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import os
import statistics
import sys
import time

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from vitlens.profiling import TensorMemory
from vitlens.relevance import METHODS, explain


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of a block above its starting point, in MiB (see module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.linux = os.path.exists("/proc/self/clear_refs")
        self.mib = float("nan")

    @staticmethod
    def _status(key: str) -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024  # kB -> MiB
        return float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device) / 2**20
        elif self.linux:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.start = self._status("VmRSS:")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20 - self.start
        elif self.linux:
            self.mib = self._status("VmHWM:") - self.start
        return False


def measure(fn, device, repeats: int, warmup: int):
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup``; peak memory of one run."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    with PeakMemory(device) as mem:
        fn()
    return statistics.median(times), mem.mib


def device_free_cost(fn) -> tuple[float, float]:
    """(peak tensor GiB, GFLOP) of ``fn()`` on meta tensors."""
    with TensorMemory() as mem:
        fn()
    with FlopCounterMode(display=False) as flops:
        fn()
    return mem.peak_bytes / 2**30, flops.get_total_flops() / 1e9


def syncs(fn, device) -> str:
    """"no" if ``fn()`` runs under CUDA sync debug mode "error", else "YES"."""
    if device.type != "cuda":
        return "-"
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "no"
    except RuntimeError:
        return "YES"
    finally:
        torch.cuda.set_sync_debug_mode("default")


@contextlib.contextmanager
def cuda_is_identity(active: bool = True):
    """``Tensor.cuda`` as the identity for the duration of the block (the authors' code calls it
    unconditionally; ``active=False`` on a GPU: their calls then stand); restored afterwards."""
    if not active:
        yield
        return
    saved = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = saved


def load_authors(path: str, model: torch.nn.Module):
    """The authors' ViT (``baselines/ViT/ViT_LRP.py``) with ``model``'s weights, and their ``LRP``
    explainer; a one-line error naming what is missing."""
    root = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(os.path.join(root, "baselines", "ViT", "ViT_LRP.py")):
        raise SystemExit(f"--authors {path}: no baselines/ViT/ViT_LRP.py there; give the root of a "
                         "clone of github.com/hila-chefer/Transformer-Explainability")
    try:
        import einops  # noqa: F401
    except ImportError:
        raise SystemExit("--authors: their code imports einops, which is not installed: pip install einops")
    if root not in sys.path:
        sys.path.insert(0, root)
    from baselines.ViT.ViT_LRP import VisionTransformer as AuthorsViT
    from baselines.ViT.ViT_explanation_generator import LRP

    blk = model.blocks[0]
    if (getattr(model, "global_pool", "token") != "token" or model.num_prefix_tokens != 1
            or model.pos_embed is None or not isinstance(model.norm, torch.nn.LayerNorm)
            or not isinstance(blk.ls1, torch.nn.Identity) or blk.attn.qkv.bias is None):
        raise SystemExit("--authors: their ViT is the original one (class token, LayerNorm, qkv bias, "
                         "no LayerScale); choose a model like vit_small_patch16_224")
    D = model.embed_dim
    theirs = AuthorsViT(img_size=model.patch_embed.img_size, patch_size=model.patch_embed.patch_size[0],
                        num_classes=model.num_classes, embed_dim=D, depth=len(model.blocks),
                        num_heads=blk.attn.num_heads, mlp_ratio=blk.mlp.fc1.out_features / D,
                        qkv_bias=True)
    # same parameter names as timm's ViT (which has no extra parameters for this layout)
    theirs.load_state_dict(model.state_dict(), strict=True)
    theirs.norm.eps = model.norm.eps  # theirs: 1e-5, timm: 1e-6
    theirs = theirs.to(next(model.parameters()).dtype).eval()
    return theirs, LRP(theirs)


def explain_from(src: str):
    """``explain`` of another vitlens source tree (e.g. ``git worktree add /tmp/old <commit>``,
    then ``/tmp/old/src``), imported beside this one as separate module objects: before/after
    in one process. (vitlens.relevance imports nothing of vitlens inside functions, so the two
    copies do not mix.)"""
    src = os.path.abspath(os.path.expanduser(src))
    if not os.path.isfile(os.path.join(src, "vitlens", "relevance", "__init__.py")):
        raise SystemExit(f"--baseline-src {src}: no vitlens/relevance there; give the src folder of a checkout")
    ours = {k: v for k, v in sys.modules.items() if k == "vitlens" or k.startswith("vitlens.")}
    for k in ours:
        del sys.modules[k]
    sys.path.insert(0, src)
    try:
        return importlib.import_module("vitlens.relevance").explain
    finally:
        sys.path.remove(src)
        for k in [k for k in sys.modules if k == "vitlens" or k.startswith("vitlens.")]:
            del sys.modules[k]
        sys.modules.update(ours)


def authors_side_by_side(args, model, device, start_layer: int) -> None:
    """The authors' transformer_attribution beside ours: equality check, then interleaved timing."""
    theirs, lrp = load_authors(args.authors, copy.deepcopy(model).cpu().float())
    theirs = theirs.to(device)
    torch.manual_seed(1)
    bmax = max(args.batch_sizes)
    images = torch.randn(bmax, 3, args.img_size, args.img_size, device=device)

    def run_theirs(x1):
        with cuda_is_identity(device.type == "cpu"):
            return lrp.generate_LRP(x1, method="transformer_attribution", start_layer=start_layer).detach()

    # the check runs both in float64 (their code and ours on the same float64 weights and images):
    # in float32 both round at the residual rule's cancelling sums, ~1e-3 apart on random weights
    n = min(args.check_images, bmax)
    theirs64, lrp64 = load_authors(args.authors, copy.deepcopy(model).cpu().double())
    theirs64.to(device)
    model64, x64 = copy.deepcopy(model).double(), images[:n].double()
    ours = explain(model64, x64, "transformer_attribution", start_layer=start_layer)
    worst = worst32 = 0.0
    for i in range(n):
        with cuda_is_identity(device.type == "cpu"):
            a = lrp64.generate_LRP(x64[i:i + 1].to(device), method="transformer_attribution",
                                   start_layer=start_layer).detach().reshape(ours[i].shape)
        worst = max(worst, ((a - ours[i]).abs().max() / a.abs().max()).item())
        a32 = run_theirs(images[i:i + 1]).reshape(ours[i].shape)
        o32 = explain(model, images[i:i + 1], "transformer_attribution", start_layer=start_layer,
                      precision=args.precision)[0]
        worst32 = max(worst32, ((a32 - o32).abs().max() / a32.abs().max()).item())
    del theirs64, lrp64, model64
    ok = worst < 1e-6
    print(f"authors' code ({args.authors}): transformer_attribution start_layer={start_layer}, "
          f"their map vs ours on {n} images, max |diff| / max |theirs|: float64 {worst:.1e} "
          f"({'equal' if ok else 'NOT EQUAL: timing not comparable'}), as timed (float32 / "
          f"{args.precision or 'model dtype'}) {worst32:.1e}")
    if not ok:
        raise SystemExit(1)

    def fwd():
        with torch.no_grad():
            model(images)

    calls = [("forward", bmax, fwd)]
    calls += [("transformer_attribution (ours)", bs,
               lambda bs=bs: explain(model, images[:bs], "transformer_attribution", start_layer=start_layer,
                                     precision=args.precision))
              for bs in args.batch_sizes]
    if args.baseline_src:
        old = explain_from(args.baseline_src)
        ref = explain(model, images[:2], "transformer_attribution", start_layer=start_layer, precision=args.precision)
        was = old(model, images[:2], "transformer_attribution", start_layer=start_layer, precision=args.precision)
        print(f"baseline {args.baseline_src}: its map vs this tree's, max |diff| / max: "
              f"{((was - ref).abs().max() / ref.abs().max()).item():.1e} (float32)")
        calls += [("transformer_attribution (baseline src)", bs,
                   lambda bs=bs: old(model, images[:bs], "transformer_attribution", start_layer=start_layer,
                                     precision=args.precision))
                  for bs in args.batch_sizes]
    calls.append(("transformer_attribution (authors')", 1, lambda: run_theirs(images[:1])))
    for _, _, fn in calls:  # warm-up
        for _ in range(args.warmup):
            fn()
    times = {name + str(bs): [] for name, bs, _ in calls}
    for _ in range(args.repeats):  # interleaved rounds
        for name, bs, fn in calls:
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name + str(bs)].append((time.perf_counter() - t0) / bs)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    base, authors = ms[f"forward{bmax}"], ms["transformer_attribution (authors')1"]
    print(f"interleaved, {args.repeats} rounds, median ms/image")
    print(f"{'batch':>5} {'what':<40} {'ms/image':>9} {'x forward':>9} {'authors/this':>12}")
    for name, bs, _ in calls:
        v = ms[name + str(bs)]
        print(f"{bs:>5} {name:<40} {v:>9.1f} {v / base:>9.2f} {authors / v:>12.2f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default=None, choices=[None, "float64", "float32", "tf32", "bf16"],
                    help="relevance precision (the forward/backward baselines run in float32, "
                         "or under bf16 autocast for bf16)")
    ap.add_argument("--methods", nargs="+", default=[m for m in METHODS], choices=METHODS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--cost-only", action="store_true",
                    help="only the device-free columns (meta device: no timing)")
    ap.add_argument("--check-sync", action="store_true",
                    help="CUDA: report whether each method synchronises with the host")
    ap.add_argument("--authors", default=None, metavar="PATH",
                    help="a clone of hila-chefer/Transformer-Explainability: their transformer_attribution "
                         "side by side (checked equal first), timed interleaved with ours")
    ap.add_argument("--start-layer", type=int, default=None,
                    help="transformer_attribution's start_layer for --authors (default: ours, 1)")
    ap.add_argument("--baseline-src", default=None, metavar="SRC",
                    help="--authors: also time the transformer_attribution of another vitlens source tree "
                         "(its src folder), interleaved: before/after in one process")
    ap.add_argument("--check-images", type=int, default=3, help="--authors: images in the equality check")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes,
                              img_size=args.img_size).eval()
    meta_model = copy.deepcopy(model).to("meta")
    model = model.to(device)
    autocast_dtype = torch.bfloat16 if args.precision == "bf16" else None
    print(f"model {args.model} @ {args.img_size}px, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"torch threads {torch.get_num_threads()}, relevance precision {args.precision}, "
          f"peak memory: {'cuda max_memory_allocated' if device.type == 'cuda' else 'peak RSS (VmHWM) growth'}")
    header = (f"{'batch':>5} {'what':<26} {'images/s':>9} {'ms/image':>9} {'x forward':>9} "
              f"{'peak MiB':>9} {'tensor GiB':>10} {'GFLOP/img':>9} {'host sync':>9}")
    if args.authors:
        if args.cost_only:
            raise SystemExit("--authors times their code: it cannot run with --cost-only")
        from vitlens.relevance.registry import get_method
        start = (args.start_layer if args.start_layer is not None
                 else get_method("transformer_attribution").defaults()["start_layer"])
        authors_side_by_side(args, model, device, start)
        return
    for bs in args.batch_sizes:
        def calls(net, images):
            # no autocast on meta: its forward baselines count float32 bytes (same FLOPs)
            autocast = (torch.autocast(images.device.type, dtype=autocast_dtype)
                        if autocast_dtype is not None and images.device.type != "meta"
                        else contextlib.nullcontext())

            def fwd():
                with torch.no_grad(), autocast:
                    net(images)

            def fwd_bwd():
                with autocast:
                    loss = net(images).float().logsumexp(-1).sum()
                loss.backward()
                net.zero_grad(set_to_none=True)

            out = [("forward", fwd), ("forward+backward", fwd_bwd)]
            return out + [(m, lambda m=m: explain(net, images, m, precision=args.precision))
                          for m in args.methods]

        cost = {name: device_free_cost(fn) for name, fn in
                calls(meta_model, torch.empty(bs, 3, args.img_size, args.img_size, device="meta"))}
        print(header)
        if args.cost_only:
            for name, (gib, gflop) in cost.items():
                print(f"{bs:>5} {name:<26} {'-':>9} {'-':>9} {gflop / cost['forward'][1]:>9.2f} "
                      f"{'-':>9} {gib:>10.2f} {gflop / bs:>9.1f} {'-':>9}")
            continue
        images = torch.randn(bs, 3, args.img_size, args.img_size, device=device)
        rows = []
        for name, fn in calls(model, images):
            sec, mib = measure(fn, device, args.repeats, args.warmup)
            sync = syncs(fn, device) if args.check_sync and name in args.methods else "-"
            rows.append((name, sec, mib, sync))
        base = rows[0][1]
        for name, sec, mib, sync in rows:
            gib, gflop = cost[name]
            print(f"{bs:>5} {name:<26} {bs / sec:>9.1f} {1000 * sec / bs:>9.2f} "
                  f"{sec / base:>9.2f} {mib:>9.0f} {gib:>10.2f} {gflop / bs:>9.1f} {sync:>9}")


if __name__ == "__main__":
    main()
