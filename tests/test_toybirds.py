"""Toy birds: species code, determinism, masks and boxes, the train-only shortcut, atomic writes."""
from __future__ import annotations

import csv
import hashlib
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitlens.data.toybirds import (
    SHORTCUT_COLOURS,
    generate_toybirds,
    main,
    read_toybirds_options,
    shortcut_box,
    toybird_species,
    toybird_species_names,
)

SMALL = dict(num_species=3, image_size=32, train_per_class=3, val_per_class=2, test_per_class=2)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(root: Path) -> list[dict]:
    with open(root / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_species_are_distinct_attribute_combinations():
    species = toybird_species(8)
    names = toybird_species_names(8)
    assert names == [s.name for s in species] and len(set(names)) == 8
    assert toybird_species_names(5) == names[:5]  # smaller sets are prefixes: names known without data
    codes = np.array([[s.body, s.beak, s.wing, s.pattern, s.tail] for s in species])
    distance = (codes[:, None] != codes[None]).sum(-1)
    assert distance[~np.eye(8, dtype=bool)].min() >= 4  # any two species differ in >= 4 of 5 parts
    colours = codes[:, [0, 2]]
    assert ((colours[:, None] != colours[None]).any(-1) | np.eye(8, dtype=bool)).all()  # and in a colour
    for column in codes.T:  # no single attribute names the species
        assert max(np.unique(column, return_counts=True)[1]) >= 2
    with pytest.raises(ValueError, match="num_species"):
        toybird_species(1)


def test_generate_is_deterministic_and_complete(tmp_path):
    a = generate_toybirds(tmp_path / "a", **SMALL, seed=3).parent
    b = generate_toybirds(tmp_path / "b", **SMALL, seed=3).parent
    c = generate_toybirds(tmp_path / "c", **SMALL, seed=4).parent
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temporary folders left

    rows = _rows(a)
    assert list(rows[0]) == ["path", "label", "split", "mask", "x", "y", "w", "h", "parts_mask"]
    assert len(rows) == 3 * (3 + 2 + 2)
    assert (a / "classes.txt").read_text().split() == toybird_species_names(3)
    assert {r["label"] for r in rows} == set(toybird_species_names(3))
    assert read_toybirds_options(a)["seed"] == 3
    for r in rows:
        image = np.asarray(Image.open(a / r["path"]))
        bird = np.asarray(Image.open(a / r["mask"])) > 0
        parts = np.asarray(Image.open(a / r["parts_mask"])) > 0
        assert image.shape == (32, 32, 3) and bird.shape == parts.shape == (32, 32)
        ys, xs = np.nonzero(bird)
        x, y, w, h = (int(r[k]) for k in "xywh")
        assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # box = mask's extent
        assert 0.35 * 32 <= max(w, h) <= 0.85 * 32  # a large bird
        assert parts.any() and not (parts & ~bird).any()  # parts lie on the bird
        assert 0.1 < parts.sum() / bird.sum() < 0.9


def test_existing_set_is_reused_and_other_options_refused(tmp_path):
    out = tmp_path / "tb"
    generate_toybirds(out, **SMALL)
    before = (out / "manifest.csv").stat().st_mtime_ns
    generate_toybirds(out, **SMALL)  # same options: left alone
    assert (out / "manifest.csv").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="already holds toy birds"):
        generate_toybirds(out, **{**SMALL, "shortcut": True})
    generate_toybirds(out, **{**SMALL, "shortcut": True}, overwrite=True)
    assert read_toybirds_options(out)["shortcut"] is True
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="other"):
        generate_toybirds(tmp_path / "other", **SMALL)


def test_concurrent_generation_gives_one_complete_set(tmp_path):
    out = tmp_path / "tb"
    errors = []

    def run():
        try:
            generate_toybirds(out, **SMALL)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [p.name for p in tmp_path.iterdir()] == ["tb"]
    assert len(_rows(out)) == 21 and all((out / r["path"]).exists() for r in _rows(out))


def test_shortcut_only_in_train(tmp_path):
    plain = generate_toybirds(tmp_path / "plain", **SMALL).parent
    marked = generate_toybirds(tmp_path / "marked", **SMALL, shortcut=True).parent
    names = toybird_species_names(3)
    for r in _rows(marked):
        a = np.asarray(Image.open(plain / r["path"])).astype(int)
        b = np.asarray(Image.open(marked / r["path"])).astype(int)
        if r["split"] != "train":
            assert np.array_equal(a, b)  # val / test: exactly the unmarked images
            continue
        label = names.index(r["label"])
        x, y, w, h = shortcut_box(label, 32)
        assert (b[y:y + h, x:x + w] == SHORTCUT_COLOURS[label // 4]).all()
        outside = np.ones((32, 32), bool)
        outside[y:y + h, x:x + w] = False
        assert np.array_equal(a[outside], b[outside])  # nothing else changes
    assert len({shortcut_box(i, 32) for i in range(4)}) == 4  # a different corner per class


def test_command_line(tmp_path, capsys):
    main(["--out", str(tmp_path / "cli"), "--num-species", "2", "--image-size", "24", "--train-per-class", "2",
          "--val-per-class", "1", "--test-per-class", "0", "--preview", str(tmp_path / "grid.png")])
    rows = _rows(tmp_path / "cli")
    assert len(rows) == 6 and {r["split"] for r in rows} == {"train", "val"}
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size[1] > grid.size[0] / 8  # two rows of tiles
    assert "manifest.csv" in capsys.readouterr().out


def _generate_in_process(out: str) -> None:
    generate_toybirds(out, **SMALL)


def test_two_processes_generate_while_a_reader_never_sees_half_a_set(tmp_path):
    import multiprocessing

    out = tmp_path / "tb"
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_generate_in_process, args=(str(out),)) for _ in range(2)]
    for w in writers:
        w.start()
    looks = 0
    while any(w.is_alive() for w in writers) or looks == 0:
        if (out / "manifest.csv").exists():  # once visible, the whole set is there
            rows = _rows(out)
            assert len(rows) == 21 and all((out / r["path"]).exists() and (out / r["mask"]).exists() for r in rows)
            looks += 1
        time.sleep(0.005)  # poll politely; correctness does not depend on it
    for w in writers:
        w.join()
        assert w.exitcode == 0
    assert [p.name for p in tmp_path.iterdir()] == ["tb"]


def test_bird_size_and_clutter_options(tmp_path):
    big = generate_toybirds(tmp_path / "big", **SMALL, bird_size=(0.85, 0.9), distractors=(0, 0)).parent
    for r in _rows(big):
        assert max(int(r["w"]), int(r["h"])) >= 0.6 * 32  # default sizes give 0.35-0.85
        image = np.asarray(Image.open(big / r["path"])).astype(int)
        bird = np.asarray(Image.open(big / r["mask"])) > 0
        padded = np.pad(bird, 2)
        near_bird = np.zeros_like(bird)
        for dy in range(5):
            for dx in range(5):
                near_bird |= padded[dy:dy + 32, dx:dx + 32]
        # no clutter: 2 px away from the bird (anti-aliased edges), each row is one gradient colour
        for y in range(32):
            background = image[y][~near_bird[y]]
            assert len(background) == 0 or np.ptp(background, axis=0).max() <= 1
    assert read_toybirds_options(big)["distractors"] == [0, 0]
    with pytest.raises(ValueError, match="bird_size"):
        generate_toybirds(tmp_path / "bad", **SMALL, bird_size=(0.9, 0.5))
    with pytest.raises(ValueError, match="distractors"):
        generate_toybirds(tmp_path / "bad", **SMALL, distractors=(4, 2))
