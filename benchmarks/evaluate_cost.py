"""`explain.py evaluate`: wall time of this checkout against a baseline checkout, same job, one run.

    python benchmarks/evaluate_cost.py --baseline /path/to/old/checkout --ckpt RUN.ckpt \
        --data-path data/toybirds --limit 300 \
        --methods transformer_attribution grad_rollout rollout raw_attention random

Runs the baseline's `explain.py evaluate` and this checkout's, alternately (`--repeats` rounds),
in subprocesses on the same checkpoint, images and options, and prints a table: seconds per
run (median), images/s, speed-up, and whether the two reports' numbers are identical (every
score of every method, compared exactly). The baseline may be any older vitlens checkout
(e.g. `git worktree add /tmp/old <commit>`); its CLI spelling of the precision (`32`) is used
for it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def run(checkout: Path, args, out: Path, *, old: bool) -> float:
    cmd = [sys.executable, str(checkout / "explain.py"), "evaluate", "--ckpt", args.ckpt, "--data.path", args.data_path,
           "--split", args.split, "--limit", str(args.limit), "--methods", *args.methods,
           "--bootstrap", "0", "--out", str(out), "--batch-size", str(args.batch_size), "--no-progress"]
    if not old:
        cmd += ["--precision", "float32"]
    env = {**os.environ, "PYTHONPATH": str(checkout / "src"), "WANDB_MODE": "offline", "NO_ALBUMENTATIONS_UPDATE": "1"}
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{checkout}: explain.py evaluate failed:\n{result.stderr[-2000:]}")
    return elapsed


def scores(report: Path) -> dict:
    methods = json.loads(report.read_text())["methods"]
    return {m: {k: v for k, v in s.items() if isinstance(v, (int, float))} for m, s in methods.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", required=True, help="an older vitlens checkout to compare with")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data-path", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--methods", nargs="+",
                   default=["transformer_attribution", "grad_rollout", "rollout", "raw_attention", "random"])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--keep", help="keep the reports in this folder (default: a temporary one)")
    args = p.parse_args()
    baseline = Path(args.baseline).resolve()
    times = {"baseline": [], "this checkout": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.keep or tmp
        for r in range(args.repeats):
            for name, checkout, old in (("baseline", baseline, True), ("this checkout", HERE, False)):
                times[name].append(run(checkout, args, Path(tmp) / f"{name}{r}", old=old))
        old, new = (scores(Path(tmp) / f"{n}0" / "report.json") for n in ("baseline", "this checkout"))
        differ = [f"{m}.{k}: {old[m].get(k)} vs {new.get(m, {}).get(k)}" for m in old for k in old[m]
                  if old[m].get(k) != new.get(m, {}).get(k)]
        same = not differ
    base = statistics.median(times["baseline"])
    print(f"explain.py evaluate, {args.limit} {args.split} images, methods {' '.join(args.methods)}, "
          f"batch {args.batch_size}, {args.repeats} round(s), median")
    print(f"| code | s / run | images / s | speed-up |\n|---|---|---|---|")
    for name, values in times.items():
        t = statistics.median(values)
        print(f"| {name} | {t:.1f} | {args.limit / t:.1f} | {base / t:.2f}x |")
    print(f"report numbers identical: {same}")
    for line in differ:
        print("  differs:", line)


if __name__ == "__main__":
    main()
