"""Data speed: toy-bird generation, and ImageDataModule loaders against a plain PIL loop.

    python benchmarks/data_throughput.py [--out /tmp/toybirds_bench] [--num-workers 0]

Rows (one run, same files):
  generate   generate_toybirds with the default options (8 species x 420 images, 64 px,
             image + bird mask + parts mask PNGs each), seconds and images/s;
  render     the drawing alone (no PNG writing), images/s;
  baseline   plain loop: PIL open + convert + numpy -> normalised float tensor, no augmentation;
  train      ImageDataModule train loader (decode, mask, box, random resized crop, flip,
             normalise, collate);
  val        ImageDataModule val loader (decode, mask, box, resize, normalise, collate).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vitlens.data import ImageDataModule, generate_toybirds
from vitlens.data.toybirds import render_bird, toybird_species


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:8.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="where to generate (default: a temporary folder, removed after)")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    tmp = None
    out = Path(args.out) if args.out else Path(tmp := tempfile.mkdtemp()) / "toybirds"
    if out.exists():
        shutil.rmtree(out)
    rows = []
    try:
        t = time.perf_counter()
        manifest = generate_toybirds(out)
        seconds = time.perf_counter() - t
        n = 8 * 420
        rows.append(("generate (write 3 PNGs/img)", f"{seconds:8.2f}", _rate(n, seconds)))

        species = toybird_species(8)
        t = time.perf_counter()
        for i in range(400):
            render_bird(species[i % 8], np.random.default_rng(i), 64)
        seconds = time.perf_counter() - t
        rows.append(("render only", f"{seconds:8.2f}", _rate(400, seconds)))

        dm = ImageDataModule(str(out), image_size=64, batch_size=args.batch_size, num_workers=args.num_workers,
                             eval_resize="resize", crop_scale=(0.6, 1.0), color_jitter=0.0)
        dm.setup()
        paths = dm.train_dataset.paths
        mean, std = torch.tensor(dm.mean).view(3, 1, 1), torch.tensor(dm.std).view(3, 1, 1)
        t = time.perf_counter()
        for p in paths:
            with Image.open(p) as im:
                x = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
            (x - mean) / std
        seconds = time.perf_counter() - t
        rows.append(("baseline PIL loop (train files)", f"{seconds:8.2f}", _rate(len(paths), seconds)))

        for name, loader in (("ImageDataModule train loader", dm.train_dataloader()), ("ImageDataModule val loader", dm.val_dataloader())):
            t = time.perf_counter()
            n = sum(len(batch["label"]) for batch in loader)
            seconds = time.perf_counter() - t
            rows.append((name, f"{seconds:8.2f}", _rate(n, seconds)))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"\ntorch threads {torch.get_num_threads()}, num_workers {args.num_workers}, batch {args.batch_size}, {manifest.parent}")
    print(f"{'what':34s} {'seconds':>8s} {'img/s':>8s}")
    for row in rows:
        print(f"{row[0]:34s} {row[1]} {row[2]}")


if __name__ == "__main__":
    main()
