"""Toy birds: a seeded, procedural data set of cartoon bird species (the built-in demo).

Each species is a distinct combination of five part attributes: body colour, beak shape,
wing colour, wing pattern and tail shape. Any two of the default 8 species differ in at
least 4 of the 5 attributes, and in at least one colour, so a small ViT learns them from
scratch in minutes; no single attribute gives the species away. Birds are drawn at a random
position, size (`bird_size`: length 55-80% of the image side), tilt (+-25 degrees) and facing,
on a cluttered background (`distractors`: 2-5 shapes) whose shapes use the birds' own palette,
the same for every class (they carry no label information).

Written layout (a CSV manifest that `ImageDataModule` reads directly)::

    DIR/manifest.csv       path,label,split,mask,x,y,w,h,parts_mask
    DIR/classes.txt        the species names, one a line, in label order
    DIR/toybirds.json      the options it was generated with
    DIR/images/<split>/<species>/<n>.png
    DIR/masks/<split>/<species>/<n>.png   whole bird (255) vs background (0)
    DIR/parts/<split>/<species>/<n>.png   discriminative parts: beak, wing, tail (255)

`x,y,w,h` is the whole bird's pixel box. With `shortcut=True` every TRAIN image also gets a
small square whose corner and colour depend on the class (see `shortcut_box`): a model can
learn it instead of the bird, and then fails on val/test, where it is absent.

A realistic shortcut is in every split: with `shortcut_probability=p` (0 < p <= 1) each image
of EVERY split gets the class's mark with probability p (a seeded draw per image, independent
of the drawing), so validation accuracy stays high and does not reveal it; the manifest gets a
`shortcut` column (1 = marked), and `DIR/counterfactual/` holds a clean counterfactual test
split: the same test birds, pixel for pixel, without any mark (its own manifest.csv: the
same train and val rows, pointing into DIR, and the clean test rows; so
`--data.path DIR/counterfactual --split test` evaluates on it).

    python -m vitlens.data.toybirds --out data/toybirds
    python -m vitlens.data.toybirds --out /tmp/tb --shortcut --preview tb.png
    python -m vitlens.data.toybirds --out data/toybirds_shortcut --shortcut-probability 0.8
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SPLITS",
    "Species",
    "generate_toybirds",
    "main",
    "preview_grid",
    "render_bird",
    "shortcut_box",
    "toybird_species",
    "toybird_species_names",
    "toybirds_options",
]

SPLITS = ("train", "val", "test")

# One palette for birds AND distractors: colour alone never tells a bird from the clutter.
PALETTE = {
    "red": (205, 38, 38),
    "gold": (238, 190, 25),
    "blue": (38, 88, 212),
    "green": (36, 158, 60),
    "black": (28, 28, 32),
    "white": (242, 242, 242),
    "orange": (246, 128, 18),
    "purple": (138, 58, 182),
}
BODY_COLOURS = ("red", "gold", "blue", "green")
WING_COLOURS = ("black", "white", "orange", "purple")
PATTERN_COLOUR = {"black": (236, 236, 236), "white": (24, 24, 24), "orange": (92, 38, 8), "purple": (245, 245, 245)}
BEAKS = ("cone", "needle", "hook", "spoon")
PATTERNS = ("plain", "stripe", "spot", "bar")
TAILS = ("fan", "fork", "spike", "square")
ATTRIBUTES = (BODY_COLOURS, BEAKS, WING_COLOURS, PATTERNS, TAILS)
MAX_SPECIES = int(np.prod([len(a) for a in ATTRIBUTES]))
SHORTCUT_COLOURS = ((255, 0, 255), (0, 255, 255), (255, 255, 0), (0, 0, 0))
BEAK_COLOUR = (52, 48, 44)
EYE_COLOUR = (12, 12, 12)


@dataclass(frozen=True)
class Species:
    """One species: its part attributes; `name` spells them out."""

    body: str
    beak: str
    wing: str
    pattern: str
    tail: str

    @property
    def name(self) -> str:
        return f"{self.body}_{self.beak}_{self.wing}_{self.pattern}_{self.tail}"


def toybird_species(num_species: int = 8) -> list[Species]:
    """The species of a toy-bird set, deterministic in `num_species` (no generation needed).

    Greedy max-min Hamming code over the 5 attributes (4 values each), starting from a
    distance-4 code, ties broken towards balanced use of every attribute value; the first n
    species of a larger set are the n species of the smaller one.
    """
    if not 2 <= num_species <= MAX_SPECIES:
        raise ValueError(f"toy birds: num_species must be in 2..{MAX_SPECIES}, got {num_species}")
    n_attr = len(ATTRIBUTES)
    everything = np.array(list(itertools.product(*[range(len(a)) for a in ATTRIBUTES])), dtype=np.int64)
    everything = everything[np.random.default_rng(20210607).permutation(len(everything))]
    # the 16 words of a [5, 2, 4] MDS code over GF(4) (x, y, x+y, x+a*y, x+a^2*y): any two
    # differ in >= 4 attributes; the greedy search starts from them, then goes on over all.
    gf_mul = np.array([[0, 0, 0, 0], [0, 1, 2, 3], [0, 2, 3, 1], [0, 3, 1, 2]])
    mds = np.array([[x, y, x ^ y, x ^ gf_mul[2, y], x ^ gf_mul[3, y]] for x in range(4) for y in range(4)])
    chosen: list[np.ndarray] = []
    usage = np.zeros((n_attr, 4), dtype=np.int64)
    for pool in (mds, everything):
        while len(chosen) < num_species:
            taken = np.array(chosen).reshape(-1, n_attr)
            dist = (pool[:, None, :] != taken[None]).sum(-1).min(1) if len(taken) else np.full(len(pool), n_attr)
            if dist.max() == 0:
                break  # pool used up
            used = usage[np.arange(n_attr)[None, :], pool]  # prefer rarely used values
            pick = int(np.argmax(np.minimum(dist, 4) * 10**6 - used.max(1) * 10**3 - used.sum(1)))
            chosen.append(pool[pick])
            usage[np.arange(n_attr), pool[pick]] += 1
    return [Species(*(attr[v] for attr, v in zip(ATTRIBUTES, code))) for code in chosen]


def toybird_species_names(num_species: int = 8) -> list[str]:
    """Class names of a toy-bird set with `num_species` species, in label order."""
    return [s.name for s in toybird_species(num_species)]


# ----------------------------------------------------------------------------- drawing
# Canonical bird: facing right (+x), centred near the origin, y down, about 1.3 units long.


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 28) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


WING = (-0.04, -0.02, 0.21, 0.105)  # cx, cy, rx, ry


def _wing_band(x0: float, x1: float, n: int = 10) -> np.ndarray:
    """The part of the wing ellipse between x0 and x1, as a polygon."""
    cx, cy, rx, ry = WING
    xs = np.linspace(x0, x1, n)
    half = ry * np.sqrt(np.clip(1 - ((xs - cx) / rx) ** 2, 0, 1))
    return np.concatenate([np.stack([xs, cy - half], 1), np.stack([xs[::-1], (cy + half)[::-1]], 1)])


BEAK_SHAPES = {
    "cone": np.array([[0.40, -0.215], [0.54, -0.16], [0.40, -0.105]]),
    "needle": np.array([[0.40, -0.185], [0.72, -0.155], [0.40, -0.135]]),
    "hook": np.array([[0.40, -0.22], [0.52, -0.215], [0.60, -0.17], [0.58, -0.09], [0.53, -0.14], [0.40, -0.12]]),
    "spoon": np.array([[0.40, -0.20], [0.50, -0.185], [0.60, -0.215], [0.62, -0.12], [0.50, -0.135], [0.40, -0.125]]),
}
TAIL_SHAPES = {
    "fan": np.array([[-0.26, -0.04], [-0.50, -0.22], [-0.60, -0.06], [-0.56, 0.10], [-0.26, 0.05]]),
    "fork": np.array([[-0.26, -0.05], [-0.66, -0.18], [-0.44, -0.005], [-0.66, 0.15], [-0.26, 0.05]]),
    "spike": np.array([[-0.26, -0.05], [-0.72, -0.005], [-0.26, 0.05]]),
    "square": np.array([[-0.26, -0.08], [-0.52, -0.08], [-0.52, 0.08], [-0.26, 0.08]]),
}
BODY = _ellipse(0.0, 0.0, 0.31, 0.19)
HEAD = _ellipse(0.29, -0.16, 0.125, 0.125)
EYE = _ellipse(0.33, -0.19, 0.03, 0.03, 12)
LEGS = [np.array([[-0.05, 0.17], [-0.08, 0.33]]), np.array([[0.06, 0.17], [0.05, 0.33]])]


def _wing_pattern(pattern: str) -> list[np.ndarray]:
    cx, cy, rx, ry = WING
    if pattern == "stripe":
        return [_wing_band(cx - rx + w * k, cx - rx + w * k + w * 0.5) for w in [2 * rx / 4.5] for k in (1, 2, 3)]
    if pattern == "spot":
        return [_ellipse(cx + dx, cy + dy, 0.035, 0.035, 12) for dx, dy in ((-0.11, -0.02), (0.0, 0.03), (0.1, -0.02), (-0.02, -0.055))]
    if pattern == "bar":
        return [_wing_band(cx - rx, cx - rx * 0.3)]
    return []


def _affine(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def _polygon(draw: ImageDraw.ImageDraw, points: np.ndarray, fill) -> None:
    draw.polygon([tuple(p) for p in points.tolist()], fill=fill)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A soft vertical gradient between two muted colours, random (class-independent)."""
    top, bottom = rng.uniform(150, 235, 3), rng.uniform(110, 225, 3)
    t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    rows = (top * (1 - t) + bottom * t).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(np.broadcast_to(rows, (size, size, 3))))


def _distractors(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, count: tuple[int, int]) -> None:
    colours = list(PALETTE.values())
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        colour = colours[int(rng.integers(len(colours)))] if rng.random() < 0.7 else tuple(int(v) for v in rng.integers(60, 220, 3))
        kind = int(rng.integers(4))
        cx, cy = rng.uniform(0, size, 2)
        r = rng.uniform(0.04, 0.13) * size
        if kind == 0:  # blob
            _polygon(draw, _ellipse(cx, cy, r, r * rng.uniform(0.5, 1.0), 16), colour)
        elif kind == 1:  # box
            draw.rectangle([cx - r, cy - r * 0.7, cx + r, cy + r * 0.7], fill=colour)
        elif kind == 2:  # leaf: a thin rotated ellipse
            a = rng.uniform(0, np.pi)
            rot = np.array([[np.cos(a), -np.sin(a), cx], [np.sin(a), np.cos(a), cy]])
            _polygon(draw, _affine(_ellipse(0, 0, r * 1.3, r * 0.35, 16), rot), colour)
        else:  # branch: a thick line across
            a = rng.uniform(0, np.pi)
            d = np.array([np.cos(a), np.sin(a)]) * r * 3
            draw.line([cx - d[0], cy - d[1], cx + d[0], cy + d[1]], fill=colour, width=max(1, int(size * 0.03)))


def shortcut_box(label: int, image_size: int = 64, side: int | None = None) -> tuple[int, int, int, int]:
    """(x, y, w, h) of the class-`label` shortcut mark in an `image_size` image.

    Corner = label % 4 (top-left, top-right, bottom-right, bottom-left); colour =
    SHORTCUT_COLOURS[(label // 4) % 4]; classes 16 apart share a mark. `side`: the mark's
    side in pixels (default `image_size // 12`, at least 2).
    """
    side = max(2, image_size // 12) if side is None else int(side)
    margin = max(1, image_size // 32)
    far = image_size - margin - side
    x, y = [(margin, margin), (far, margin), (far, far), (margin, far)][label % 4]
    return x, y, side, side


def render_bird(
    species: Species,
    rng: np.random.Generator,
    image_size: int = 64,
    *,
    supersample: int = 2,
    shortcut_label: int | None = None,
    shortcut_size: int | None = None,
    bird_size: tuple[float, float] = (0.55, 0.8),
    distractors: tuple[int, int] = (2, 5),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one bird: (image HxWx3 uint8, bird mask HxW bool, parts mask HxW bool).

    `bird_size`: range of the bird's length as a fraction of the image side;
    `distractors`: inclusive range of the number of clutter shapes behind it.
    """
    size = image_size * supersample
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    _distractors(draw, rng, size, distractors)

    # pose: facing, tilt, length a bird_size fraction of the image, anywhere that keeps it inside
    length = rng.uniform(*bird_size) * size
    scale = length / 1.35
    angle = np.deg2rad(rng.uniform(-25, 25))
    flip = -1.0 if rng.random() < 0.5 else 1.0
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    matrix = np.array([[c * flip, -s, 0.0], [s * flip, c, 0.0]])
    beak, tail = BEAK_SHAPES[species.beak], TAIL_SHAPES[species.tail]
    extent = _affine(np.concatenate([BODY, HEAD, beak, tail, *LEGS]), matrix)
    lo, hi = extent.min(0), extent.max(0)
    pad = 1.0
    shift = rng.uniform(-lo + pad, size - hi - pad) if np.all(size - hi - pad > -lo + pad) else (size - lo - hi) / 2
    matrix[:, 2] = shift

    body_rgb, wing_rgb = PALETTE[species.body], PALETTE[species.wing]
    pattern_rgb = PATTERN_COLOUR[species.wing]
    bird = Image.new("L", (size, size), 0)
    parts = Image.new("L", (size, size), 0)
    dbird, dparts = ImageDraw.Draw(bird), ImageDraw.Draw(parts)
    leg_width = max(supersample, int(scale * 0.035))  # at least one output pixel: legs stay in the mask
    for leg in LEGS:
        ends = [tuple(q) for q in _affine(leg, matrix).tolist()]
        draw.line(ends, fill=BEAK_COLOUR, width=leg_width)
        dbird.line(ends, fill=255, width=leg_width)
    layers = [(tail, wing_rgb, True), (BODY, body_rgb, False), (HEAD, body_rgb, False), (beak, BEAK_COLOUR, True)]
    wing_poly = _ellipse(*WING)
    layers += [(wing_poly, wing_rgb, True)] + [(p, pattern_rgb, True) for p in _wing_pattern(species.pattern)]
    layers += [(EYE, EYE_COLOUR, False)]
    for points, rgb, is_part in layers:
        p = _affine(points, matrix)
        _polygon(draw, p, rgb)
        _polygon(dbird, p, 255)
        if is_part:
            _polygon(dparts, p, 255)

    if shortcut_label is not None:
        x, y, w, h = (v * supersample for v in shortcut_box(shortcut_label, image_size, shortcut_size))
        draw.rectangle([x, y, x + w - 1, y + h - 1], fill=SHORTCUT_COLOURS[(shortcut_label // 4) % 4])

    if supersample > 1:
        image = image.reduce(supersample)
        bird, parts = bird.reduce(supersample), parts.reduce(supersample)
    bird_mask = np.asarray(bird) >= 128
    parts_mask = (np.asarray(parts) >= 128) & bird_mask
    return np.asarray(image), bird_mask, parts_mask


# ----------------------------------------------------------------------------- writing


def toybirds_options(
    *,
    num_species: int = 8,
    image_size: int = 64,
    train_per_class: int = 300,
    val_per_class: int = 60,
    test_per_class: int = 60,
    shortcut: bool = False,
    shortcut_probability: float = 0.0,
    shortcut_size: int | None = None,
    seed: int = 0,
    bird_size: tuple[float, float] = (0.55, 0.8),
    distractors: tuple[int, int] = (2, 5),
) -> dict:
    """The full, validated option dict of a toy-bird set (as stored in toybirds.json)."""
    toybird_species(num_species)  # validates num_species
    if image_size < 16:
        raise ValueError(f"toy birds: image_size must be >= 16, got {image_size}")
    for key, n in (("train_per_class", train_per_class), ("val_per_class", val_per_class), ("test_per_class", test_per_class)):
        if n < 0:
            raise ValueError(f"toy birds: {key} must be >= 0, got {n}")
    if not 0.0 <= float(shortcut_probability) <= 1.0:
        raise ValueError(f"toy birds: shortcut_probability must be in [0, 1], got {shortcut_probability}")
    if shortcut and shortcut_probability > 0:
        raise ValueError("toy birds: choose shortcut (train split only) or shortcut_probability (every split), not both")
    if shortcut_size is not None and not 2 <= int(shortcut_size) <= image_size // 3:
        raise ValueError(f"toy birds: shortcut_size must be 2..{image_size // 3} pixels for {image_size}-px images, got {shortcut_size}")
    low, high = (float(v) for v in bird_size)
    if not 0.1 <= low <= high <= 0.95:
        raise ValueError(f"toy birds: bird_size must be a range within [0.1, 0.95], got {list(bird_size)}")
    fewest, most = (int(v) for v in distractors)
    if not 0 <= fewest <= most:
        raise ValueError(f"toy birds: distractors must be a range of counts (min <= max), got {list(distractors)}")
    return {
        "num_species": int(num_species),
        "image_size": int(image_size),
        "train_per_class": int(train_per_class),
        "val_per_class": int(val_per_class),
        "test_per_class": int(test_per_class),
        "shortcut": bool(shortcut),
        **({"shortcut_probability": float(shortcut_probability)} if shortcut_probability > 0 else {}),
        **({"shortcut_size": int(shortcut_size)} if shortcut_size is not None else {}),
        "seed": int(seed),
        "bird_size": [low, high],
        "distractors": [fewest, most],
    }


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, compress_level=1)


def generate_toybirds(
    out: str | os.PathLike,
    num_species: int = 8,
    *,
    image_size: int = 64,
    train_per_class: int = 300,
    val_per_class: int = 60,
    test_per_class: int = 60,
    shortcut: bool = False,
    shortcut_probability: float = 0.0,
    shortcut_size: int | None = None,
    seed: int = 0,
    bird_size: tuple[float, float] = (0.55, 0.8),
    distractors: tuple[int, int] = (2, 5),
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write a toy-bird data set to `out` (atomically) and return its manifest's path.

    Same options -> the same bytes. If `out` already holds a toy-bird set with the same
    options it is left alone; with other options it is an error unless `overwrite`. The set
    is written to a temporary sibling folder and renamed into place, so a concurrent reader
    (another DDP rank) sees either nothing or the whole set.
    """
    options = toybirds_options(
        num_species=num_species, image_size=image_size, train_per_class=train_per_class,
        val_per_class=val_per_class, test_per_class=test_per_class, shortcut=shortcut,
        shortcut_probability=shortcut_probability, shortcut_size=shortcut_size, seed=seed, bird_size=bird_size,
        distractors=distractors,
    )
    out = Path(out)
    manifest = out / "manifest.csv"
    if manifest.exists() and not overwrite:
        existing = read_toybirds_options(out)
        if existing is not None:
            # sets written before these options existed used bird_size (0.45, 0.75), distractors (3, 7)
            existing = toybirds_options(**{"bird_size": (0.45, 0.75), "distractors": (3, 7), **existing})
        if existing != options:
            raise ValueError(
                f"{out} already holds toy birds generated with {existing}, not {options}: "
                "delete it, choose another folder, or pass overwrite=True"
            )
        return manifest
    if out.exists() and not manifest.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a toy-bird data set (no manifest.csv); refusing to write into it")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write(tmp, options, progress=progress)
        if overwrite and out.exists():
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, trash)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, out)  # atomic; replaces an empty folder
        except OSError:
            if not manifest.exists():  # someone else's partial or unrelated folder
                raise
            # another process finished first with the same seed: keep theirs
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def read_toybirds_options(root: str | os.PathLike) -> dict | None:
    """The options a toy-bird folder was generated with (None if it has no toybirds.json)."""
    path = Path(root) / "toybirds.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _write(root: Path, options: dict, *, progress: bool) -> None:
    species = toybird_species(options["num_species"])
    size = options["image_size"]
    counts = {"train": options["train_per_class"], "val": options["val_per_class"], "test": options["test_per_class"]}
    root.mkdir(parents=True)
    rows, clean_rows = [], []
    probability = float(options.get("shortcut_probability", 0.0))
    total = sum(counts.values()) * len(species)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"toy birds -> {root.name}", unit="img")
    for split_id, split in enumerate(SPLITS):
        for label, sp in enumerate(species):
            if counts[split] == 0:
                continue
            for kind in ("images", "masks", "parts"):
                (root / kind / split / sp.name).mkdir(parents=True)
            mark = label if (options["shortcut"] and split == "train") else None
            if probability > 0 and split == "test":
                for kind in ("images", "masks", "parts"):
                    (root / "counterfactual" / kind / split / sp.name).mkdir(parents=True)
            for i in range(counts[split]):
                if probability > 0:  # its own draw: the bird is the same whether marked or not
                    marked = bool(np.random.default_rng([options["seed"], split_id, label, i, 1]).random() < probability)
                    mark = label if marked else None
                rng = np.random.default_rng([options["seed"], split_id, label, i])
                image, bird, parts = render_bird(sp, rng, size, shortcut_label=mark,
                                                 shortcut_size=options.get("shortcut_size"), bird_size=options["bird_size"], distractors=options["distractors"])
                rel = f"{split}/{sp.name}/{i:05d}.png"
                _save_png(image, root / "images" / rel)
                _save_png(bird.astype(np.uint8) * 255, root / "masks" / rel)
                _save_png(parts.astype(np.uint8) * 255, root / "parts" / rel)
                ys, xs = np.nonzero(bird)
                x0, y0 = int(xs.min()), int(ys.min())
                row = [f"images/{rel}", sp.name, split, f"masks/{rel}", x0, y0,
                       int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0, f"parts/{rel}"]
                rows.append(row + ([int(mark is not None)] if probability > 0 else []))
                if probability > 0 and split == "test":
                    clean = image
                    if mark is not None:
                        clean, _, _ = render_bird(sp, np.random.default_rng([options["seed"], split_id, label, i]), size,
                                                  bird_size=options["bird_size"], distractors=options["distractors"])
                    cf = root / "counterfactual"
                    _save_png(clean, cf / "images" / rel)
                    _save_png(bird.astype(np.uint8) * 255, cf / "masks" / rel)
                    _save_png(parts.astype(np.uint8) * 255, cf / "parts" / rel)
                    clean_rows.append(row + [0])
            if bar is not None:
                bar.update(counts[split])
    if bar is not None:
        bar.close()
    header = ["path", "label", "split", "mask", "x", "y", "w", "h", "parts_mask"] + (["shortcut"] if probability > 0 else [])
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    (root / "classes.txt").write_text("".join(f"{s.name}\n" for s in species))
    if clean_rows:
        # train and val as in the main set (paths into it), test clean
        parent = [["../" + r[0], *r[1:3], "../" + r[3], *r[4:8], "../" + r[8], *r[9:]] for r in rows if r[2] != "test"]
        with open(root / "counterfactual" / "manifest.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(parent + clean_rows)
        (root / "counterfactual" / "classes.txt").write_text("".join(f"{s.name}\n" for s in species))
    (root / "toybirds.json").write_text(json.dumps(options, indent=1, sort_keys=True) + "\n")


def preview_grid(
    path: str | os.PathLike,
    num_species: int = 8,
    *,
    per_species: int = 8,
    image_size: int = 64,
    zoom: int = 2,
    shortcut: bool = False,
    seed: int = 0,
    bird_size: tuple[float, float] = (0.55, 0.8),
    distractors: tuple[int, int] = (2, 5),
) -> Path:
    """Write a PNG grid, one row per species, of freshly drawn birds (for the README)."""
    species = toybird_species(num_species)
    gap = 2
    cell = image_size * zoom
    grid = Image.new("RGB", (per_species * (cell + gap) + gap, num_species * (cell + gap) + gap), (255, 255, 255))
    for label, sp in enumerate(species):
        for i in range(per_species):
            rng = np.random.default_rng([seed, 9, label, i])
            image, _, _ = render_bird(sp, rng, image_size, shortcut_label=label if shortcut else None,
                                      bird_size=bird_size, distractors=distractors)
            tile = Image.fromarray(image).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (gap + i * (cell + gap), gap + label * (cell + gap)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vitlens.data.toybirds", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder to create (must not exist, or hold the same set)")
    parser.add_argument("--num-species", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--val-per-class", type=int, default=60)
    parser.add_argument("--test-per-class", type=int, default=60)
    parser.add_argument("--shortcut", action="store_true", help="plant a class-coloured corner mark in train images")
    parser.add_argument("--shortcut-probability", type=float, default=0.0, metavar="P",
                        help="plant the mark in images of EVERY split with probability P (+ a clean counterfactual test split)")
    parser.add_argument("--shortcut-size", type=int, default=None, metavar="PX", help="side of the mark (default: image size / 12)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bird-size", type=float, nargs=2, default=(0.55, 0.8), metavar=("MIN", "MAX"),
                        help="bird length as a fraction of the image side")
    parser.add_argument("--distractors", type=int, nargs=2, default=(2, 5), metavar=("MIN", "MAX"),
                        help="number of clutter shapes per image")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--preview", metavar="PNG", help="also write a preview grid to this file")
    args = parser.parse_args(argv)
    manifest = generate_toybirds(
        args.out, args.num_species, image_size=args.image_size, train_per_class=args.train_per_class,
        val_per_class=args.val_per_class, test_per_class=args.test_per_class, shortcut=args.shortcut,
        shortcut_probability=args.shortcut_probability, shortcut_size=args.shortcut_size, seed=args.seed, bird_size=tuple(args.bird_size), distractors=tuple(args.distractors),
        overwrite=args.overwrite, progress=True,
    )
    print(f"toy birds: {manifest}")
    if args.preview:
        grid = preview_grid(args.preview, args.num_species, image_size=args.image_size,
                            shortcut=args.shortcut or args.shortcut_probability > 0, seed=args.seed,
                            bird_size=tuple(args.bird_size), distractors=tuple(args.distractors))
        print(f"preview: {grid}")


if __name__ == "__main__":
    main()
