"""The README's shortcut-alarm picture: one class's mean relevance map, epoch by epoch.

Reads what ``benchmarks/shortcut_alarm.py`` saved (``<run>.maps.npz`` and ``<run>.json``) and
draws, per explained epoch, the mean of the class's normalised maps (each map summed to 1,
negative relevance clipped) with its object ratio and the alarm epoch marked:

    python benchmarks/shortcut_figure.py /tmp/sc_demo/toybirds_shortcut_seed0 \\
        --classes data/toybirds_shortcut/classes.txt --class-name gold_hook_purple_spot_fan \\
        --out docs/img/shortcut_alarm.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="the run's path without suffix (<run>.maps.npz, <run>.json)")
    p.add_argument("--classes", type=Path, required=True, help="classes.txt of the dataset (label order)")
    p.add_argument("--class-name", required=True)
    p.add_argument("--method", default="transformer_attribution")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    names = Path(a.classes).read_text().split()
    if a.class_name not in names:
        raise SystemExit(f"error: class {a.class_name!r} is not in {a.classes} (classes: {', '.join(names)})")
    label = names.index(a.class_name)
    z = np.load(f"{a.run}.maps.npz")
    history = json.loads(Path(f"{a.run}.json").read_text())
    fired = [e["epoch"] for e in history["events"] if e["kind"] == "fired" and e["class_name"] == a.class_name
             and e["method"] == a.method]
    ratios = {e["epoch"]: e.get(f"object|{a.method}|{a.class_name}") for e in history["history"]}
    epochs = sorted(int(k.split("_")[1]) for k in z.files if k.startswith("labels_"))
    fig, axes = plt.subplots(1, len(epochs), figsize=(1.15 * len(epochs), 1.35))
    for ax, ep in zip(np.atleast_1d(axes), epochs):
        maps = z[f"maps_{ep}_{a.method}"][z[f"labels_{ep}"] == label].clip(min=0)
        maps = maps / np.maximum(maps.reshape(len(maps), -1).sum(1), 1e-300)[:, None, None]
        ax.imshow(maps.mean(0), cmap="jet", interpolation="nearest")
        r = ratios.get(ep)
        alarm = " ALARM" if fired and ep == fired[0] else ""
        ax.set_title(f"ep {ep}" + (f": {r:.2f}x" if r is not None else "") + alarm, fontsize=6,
                     color="red" if alarm else "black")
        ax.axis("off")
    fig.tight_layout(pad=0.2)
    fig.savefig(a.out, dpi=110, bbox_inches="tight")
    print(f"wrote {a.out} ({a.class_name}, {a.method}, epochs {epochs[0]}-{epochs[-1]}, alarm at {fired or 'never'})")


if __name__ == "__main__":
    main()
