"""Where samples come from: an image-folder tree, a CSV manifest or a CUB-200-2011 root.

`describe_source(path)` is cheap (lists folders, reads the CSV or classes.txt) and gives the
class names and whether masks / boxes exist; `index_source(...)` lists every sample per
split and checks that every listed file exists.
"""
from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vitlens.data.errors import DataError, MissingFileError
from vitlens.data.images import IMAGE_EXTENSIONS, UNSUPPORTED_IMAGE_EXTENSIONS, image_extension

__all__ = ["CUB_FILES", "Sample", "SourceInfo", "describe_source", "index_source", "stratified_split"]

SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
BOX_COLUMNS = ("x", "y", "w", "h")
CUB_FILES = ("images.txt", "classes.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt")


@dataclass(frozen=True)
class Sample:
    """One labelled image; `box` is `[x_min, y_min, x_max, y_max]` in the file's pixels."""

    path: str
    label: int
    mask: str | None = None
    box: tuple[float, float, float, float] | None = None


@dataclass
class SourceInfo:
    kind: str  # "folder", "split_folders", "csv" or "cub"
    root: Path
    class_names: list[str]
    has_masks: bool = False
    has_boxes: bool = False
    csv_path: Path | None = None
    rows: list[dict] = field(default_factory=list, repr=False)
    # image-like files in the class folders that cannot be read (extension -> paths); filled by index_source
    unsupported: dict[str, list[str]] = field(default_factory=dict, repr=False)


# ----------------------------------------------------------------------------- helpers


def _natural_sorted(labels) -> list[str]:
    labels = sorted(set(labels))
    if all(re.fullmatch(r"-?\d+", s) for s in labels):
        return sorted(labels, key=int)
    return labels


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_under(folder: Path, unsupported: dict[str, list[str]] | None = None) -> list[Path]:
    """Readable images under `folder` (names with trailing spaces count); image-like files
    Pillow cannot read (.heic, ...) are collected in `unsupported` by extension."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if f.startswith("."):
                continue
            ext = image_extension(f)
            if ext in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / f)
            elif unsupported is not None and ext in UNSUPPORTED_IMAGE_EXTENSIONS:
                unsupported.setdefault(ext, []).append(str(Path(dirpath) / f))
    return found


def stratified_split(labels, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices): per class, a seeded round(n * val_fraction) go to val.

    A class with at least 2 samples keeps at least one in each part (when 0 < val_fraction < 1).
    Independent of the order classes appear in; indices come back sorted.
    """
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_val = int(round(len(idx) * val_fraction))
        if val_fraction > 0 and len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val.append(rng.permutation(idx)[:n_val])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


# ----------------------------------------------------------------------------- describe


def _find_cub_root(path: Path) -> Path | None:
    for candidate in (path, path / "CUB_200_2011"):
        if candidate.is_dir() and any((candidate / f).exists() for f in ("images.txt", "image_class_labels.txt", "train_test_split.txt")):
            return candidate
    return None


def describe_source(path: str | os.PathLike) -> SourceInfo:
    """Detect the kind of data at `path` and read its class names (cheap)."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"data path not found: {path}")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DataError(f"data path {path} is a file but not a .csv manifest")
        return _describe_csv(path)
    cub = _find_cub_root(path)
    if cub is not None:
        return _describe_cub(cub)
    if (path / "manifest.csv").is_file():
        return _describe_csv(path / "manifest.csv")
    if (path / "train").is_dir():
        classes = [d.name for d in _subdirs(path / "train")]
        if not classes:
            raise DataError(f"{path / 'train'} holds no class folders")
        return SourceInfo("split_folders", path, classes)
    classes = [d.name for d in _subdirs(path)]
    if not classes:
        raise DataError(f"{path} holds no class folders, no manifest.csv and no CUB-200-2011 files")
    return SourceInfo("folder", path, classes)


def _describe_csv(csv_path: Path) -> SourceInfo:
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = columns
        rows = list(reader)
    missing = [c for c in ("path", "label") if c not in columns]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {', '.join(missing)} (columns: {', '.join(columns) or 'none'})")
    box_cols = [c for c in BOX_COLUMNS if c in columns]
    if box_cols and len(box_cols) != 4:
        raise DataError(f"{csv_path}: box columns need all of x,y,w,h; found only {','.join(box_cols)}")
    for n, row in enumerate(rows, start=2):
        if not (row.get("label") or "").strip():
            raise DataError(f"{csv_path} line {n}: empty label")
        if not (row.get("path") or "").strip():
            raise DataError(f"{csv_path} line {n}: empty path")
    classes_txt = csv_path.parent / "classes.txt"
    if classes_txt.is_file():
        class_names = [line.strip() for line in classes_txt.read_text().splitlines() if line.strip()]
        known = set(class_names)
        for n, row in enumerate(rows, start=2):
            if row["label"].strip() not in known:
                raise DataError(f"{csv_path} line {n}: label {row['label'].strip()!r} is not a class listed in {classes_txt}")
    else:
        class_names = _natural_sorted(row["label"].strip() for row in rows)
    if not class_names:
        raise DataError(f"{csv_path} lists no samples")
    return SourceInfo(
        "csv", csv_path.parent, class_names,
        has_masks="mask" in columns, has_boxes=len(box_cols) == 4, csv_path=csv_path, rows=rows,
    )


def _describe_cub(root: Path) -> SourceInfo:
    for name in CUB_FILES:
        if not (root / name).is_file():
            raise MissingFileError(f"CUB-200-2011 root {root} lacks {name}")
    if not (root / "images").is_dir():
        raise MissingFileError(f"CUB-200-2011 root {root} lacks the images/ folder")
    class_names = []
    for n, (number, name) in enumerate(_read_table(root / "classes.txt", 2), start=1):
        class_names.append(re.sub(r"^\d+\.", "", name).replace("_", " "))
    return SourceInfo("cub", root, class_names, has_masks=_cub_segmentations(root) is not None, has_boxes=True)


def _cub_segmentations(root: Path) -> Path | None:
    for candidate in (root / "segmentations", root.parent / "segmentations"):
        if candidate.is_dir():
            return candidate
    return None


def _read_table(path: Path, columns: int) -> list[list[str]]:
    table = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=columns - 1)
        if len(parts) != columns:
            raise DataError(f"{path} line {n}: expected {columns} fields, got {line!r}")
        table.append(parts)
    return table


# ----------------------------------------------------------------------------- index


def index_source(info: SourceInfo, *, mask_column: str = "mask") -> dict[str, list[Sample]]:
    """Every sample of each split the source defines ("train", maybe "val", maybe "test").

    Raises `MissingFileError` listing the first few missing files, `DataError` for an empty
    class folder or a folder of an unknown class.
    """
    if info.kind == "csv":
        splits = _index_csv(info, mask_column)
    elif info.kind == "cub":
        splits = _index_cub(info)
    elif info.kind == "split_folders":
        splits = {}
        for split in ("train", "val", "test"):
            if (info.root / split).is_dir():
                splits[split] = _index_folder(info.root / split, info.class_names, require_all=(split == "train"),
                                              unsupported=info.unsupported)
    else:
        splits = {"train": _index_folder(info.root, info.class_names, require_all=True, unsupported=info.unsupported)}
    _check_exist(info, splits)
    return splits


def _index_folder(folder: Path, class_names: list[str], *, require_all: bool,
                  unsupported: dict[str, list[str]] | None = None) -> list[Sample]:
    label_of = {name: i for i, name in enumerate(class_names)}
    samples = []
    present = _subdirs(folder)
    for d in present:
        if d.name not in label_of:
            raise DataError(f"class folder {d} is not a class of the training set (classes: {', '.join(class_names)})")
        images = _images_under(d, unsupported)
        if not images:
            raise DataError(f"class folder {d} holds no readable images (extensions: {' '.join(IMAGE_EXTENSIONS)}); "
                            "convert the photos to JPEG or PNG, or remove the folder")
        samples += [Sample(str(p), label_of[d.name]) for p in images]
    if not samples:
        raise DataError(f"{folder} holds no images in class folders")
    return samples


def _resolve(root: Path, value: str) -> str:
    p = Path(value)
    return str(p if p.is_absolute() else root / p)


def _index_csv(info: SourceInfo, mask_column: str) -> dict[str, list[Sample]]:
    csv_path = info.csv_path
    label_of = {name: i for i, name in enumerate(info.class_names)}
    if info.rows and mask_column != "mask" and mask_column not in info.rows[0]:
        raise DataError(f"{csv_path}: no column {mask_column!r} (mask_column)")
    splits: dict[str, list[Sample]] = {}
    for n, row in enumerate(info.rows, start=2):
        split_value = (row.get("split") or "train").strip().lower()
        split = SPLIT_ALIASES.get(split_value)
        if split is None:
            raise DataError(f"{csv_path} line {n}: split {row.get('split')!r} is not train, val or test")
        mask = (row.get(mask_column) or "").strip()
        box = None
        if info.has_boxes:
            raw = [(row.get(c) or "").strip() for c in BOX_COLUMNS]
            if any(raw):
                try:
                    x, y, w, h = (float(v) for v in raw)
                except ValueError:
                    raise DataError(f"{csv_path} line {n}: box x,y,w,h = {','.join(raw)} is not 4 numbers") from None
                if not all(math.isfinite(v) for v in (x, y, w, h)):
                    raise DataError(f"{csv_path} line {n}: box x,y,w,h = {','.join(raw)} is not finite; "
                                    "give 4 numbers, or leave all four empty for an image without a box")
                if w <= 0 or h <= 0:
                    raise DataError(f"{csv_path} line {n}: box has width {w} and height {h}; both must be > 0")
                box = (x, y, x + w, y + h)
        splits.setdefault(split, []).append(
            Sample(_resolve(info.root, row["path"].strip()), label_of[row["label"].strip()], _resolve(info.root, mask) if mask else None, box)
        )
    return splits


def _index_cub(info: SourceInfo) -> dict[str, list[Sample]]:
    root = info.root
    images = {i: p for i, p in _read_table(root / "images.txt", 2)}
    tables = {name: dict(_read_table(root / name, 2)) for name in ("image_class_labels.txt", "train_test_split.txt")}
    boxes = {row[0]: row[1:] for row in _read_table(root / "bounding_boxes.txt", 5)}
    for name, table in [*tables.items(), ("bounding_boxes.txt", boxes)]:
        lacking = [i for i in images if i not in table]
        if lacking:
            raise DataError(f"{root / name} has no line for image id {lacking[0]} ({len(lacking)} ids missing)")
    segmentations = _cub_segmentations(root)
    splits: dict[str, list[Sample]] = {"train": [], "test": []}
    n_classes = len(info.class_names)
    for image_id, rel in images.items():
        label = int(tables["image_class_labels.txt"][image_id]) - 1
        if not 0 <= label < n_classes:
            raise DataError(f"{root / 'image_class_labels.txt'}: image id {image_id} has class {label + 1}, not in classes.txt (1..{n_classes})")
        try:
            x, y, w, h = (float(v) for v in " ".join(boxes[image_id]).split())
        except ValueError:
            x = math.nan
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            raise DataError(f"{root / 'bounding_boxes.txt'}: image id {image_id} has box {' '.join(boxes[image_id])!r}; "
                            "need 4 finite numbers x y w h with w, h > 0")
        mask = str(segmentations / Path(rel).with_suffix(".png")) if segmentations is not None else None
        split = "train" if tables["train_test_split.txt"][image_id].strip() == "1" else "test"
        splits[split].append(Sample(str(root / "images" / rel), label, mask, (x, y, x + w, y + h)))
    return {k: v for k, v in splits.items() if v}


def _check_exist(info: SourceInfo, splits: dict[str, list[Sample]]) -> None:
    if info.kind in ("folder", "split_folders"):
        return  # listed from disk
    missing = []
    for samples in splits.values():
        for s in samples:
            for p in (s.path, s.mask):
                if p is not None and not os.path.isfile(p):
                    missing.append(p)
    if missing:
        where = info.csv_path or info.root
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise MissingFileError(f"{len(missing)} file(s) listed by {where} are missing: {shown}")
