"""A user's own data on disk, as a newcomer would have it: photo folders, CSV manifests, a
miniature CUB-200-2011 tree (real JPEG/PNG files; generated, no downloads)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("robin", "wren")


def photo(path: Path, colour: int, size: tuple[int, int] = (40, 32), *, exif_orientation: int | None = None,
          seed: int = 0) -> Path:
    """A JPEG "photo": a bright square (the bird) on a noisy background; `size` is (width, height)."""
    rng = np.random.default_rng(seed)
    w, h = size
    pixels = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
    pixels[h // 4: 3 * h // 4, w // 4: 3 * w // 4, colour % 3] = 230
    image = Image.fromarray(pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        image.save(path, format="JPEG", exif=exif.tobytes())
    else:
        image.save(path, format="PNG" if path.suffix.lower() == ".png" else "JPEG")
    return path


def photo_folder(root: Path, per_class: int = 10, classes=CLASSES) -> Path:
    """root/<class>/<i>.jpg: the plain "folder of photos, one folder per species"."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            photo(root / name / f"{i:03d}.jpg", c, seed=100 * c + i)
    return root


def csv_manifest(root: Path, per_class: int = 10, *, boxes: bool = True, rows: list[str] | None = None) -> Path:
    """root/manifest_user.csv (path,label[,x,y,w,h]) over root/img/<class>_<i>.jpg."""
    lines = ["path,label" + (",x,y,w,h" if boxes else "")]
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            rel = f"img/{name}_{i:03d}.jpg"
            photo(root / rel, c, seed=100 * c + i)
            lines.append(f"{rel},{name}" + (",10,8,20,16" if boxes else ""))
    lines += rows or []
    path = root / "birds.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def mini_cub(root: Path, per_class: int = 6) -> Path:
    """A CUB-200-2011 tree in miniature: images.txt, classes.txt, labels, split, boxes, segmentations/."""
    cub = root / "CUB_200_2011"
    images, labels, split, boxes = [], [], [], []
    classes = [f"{i + 1:03d}.{name.capitalize()}_Bird" for i, name in enumerate(CLASSES)]
    n = 0
    for c, folder in enumerate(classes):
        for i in range(per_class):
            n += 1
            rel = f"{folder}/{folder}_{i:04d}.jpg"
            photo(cub / "images" / rel, c, seed=100 * c + i)
            mask = np.zeros((32, 40), dtype=np.uint8)
            mask[8:24, 10:30] = 255
            (root / "segmentations" / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(root / "segmentations" / folder / f"{folder}_{i:04d}.png")
            images.append(f"{n} {rel}")
            labels.append(f"{n} {c + 1}")
            split.append(f"{n} {1 if i < per_class - 2 else 0}")
            boxes.append(f"{n} 10.0 8.0 20.0 16.0")
    (cub / "images.txt").write_text("\n".join(images) + "\n")
    (cub / "classes.txt").write_text("\n".join(f"{i + 1} {c}" for i, c in enumerate(classes)) + "\n")
    (cub / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (cub / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (cub / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    return root
