"""vitlens.data: every source from real files on disk, transforms keeping masks and boxes
aligned, image-mode conversions, the split, the loaders and every bad input."""
from __future__ import annotations

import csv
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from vitlens.data import (
    CorruptImageError,
    DataError,
    ImageDataModule,
    ImageDataset,
    MissingFileError,
    Sample,
    denormalize,
    eval_transform,
    read_image,
    stratified_split,
    toybird_species_names,
    train_transform,
)

COLOURS = {"crow": (20, 20, 20), "finch": (230, 200, 20), "jay": (30, 60, 220)}


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _solid(colour, size=(20, 24)) -> np.ndarray:
    return np.broadcast_to(np.array(colour, np.uint8), (*size, 3)).copy()


def _module(path, **kw) -> ImageDataModule:
    options = dict(image_size=16, batch_size=2, num_workers=0, color_jitter=0.0, eval_resize="resize")
    options.update(kw)
    return ImageDataModule(str(path), **options)


def _colour_label(dm: ImageDataModule, batch: dict) -> list[str]:
    """Which class colour each image of a batch has (images are solid colours here)."""
    images = denormalize(batch["image"], dm.mean, dm.std).mean((2, 3)) * 255
    names = list(COLOURS)
    ref = torch.tensor([COLOURS[n] for n in names], dtype=torch.float32)
    return [names[int(i)] for i in torch.cdist(images, ref).argmin(1)]


def _check_labels(dm: ImageDataModule, loader) -> int:
    seen = 0
    for batch in loader:
        assert [dm.class_names[i] for i in batch["label"]] == _colour_label(dm, batch)
        seen += len(batch["label"])
    return seen


# ----------------------------------------------------------------------------- sources


def test_split_image_folders(tmp_path):
    for split, n in (("train", 3), ("val", 2), ("test", 1)):
        for name in COLOURS:
            for i in range(n):
                _save(tmp_path / split / name / f"{i}.png", _solid(COLOURS[name]))
    (tmp_path / "train" / "crow" / "notes.txt").write_text("not an image")
    dm = _module(tmp_path)
    assert dm.class_names == ["crow", "finch", "jay"] and dm.num_classes == 3
    assert not dm.has_masks and not dm.has_boxes
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (9, 6, 3)
    assert dm.train_dataset.class_names == dm.class_names
    assert "bboxes" not in dm.train_dataset.transform.processors  # no box handling cost without boxes
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label", "index"}
    assert batch["image"].shape == (2, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64
    assert _check_labels(dm, dm.train_dataloader()) == 8  # drop_last
    assert _check_labels(dm, dm.val_dataloader()) == 6
    assert [int(i) for b in dm.test_dataloader() for i in b["index"]] == [0, 1, 2]  # not shuffled


def test_single_tree_stratified_seeded_split(tmp_path):
    counts = {"crow": 10, "finch": 5, "jay": 20}
    for name, n in counts.items():
        for i in range(n):
            _save(tmp_path / name / f"{i:02d}.jpg", _solid(COLOURS[name]))
    dm = _module(tmp_path, val_fraction=0.2, seed=1)
    dm.setup()
    val_labels = np.bincount(dm.val_dataset.labels, minlength=3)
    assert val_labels.tolist() == [2, 1, 4]  # 20% of each class
    train, val = set(dm.train_dataset.paths), set(dm.val_dataset.paths)
    assert not train & val and len(train | val) == 35
    again = _module(tmp_path, val_fraction=0.2, seed=1)
    again.setup()
    assert again.val_dataset.paths == dm.val_dataset.paths  # seeded
    other = _module(tmp_path, val_fraction=0.2, seed=2)
    other.setup()
    assert other.val_dataset.paths != dm.val_dataset.paths
    assert _check_labels(dm, dm.val_dataloader()) == 7


def test_stratified_split_keeps_every_class_on_both_sides():
    labels = np.array([0] * 2 + [1] * 7 + [2] * 1)
    train, val = stratified_split(labels, 0.1, seed=0)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(10))
    assert set(labels[val]) == {0, 1} and set(labels[train]) == {0, 1, 2}


def _write_manifest(root: Path, rows: list[dict], name="manifest.csv") -> Path:
    path = root / name
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _box_image(rng, size=(30, 40)):
    """Black image with one white filled rectangle; its mask; its box [x0, y0, x1, y1)."""
    h, w = size
    x0, y0 = int(rng.integers(2, w // 2)), int(rng.integers(2, h // 2))
    x1, y1 = x0 + int(rng.integers(6, w // 2)), y0 + int(rng.integers(6, h // 2))
    image = np.zeros((h, w, 3), np.uint8)
    image[y0:y1, x0:x1] = 255
    mask = np.zeros((h, w), np.uint8)
    mask[y0:y1, x0:x1] = 255
    return image, mask, (x0, y0, x1 - x0, y1 - y0)


def test_csv_manifest_with_masks_boxes_and_relative_paths(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i, (name, split) in enumerate([("jay", "train"), ("crow", "train"), ("jay", "val"), ("crow", "test")]):
        image, mask, (x, y, w, h) = _box_image(rng)
        _save(tmp_path / "img" / f"{i}.png", image)
        _save(tmp_path / "mask" / f"{i}.png", mask)
        rows.append(dict(path=f"img/{i}.png", label=name, split=split, mask=f"mask/{i}.png", x=x, y=y, w=w, h=h))
    rows.append(dict(path=str(tmp_path / "img" / "0.png"), label="crow", split="train", mask="", x="", y="", w="", h=""))
    manifest = _write_manifest(tmp_path, rows)
    dm = _module(manifest, image_size=20, batch_size=3)
    assert dm.class_names == ["crow", "jay"] and dm.has_masks and dm.has_boxes
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (3, 1, 1)
    item = dm.train_dataset[2]  # absolute path, no mask, no box
    assert not item["has_mask"] and not item["has_box"] and item["mask"].sum() == 0 and item["box"].sum() == 0
    batch = next(iter(dm.val_dataloader()))
    assert batch["mask"].shape == (1, 20, 20) and batch["box"].shape == (1, 4) and batch["has_box"].all()
    assert set(torch.unique(batch["mask"]).tolist()) <= {0.0, 1.0}

    # classes.txt beside the CSV fixes the order; folders holding manifest.csv work too
    (tmp_path / "classes.txt").write_text("jay\ncrow\nwren\n")
    dm = _module(tmp_path)
    assert dm.class_names == ["jay", "crow", "wren"]
    dm.setup()
    assert dm.val_dataset.labels.tolist() == [0]


def test_integer_labels_sort_numerically(tmp_path):
    _save(tmp_path / "a.png", _solid((1, 2, 3)))
    manifest = _write_manifest(tmp_path, [dict(path="a.png", label=str(n)) for n in (10, 2, 1, 2, 10, 1)])
    assert _module(manifest).class_names == ["1", "2", "10"]


def _write_cub(root: Path, *, segmentations=True) -> None:
    rng = np.random.default_rng(1)
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    lines = {k: [] for k in ("images", "labels", "split", "boxes")}
    image_id = 0
    for c, cls in enumerate(classes):
        for k in range(3):
            image_id += 1
            rel = f"{cls}/{cls.split('.')[1]}_{k}.jpg"
            image, mask, (x, y, w, h) = _box_image(rng)
            _save(root / "images" / rel, image)
            if segmentations:
                _save((root / "segmentations" / rel).with_suffix(".png"), mask)
            lines["images"].append(f"{image_id} {rel}")
            lines["labels"].append(f"{image_id} {c + 1}")
            lines["split"].append(f"{image_id} {int(k < 2)}")
            lines["boxes"].append(f"{image_id} {x}.0 {y}.0 {w}.0 {h}.0")
    (root / "classes.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    for name, key in (("images", "images"), ("image_class_labels", "labels"), ("train_test_split", "split"), ("bounding_boxes", "boxes")):
        (root / f"{name}.txt").write_text("\n".join(lines[key]) + "\n")


def test_cub_root(tmp_path):
    root = tmp_path / "CUB_200_2011"
    _write_cub(root)
    dm = _module(tmp_path, val_fraction=0.0, image_size=24, eval_resize="resize")  # the parent folder works too
    assert dm.class_names == ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross"]
    assert dm.has_masks and dm.has_boxes
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (6, 3, 3)  # val = official test
    assert dm.train_dataset.labels.tolist() == [0, 0, 1, 1, 2, 2]
    for batch in dm.val_dataloader():
        _assert_aligned(dm, batch)
    dm = _module(root, val_fraction=0.5)
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (3, 3, 3)


# ----------------------------------------------------------------------------- alignment


def _assert_aligned(dm_or_stats, batch, tolerance=1.0):
    mean, std = (dm_or_stats.mean, dm_or_stats.std) if hasattr(dm_or_stats, "mean") else dm_or_stats
    bright = denormalize(batch["image"], mean, std).mean(1) > 0.5  # the white rectangle
    mask = batch["mask"] > 0.5
    # interpolation may blur the rectangle's edge by a pixel: compare away from the mask's border
    m = mask[:, None].float()
    dilated = torch.nn.functional.max_pool2d(m, 3, 1, 1)[:, 0] > 0
    eroded = -torch.nn.functional.max_pool2d(-m, 3, 1, 1)[:, 0] > 0
    interior = ~(dilated & ~eroded)
    for b in range(len(bright)):
        assert torch.equal(bright[b][interior[b]], mask[b][interior[b]]), "image and mask disagree"
        if batch["has_box"][b]:
            ys, xs = torch.nonzero(mask[b], as_tuple=True)
            expected = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
            assert torch.allclose(batch["box"][b], expected, atol=tolerance), (batch["box"][b], expected)
        else:
            assert not mask[b].any()  # the object was cropped away


def test_masks_and_boxes_follow_train_and_eval_transforms(tmp_path):
    rng = np.random.default_rng(5)
    samples = []
    for i in range(6):
        image, mask, (x, y, w, h) = _box_image(rng, size=(48, 64))
        samples.append(Sample(str(_save(tmp_path / f"{i}.png", image)), 0, str(_save(tmp_path / f"m{i}.png", mask)),
                              (x, y, x + w, y + h)))
    stats = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    pipelines = [
        train_transform(32, *stats, crop_scale=(0.3, 1.0), hflip=0.5, color_jitter=0.0, seed=0),
        eval_transform(32, *stats, eval_resize="center_crop", crop_pct=0.875),
        eval_transform(32, *stats, eval_resize="resize"),
    ]
    flipped, compared = 0, 0
    for transform in pipelines:
        dataset = ImageDataset(samples, ["box"], transform)
        for _ in range(4 if transform is pipelines[0] else 1):
            batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
            _assert_aligned(stats, batch)
            compared += int((batch["mask"].flatten(1).sum(1) > 9).sum())
            flipped += int((batch["box"][:, 0] > 16).sum())
    assert flipped > 0  # boxes did move around
    assert compared > 30  # most crops kept a real part of the object


def test_transforms_seeded_and_different_per_draw(tmp_path):
    rng = np.random.default_rng(2)
    image, mask, (x, y, w, h) = _box_image(rng)
    samples = [Sample(str(_save(tmp_path / "a.png", image)), 0, None, (x, y, x + w, y + h))]

    def draws(seed):
        torch.manual_seed(seed)
        ds = ImageDataset(samples, ["a"], train_transform(16, (0.5,) * 3, (0.5,) * 3, crop_scale=(0.2, 1.0)))
        return torch.stack([ds[0]["image"] for _ in range(4)])

    a, b, c = draws(0), draws(0), draws(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])


# ----------------------------------------------------------------------------- image modes


def test_read_image_converts_every_mode(tmp_path):
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    gray = np.full((4, 6), 90, np.uint8)
    cases = {}

    def case(name, image, expected, **save):
        path = tmp_path / name
        image.save(path, **save)
        cases[name] = (path, np.broadcast_to(np.array(expected, np.uint8), (4, 6, 3)))

    case("gray.png", Image.fromarray(gray), (90, 90, 90))
    case("bilevel.png", Image.fromarray(gray).convert("1", dither=Image.Dither.NONE), (0, 0, 0))  # 90 < 128 -> black
    case("palette.png", Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE), (200, 100, 50))
    rgba = np.dstack([rgb, np.full((4, 6), 0, np.uint8)])
    case("transparent.png", Image.fromarray(rgba, "RGBA"), (255, 255, 255))  # composited on white
    half = np.dstack([rgb, np.full((4, 6), 255, np.uint8)])
    case("opaque.png", Image.fromarray(half, "RGBA"), (200, 100, 50))
    case("gray_alpha.png", Image.fromarray(np.dstack([gray, np.full_like(gray, 255)]), "LA"), (90, 90, 90))
    palette_t = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE)
    case("palette_transparent.png", palette_t, (255, 255, 255), transparency=palette_t.getpixel((0, 0)))
    case("cmyk.jpg", Image.new("CMYK", (6, 4), (0, 255, 255, 0)), (255, 0, 0), quality=100)  # CMYK red
    case("cmyk.tif", Image.new("CMYK", (6, 4), (0, 0, 0, 255)), (0, 0, 0))
    case("gray16.png", Image.fromarray(np.full((4, 6), 257 * 90, np.uint16)), (90, 90, 90))
    case("gray32.tif", Image.fromarray(np.full((4, 6), 257 * 30, np.int32), "I"), (30, 30, 30))
    case("float.tif", Image.fromarray(np.full((4, 6), 0.5, np.float32), "F"), (128, 128, 128))
    assert Image.open(cases["gray16.png"][0]).mode.startswith("I")
    for name, (path, expected) in cases.items():
        out = read_image(path)
        assert out.dtype == np.uint8 and out.shape == (4, 6, 3), name
        assert np.abs(out.astype(int) - expected).max() <= 2, (name, out[0, 0], expected[0, 0])


def test_dataset_reads_odd_modes_as_rgb(tmp_path):
    (tmp_path / "jay").mkdir()
    for i, mode in enumerate(["L", "P", "RGBA", "CMYK"]):
        suffix = "jpg" if mode == "CMYK" else "png"
        Image.fromarray(_solid(COLOURS["jay"])).convert(mode).save(tmp_path / "jay" / f"{i}.{suffix}")
    dataset = ImageDataset([Sample(str(p), 0) for p in sorted((tmp_path / "jay").iterdir())], ["jay"])
    assert all(dataset[i]["image"].shape == (3, 20, 24) for i in range(4))


# ----------------------------------------------------------------------------- toy birds


class _TinyClassifier(L.LightningModule):
    """Stand-in model: a linear layer on 4x4-pooled pixels, enough to drive a real Trainer."""

    def __init__(self, num_classes):
        super().__init__()
        self.linear = torch.nn.Linear(3 * 16, num_classes)
        self.seen: dict[str, int] = {"train": 0, "val": 0}

    def _step(self, batch, split):
        x = torch.nn.functional.adaptive_avg_pool2d(batch["image"], 4).flatten(1)
        assert batch["mask"].shape[0] == len(x) and batch["has_mask"].all() and batch["box"].shape == (len(x), 4)
        self.seen[split] += len(x)
        return torch.nn.functional.cross_entropy(self.linear(x), batch["label"])

    def training_step(self, batch, _):
        return self._step(batch, "train")

    def validation_step(self, batch, _):
        self._step(batch, "val")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_generate_toybirds_through_a_trainer(tmp_path):
    options = dict(num_species=3, image_size=24, train_per_class=4, val_per_class=2, test_per_class=1)
    dm = ImageDataModule(str(tmp_path / "tb"), image_size=24, batch_size=4, num_workers=0,
                         generate="toybirds", generate_options=options, eval_resize="resize")
    assert dm.class_names == toybird_species_names(3) and dm.has_masks and dm.has_boxes  # before any data exists
    assert not (tmp_path / "tb").exists()
    model = _TinyClassifier(dm.num_classes)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert model.seen == {"train": 12, "val": 6}
    assert dm.train_dataset.class_names == dm.class_names
    # once generated, another module reads it back with the same classes; other options are refused
    assert ImageDataModule(str(tmp_path / "tb"), generate="toybirds", generate_options=options).class_names == dm.class_names
    other = ImageDataModule(str(tmp_path / "tb"), generate="toybirds", generate_options={**options, "seed": 5})
    with pytest.raises(ValueError, match="already holds toy birds"):
        other.prepare_data()


# ----------------------------------------------------------------------------- bad input


def _folder_with(tmp_path, bad_name: str, data: bytes) -> Path:
    for name in ("crow", "finch"):
        for i in range(3):
            _save(tmp_path / name / f"{i}.jpg", _solid(COLOURS[name], (32, 32)))
    (tmp_path / "crow" / bad_name).write_bytes(data)
    return tmp_path


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_image_names_the_file_or_is_skipped(tmp_path, kind):
    good = tmp_path / "ok.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good, quality=95)
    data = b"\x89PNG not really" * 4 if kind == "garbage" else good.read_bytes()[: good.stat().st_size // 2]
    good.unlink()
    root = _folder_with(tmp_path / "data", "broken.jpg", data)
    dm = _module(root, val_fraction=0.34)
    dm.setup()
    everything = dm.train_dataset.samples + dm.val_dataset.samples
    broken = next(i for i, s in enumerate(everything) if s.path.endswith("broken.jpg"))
    dataset = ImageDataset(everything, dm.class_names, dm.eval_transform())
    with pytest.raises(CorruptImageError, match="broken.jpg") as error:
        dataset[broken]
    assert "\n" not in str(error.value)

    dm = _module(root, skip_corrupt=True, val_fraction=0.34)
    with pytest.warns(UserWarning, match=r"skipped 1 of \d+ \w+ images: .*broken\.jpg"):
        dm.setup()
    assert len(dm.train_dataset) + len(dm.val_dataset) == 6
    assert not any(p.endswith("broken.jpg") for p in dm.train_dataset.paths + dm.val_dataset.paths)


def test_empty_class_folder(tmp_path):
    _save(tmp_path / "crow" / "0.png", _solid(COLOURS["crow"]))
    (tmp_path / "wren").mkdir()
    (tmp_path / "wren" / "readme.txt").write_text("photos to come")
    with pytest.raises(DataError, match=r"class folder .*wren holds no readable images"):
        _module(tmp_path).setup()


def test_unknown_val_class_folder(tmp_path):
    _save(tmp_path / "train" / "crow" / "0.png", _solid(COLOURS["crow"]))
    _save(tmp_path / "val" / "dodo" / "0.png", _solid(COLOURS["crow"]))
    with pytest.raises(DataError, match=r"dodo is not a class"):
        _module(tmp_path, batch_size=1).setup()


def test_csv_errors(tmp_path):
    _save(tmp_path / "a.png", _solid((1, 2, 3)))
    with pytest.raises(DataError, match="missing column.*label"):
        _module(_write_manifest(tmp_path, [dict(path="a.png", klass="crow")], "no_label.csv"))
    (tmp_path / "classes.txt").write_text("crow\njay\n")
    with pytest.raises(DataError, match=r"line 3: label 'dodo' is not a class listed in .*classes.txt"):
        _module(_write_manifest(tmp_path, [dict(path="a.png", label="crow"), dict(path="a.png", label="dodo")], "dodo.csv"))
    with pytest.raises(DataError, match="split 'holdout'"):
        _module(_write_manifest(tmp_path, [dict(path="a.png", label="crow", split="holdout")], "split.csv")).setup()
    with pytest.raises(DataError, match="x,y,w,h.*only x,y"):
        _module(_write_manifest(tmp_path, [dict(path="a.png", label="crow", x=1, y=2)], "box.csv"))


def test_missing_files_are_listed_in_setup(tmp_path):
    rows = [dict(path="a.png", label="crow", mask="")] + [dict(path=f"gone{i}.png", label="crow", mask="") for i in range(5)]
    rows.append(dict(path="a.png", label="crow", mask="masks/gone.png"))
    _save(tmp_path / "a.png", _solid((1, 2, 3)))
    dm = _module(_write_manifest(tmp_path, rows))
    with pytest.raises(MissingFileError, match=r"6 file\(s\) listed by .*manifest.csv are missing: .*gone0.png, .*gone1.png, .*gone2.png, \.\.\."):
        dm.setup()
    with pytest.raises(MissingFileError, match="data path not found: .*nowhere"):
        _module(tmp_path / "nowhere")


def test_mask_of_wrong_size(tmp_path):
    _save(tmp_path / "a.png", _solid((1, 2, 3), (20, 24)))
    _save(tmp_path / "m.png", np.zeros((10, 12), np.uint8))
    dataset = ImageDataset([Sample(str(tmp_path / "a.png"), 0, str(tmp_path / "m.png"))], ["crow"])
    with pytest.raises(DataError, match=r"mask .*m.png is 12x10 but its image .*a.png is 24x20"):
        dataset[0]


@pytest.mark.parametrize("lacking", ["bounding_boxes.txt", "classes.txt", "train_test_split.txt"])
def test_cub_root_missing_a_file(tmp_path, lacking):
    _write_cub(tmp_path, segmentations=False)
    (tmp_path / lacking).unlink()
    with pytest.raises(MissingFileError, match=f"CUB-200-2011 root .* lacks {lacking}"):
        _module(tmp_path)


def test_bad_options(tmp_path):
    _save(tmp_path / "crow" / "0.png", _solid((1, 2, 3)))
    with pytest.raises(ValueError, match="eval_resize"):
        _module(tmp_path, eval_resize="stretch")
    with pytest.raises(ValueError, match="generate"):
        _module(tmp_path, generate="unicorns")
    with pytest.raises(ValueError, match="unknown key.*species_count"):
        _module(tmp_path / "tb", generate="toybirds", generate_options={"species_count": 3})



def test_train_split_smaller_than_a_batch_trains_in_one_batch_with_a_note(tmp_path, capsys):
    for name in COLOURS:
        for i in range(3):
            _save(tmp_path / name / f"{i}.png", _solid(COLOURS[name]))
    dm = _module(tmp_path, batch_size=8, val_fraction=1 / 3)
    dm.setup()
    dm.setup()  # Lightning sets up again after the preflight: the note is said once
    assert len(dm.train_dataset) == 6
    assert [len(b["label"]) for b in dm.train_dataloader()] == [6]  # not zero steps (drop_last)
    assert capsys.readouterr().err.splitlines() == [
        f"note: the train split of {tmp_path} has 6 images, fewer than data.batch_size=8: training uses batches "
        "of 6 (one step per epoch; --data.batch_size sets the size)"]


def test_loader_workers_draw_different_augmentations_reproducibly(tmp_path):
    rng = np.random.default_rng(3)
    image, _, _ = _box_image(rng)
    path = str(_save(tmp_path / "a.png", image))
    dataset = ImageDataset([Sample(path, 0)] * 4, ["a"], train_transform(16, (0.5,) * 3, (0.5,) * 3, crop_scale=(0.2, 1.0)))

    def images():
        torch.manual_seed(7)
        loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2)
        return torch.cat([b["image"] for b in loader])

    first = images()
    assert not torch.equal(first[0], first[1])  # worker 0 and worker 1 draw different crops
    assert torch.equal(first, images())


def test_training_batches_are_a_function_of_seed_and_epoch(tmp_path):
    """The training loader's order and augmentations depend on (seed, epoch) alone (EpochShuffle):
    not on the number of workers, on their persistence, or on the epochs drawn before (a resumed
    run repeats the uninterrupted one); other epochs and seeds draw others."""
    rng = np.random.default_rng(4)
    for c in range(2):
        for i in range(6):
            _save(tmp_path / f"c{c}" / f"{i}.png", _box_image(rng)[0])
    epoch = [0]

    def batches(workers: int, epochs, seed: int = 0) -> list[torch.Tensor]:
        dm = ImageDataModule(str(tmp_path), image_size=16, batch_size=4, num_workers=workers, seed=seed,
                             persistent_workers=workers > 0, crop_scale=(0.2, 1.0), val_fraction=0.25)
        dm.setup("fit")
        dm._current_epoch = lambda: epoch[0]  # the trainer's current_epoch
        loader, out = dm.train_dataloader(), []
        for epoch[0] in epochs:
            out.append(torch.cat([torch.cat([b["index"].double(), b["image"].flatten().double()]) for b in loader]))
        return out

    zero, one = batches(0, [0, 1])
    assert not torch.equal(zero, one)
    (resumed,) = batches(0, [1])
    assert torch.equal(resumed, one)
    assert [torch.equal(a, b) for a, b in zip(batches(2, [0, 1]), (zero, one))] == [True, True]
    assert not torch.equal(batches(0, [0], seed=1)[0], zero)
