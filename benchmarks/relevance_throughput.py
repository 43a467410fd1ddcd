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

    python benchmarks/relevance_throughput.py --model vit_small_patch16_224 --img-size 224 \
        --batch-sizes 1 16 --device cpu
    python benchmarks/relevance_throughput.py --model vit_base_patch16_224 --batch-sizes 64 \
        --precision bf16 --cost-only
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
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
