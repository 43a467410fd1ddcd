"""vitlens.metrics.shortcut: position lift, object share, the alarm's hysteresis; object_masks; toy-bird marks."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from vitlens.metrics import object_masks
from vitlens.metrics.shortcut import (
    ShortcutAlarm,
    ShortcutThresholds,
    class_recognition,
    object_share,
    position_consistency,
    region_name,
    replay_alarm,
    shortcut_signals,
)


def _maps(n_per_class=8, grid=8, seed=0, fixed_class=0):
    """Class `fixed_class` always looks at the top-left 2x2 cells; the others at a random 2x2 spot."""
    g = torch.Generator().manual_seed(seed)
    maps, labels = [], []
    for c in range(4):
        for _ in range(n_per_class):
            m = torch.rand(grid, grid, generator=g) * 0.05
            if c == fixed_class:
                r = q = 0
            else:
                r, q = (int(v) for v in torch.randint(0, grid - 1, (2,), generator=g))
            m[r : r + 2, q : q + 2] += 1.0
            maps.append(m)
            labels.append(c)
    return torch.stack(maps), torch.tensor(labels)


def test_position_lift_finds_the_fixed_place_class_only():
    maps, labels = _maps()
    random = torch.rand(maps.shape, generator=torch.Generator().manual_seed(1))
    pos = position_consistency(maps, labels, 4, random)
    assert pos.counts == [8, 8, 8, 8]
    assert pos.lift[0] > 3.0  # all its mass in one place, while a label-shuffled set spreads it
    assert max(pos.lift[1:]) < 2.0
    assert pos.region[0] == "top-left corner"
    assert pos.box[0] == (0.0, 0.0, 0.25, 0.25)
    assert pos.pixel_box(0, (64, 64)) == (0, 0, 16, 16)
    assert pos.peak_mass[0] > 0.6 and all(r > 1 for r in pos.ratio)  # random control: uniform-ish chance
    torch.testing.assert_close(pos.mean_maps.flatten(1).sum(1), torch.ones(4, dtype=torch.float64))


def test_region_names():
    assert region_name(0.1, 0.9) == "top-right corner"
    assert region_name(0.5, 0.5) == "centre"
    assert region_name(0.9, 0.5) == "bottom edge"
    assert region_name(0.5, 0.1) == "left edge"


def test_object_share_per_class_against_chance():
    on = torch.tensor([0.8, 0.6, float("nan"), 0.1, 0.1])
    chance = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])
    s = object_share(on, torch.tensor([0, 0, 0, 1, 1]), 2, chance)
    assert s.counts == [2, 2]  # the NaN (no object) is left out
    assert s.share == pytest.approx([0.7, 0.1]) and s.ratio == pytest.approx([3.5, 0.5])


def _signals(values):
    """ShortcutSignals of one method and class with a given position lift."""
    maps, labels = _maps(fixed_class=0)
    signals = shortcut_signals({"m": maps}, labels, 4)
    signals["m"].position.lift[:] = [values, 1.0, 1.0, 1.0]
    return signals


def test_alarm_hysteresis_patience_warmup_and_state():
    t = ShortcutThresholds(position_fire=3.0, position_clear=2.0, patience=2, warmup_epochs=1)
    alarm = ShortcutAlarm(t)
    names = ["a", "b", "c", "d"]
    fired = {}
    for epoch, lift in enumerate([5.0, 5.0, 2.5, 3.5, 1.5, 4.0, 4.0]):
        for e in alarm.update(epoch, _signals(lift), names, (64, 64)):
            fired[epoch] = (e.kind, e.class_name)
    # epoch 0: warm-up; epoch 1: second epoch in a row -> fires; 2.5 and 3.5 stay inside the
    # hysteresis band (no flapping); 1.5 clears; then two epochs past 3.0 fire again
    assert fired == {1: ("fired", "a"), 4: ("cleared", "a"), 6: ("fired", "a")}
    assert "top-left corner" in alarm.fired[0].message() and "'a'" in alarm.fired[0].message()
    assert [(ep, k) for ep, k in replay_alarm(alarm.history, t)] == [(1, "position|m|a"), (6, "position|m|a")]
    restored = ShortcutAlarm(t)
    restored.load_state_dict(alarm.state_dict())
    assert restored.state_dict() == alarm.state_dict()
    assert "2 alarm(s)" in alarm.summary()


def test_class_recognition_is_chance_corrected_and_needs_recall_and_precision():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3])
    assert class_recognition(labels, labels, 4) == [1.0, 1.0, 1.0, 1.0]
    # everything called class 0: recall 1 on class 0 but precision 1/4 (chance) -> 0; the others -> -1/3
    assert class_recognition(labels, torch.zeros(16), 4) == pytest.approx([0.0, -1 / 3, -1 / 3, -1 / 3])
    # class 1 half right (recall 1/2, precision 1): (1/2 - 1/4) / (3/4) = 1/3; class 2 gets the rest of 1's
    predicted = labels.clone()
    predicted[4:6] = 2
    assert class_recognition(labels, predicted, 4) == pytest.approx([1.0, 1 / 3, (4 / 6 - 0.25) / 0.75, 1.0])
    assert np.isnan(class_recognition(labels, labels, 5)[4])  # no images of class 4
    with pytest.raises(ValueError, match="16 labels but 3 predictions"):
        class_recognition(labels, labels[:3], 4)


def test_unrecognised_classes_are_not_judged_and_replay_agrees():
    t = ShortcutThresholds(position_fire=3.0, position_clear=2.0, patience=2, warmup_epochs=1, min_recognition=0.5)
    alarm = ShortcutAlarm(t)
    names = ["a", "b", "c", "d"]
    fired = {}
    # class a piles up every epoch; recognised only from epoch 2 on (patience restarts there)
    recognised = [0.0, 0.2, 0.6, 0.9, 0.9]
    for epoch, r in enumerate(recognised):
        events = alarm.update(epoch, _signals(5.0), names, (64, 64), recognition=[r, 1.0, 1.0, 1.0])
        assert ("a" in alarm.not_judged) == (r < 0.5)
        assert ("not judged" in alarm.not_judged_message(epoch)) == (r < 0.5)
        for e in events:
            fired[epoch] = (e.kind, e.class_name)
    assert fired == {3: ("fired", "a")}
    assert alarm.history[0]["recognition|a"] == 0.0 and alarm.history[0]["position|m|a"] == 5.0  # kept for replay
    assert replay_alarm(alarm.history, t) == [(3, "position|m|a")]
    assert replay_alarm(alarm.history, ShortcutThresholds(position_fire=3.0, position_clear=2.0, patience=2,
                                                          warmup_epochs=1, min_recognition=None)) == [(1, "position|m|a")]
    assert "not judged while the model did not recognise the class" in alarm.summary()
    assert "a in epoch(s) 0, 1" in alarm.summary()
    # an active alarm stays active through epochs where the class is not recognised (no clear either)
    alarm.update(5, _signals(1.0), names, (64, 64), recognition=[0.0, 1.0, 1.0, 1.0])
    assert "position|m|a" in alarm.active
    alarm.update(6, _signals(1.0), names, (64, 64), recognition=[0.9, 1.0, 1.0, 1.0])
    assert "position|m|a" not in alarm.active


def test_thresholds_validate():
    with pytest.raises(ValueError, match="position_clear"):
        ShortcutThresholds(position_fire=2.0, position_clear=3.0)
    with pytest.raises(ValueError, match="unknown key 'fire'"):
        ShortcutThresholds.from_options({"fire": 2})
    assert ShortcutThresholds.from_options({"patience": 3}).patience == 3
    assert ShortcutThresholds.from_options({"min_recognition": None}).min_recognition is None
    with pytest.raises(ValueError, match="min_recognition must be a number in \\[-1, 1\\] or None"):
        ShortcutThresholds(min_recognition=2)


def test_object_masks_mask_where_there_is_one_else_the_box():
    batch = {
        "mask": torch.zeros(3, 8, 8), "has_mask": torch.tensor([True, False, False]),
        "box": torch.tensor([[0.0, 0.0, 8.0, 8.0], [0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 8.0, 8.0]]),
        "has_box": torch.tensor([True, True, False]),
    }
    batch["mask"][0, :2, :2] = 1
    masks, valid = object_masks(batch, (8, 8))
    assert valid.tolist() == [True, True, False]
    assert masks[0].sum() == 4  # its mask, not its (whole-image) box
    assert masks[1].sum() == 16  # no mask: its box
    assert masks[2].sum() == 0  # neither
    assert object_masks({"image": torch.zeros(1, 3, 8, 8)}, (8, 8)) is None
    with pytest.raises(ValueError, match="object masks are"):
        object_masks({"mask": torch.zeros(1, 4, 4)}, (8, 8))


def test_toybirds_mark_in_every_split_with_a_clean_counterfactual(tmp_path):
    from PIL import Image

    from vitlens.data import ImageDataModule
    from vitlens.data.toybirds import generate_toybirds, shortcut_box

    root = tmp_path / "tb"
    generate_toybirds(root, 3, image_size=32, train_per_class=8, val_per_class=6, test_per_class=6,
                      shortcut_probability=0.7, shortcut_size=4)
    rows = list(csv.DictReader(open(root / "manifest.csv")))
    for split in ("train", "val", "test"):
        marked = [int(r["shortcut"]) for r in rows if r["split"] == split]
        assert 0 < sum(marked) < len(marked)  # in every split, with a probability
    clean = {r["path"]: r for r in csv.DictReader(open(root / "counterfactual" / "manifest.csv"))}
    tests = [r for r in rows if r["split"] == "test"]
    assert len([r for r in clean.values() if r["split"] == "test"]) == len(tests)
    for r in tests:
        a = np.asarray(Image.open(root / r["path"])).astype(int)
        b = np.asarray(Image.open(root / "counterfactual" / r["path"])).astype(int)
        differs = (a != b).any(-1)
        if r["shortcut"] == "1":
            x, y, w, h = shortcut_box(0, 32, 4)
            assert 0 < differs.sum() <= 16 and differs.sum() == differs[:, :].sum()  # only the 4x4 mark
        else:
            assert not differs.any()
    dm = ImageDataModule(str(root / "counterfactual"), image_size=32, batch_size=4, num_workers=0)
    dm.setup("test")
    assert len(dm.test_dataset) == len(tests)
    with pytest.raises(ValueError, match="not both"):
        generate_toybirds(tmp_path / "x", 3, shortcut=True, shortcut_probability=0.5)
