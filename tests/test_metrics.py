"""vitlens.metrics on small cases whose answers are known by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from vitlens.data.normalization import normalize
from vitlens.metrics import (
    LocalizationScores,
    SegmentationScores,
    average_precision,
    bootstrap_ci,
    boxes_to_masks,
    curve_auc,
    mask_roc_auc,
    perturbation_auc,
    perturbation_aucs,
    pointing_game,
    relevance_on_object,
    roc_auc,
)

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.3)
X = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


class LeftHalfBrightness(torch.nn.Module):
    """A real 2-class model: class 1 iff the left half of the image is brighter than 0.5 in [0, 1] space."""

    def __init__(self, mean=MEAN, std=STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.calls = 0
        self.rows = 0

    def forward(self, x):
        self.calls += 1
        self.rows += x.shape[0]
        x01 = x * self.std + self.mean
        s = x01[..., : x.shape[-1] // 2].mean((1, 2, 3))
        return torch.stack([torch.zeros_like(s), 10 * (s - 0.5)], 1)


class Recorder(torch.nn.Module):
    """A real module that keeps every batch it sees and answers class 0."""

    def __init__(self):
        super().__init__()
        self.seen = []
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        self.seen.append(x.clone())
        return torch.zeros(x.shape[0], 2) + self.weight


def white_images(n, size=10):
    return normalize(torch.ones(n, 3, size, size), MEAN, STD)


def left_half_map(n, size=10):
    rel = torch.zeros(n, size, size)
    rel[..., : size // 2] = 1.0
    return rel


def test_known_curves_and_aucs_on_a_region_model():
    images = white_images(3)
    labels = torch.tensor([1, 1, 0])
    res = perturbation_auc(LeftHalfBrightness(), images, left_half_map(3), labels, MEAN, STD)
    # Positive: the left half goes first; int(f*100) pixels removed, left brightness 1 - k/50,
    # class 1 while k < 25 (f <= 0.2). Image 3 (label 0) is right exactly when class 1 is not.
    pos = [2 / 3] * 3 + [1 / 3] * 7
    # Negative: the right half goes first; the left half loses k - 50 pixels once k > 50,
    # class 1 while k - 50 < 25 (f <= 0.7).
    neg = [2 / 3] * 8 + [1 / 3] * 2
    np.testing.assert_allclose(res.fractions, X)
    np.testing.assert_allclose(res.pos_accuracy, pos, atol=1e-12)
    np.testing.assert_allclose(res.neg_accuracy, neg, atol=1e-12)
    assert res.pos_auc == pytest.approx(np.trapezoid(pos, X) * 100, abs=1e-9)
    assert res.neg_auc == pytest.approx(np.trapezoid(neg, X) * 100, abs=1e-9)
    # the probability of the explained class (default: the label), sigmoid(10 (s - 0.5)) for class 1
    s = np.array([1 - min(int(f * 100), 50) / 50 for f in X])
    p1 = 1 / (1 + np.exp(-10 * (s - 0.5)))
    np.testing.assert_allclose(res.pos_probability, (2 * p1 + (1 - p1)) / 3, rtol=1e-5)
    # the AUC is the mean of per-image AUCs (what the bootstrap resamples)
    assert float(res.pos_auc_per_image.mean()) == pytest.approx(res.pos_auc, abs=1e-9)
    assert res.pos_correct.shape == (3, 10) and res.pos_correct.dtype == torch.bool


def test_all_label_one_gives_paper_style_aucs_25_and_75():
    res = perturbation_auc(LeftHalfBrightness(), white_images(2), left_half_map(2), torch.tensor([1, 1]), MEAN, STD)
    assert res.pos_auc == pytest.approx(25.0)  # 0.1 * (2 + 0.5) * 100
    assert res.neg_auc == pytest.approx(75.0)  # 0.1 * (7 + 0.5) * 100
    # a patch-grid map (2 x 2) upsampled bilinearly ranks the same way
    grid = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).expand(2, 2, 2)
    res_grid = perturbation_auc(LeftHalfBrightness(), white_images(2), grid, torch.tensor([1, 1]), MEAN, STD)
    assert (res_grid.pos_auc, res_grid.neg_auc) == pytest.approx((25.0, 75.0))


def test_removed_pixel_counts_are_exact_and_black_in_01_space():
    size = 7  # 49 pixels: int(f * 49) = 4, 9, 14, 19, 24, 29, 34, 39, 44
    g = torch.Generator().manual_seed(0)
    images01 = torch.rand(2, 3, size, size, generator=g) * 0.8 + 0.1  # no pixel is black
    images = normalize(images01, MEAN, STD)
    rel = torch.rand(2, size, size, generator=g)
    rec = Recorder()
    perturbation_auc(rec, images, rel, torch.zeros(2, dtype=torch.long), MEAN, STD, batch_size=1000)
    rows = torch.cat(rec.seen)
    assert rows.shape[0] == 2 * 19  # per image: clean + 9 positive + 9 negative
    rows01 = rows * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    black = (rows01.abs() < 1e-6).all(1)  # (R, H, W): all three channels zero in [0, 1] space
    kept = ~black
    counts = [int(f * 49) for f in X[1:]]
    assert counts == [4, 9, 14, 19, 24, 29, 34, 39, 44]
    for i in range(2):
        r = black[i * 19:(i + 1) * 19].flatten(1)
        assert r[0].sum() == 0
        assert r[1:10].sum(1).tolist() == counts
        assert r[10:19].sum(1).tolist() == counts
        order = torch.argsort(rel[i].flatten(), descending=True)
        for j, k in enumerate(counts):  # the k most relevant pixels, and only those
            assert set(torch.nonzero(r[1 + j]).flatten().tolist()) == set(order[:k].tolist())
            assert set(torch.nonzero(r[10 + j]).flatten().tolist()) == set(order.flip(0)[:k].tolist())
        # untouched pixels keep their exact model-space values
        clean = rows[i * 19]
        assert torch.equal(clean, images[i])
        step = rows[i * 19 + 5]
        assert torch.equal(step[:, kept[i * 19 + 5]], images[i][:, kept[i * 19 + 5]])


def test_ties_are_broken_top_left_first():
    rec = Recorder()
    images = white_images(1, size=4)
    perturbation_auc(rec, images, torch.zeros(1, 4, 4), torch.zeros(1, dtype=torch.long), MEAN, STD,
                     fractions=(0.25,))
    rows = torch.cat(rec.seen)
    black = ((rows * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)).abs() < 1e-6).all(1)
    first_row = torch.zeros(4, 4, dtype=torch.bool)
    first_row[0] = True
    assert torch.equal(black[1], first_row) and torch.equal(black[2], first_row)


def test_batch_size_does_not_change_results_and_model_mode_is_restored():
    g = torch.Generator().manual_seed(1)
    images = normalize(torch.rand(5, 3, 10, 10, generator=g), MEAN, STD)
    rel = torch.rand(5, 5, 5, generator=g)
    labels = torch.tensor([0, 1, 1, 0, 1])
    model = LeftHalfBrightness().train()
    a = perturbation_auc(model, images, rel, labels, MEAN, STD, batch_size=1)
    assert model.training
    b = perturbation_auc(model, images, rel, labels, MEAN, STD, batch_size=1000)
    for key, value in a.as_dict().items():
        assert value == pytest.approx(b.as_dict()[key]), key
    assert torch.equal(a.pos_correct, b.pos_correct) and torch.equal(a.neg_correct, b.neg_correct)
    assert model.calls == 5 * 19 + 1  # one row per call, then one call for all 5 x 19 rows


def test_several_maps_in_one_call_give_the_numbers_of_one_call_each_with_fewer_rows():
    """perturbation_aucs (the callback's): one clean pass for all maps, full batches of rows."""
    g = torch.Generator().manual_seed(2)
    images = normalize(torch.rand(5, 3, 10, 10, generator=g), MEAN, STD)
    labels = torch.tensor([0, 1, 1, 0, 1])
    targets = torch.tensor([1, 1, 0, 0, 1])
    maps = {"patch a": torch.rand(5, 5, 5, generator=g), "pixel": torch.randn(5, 10, 10, generator=g),
            "patch b": torch.rand(5, 5, 5, generator=g)}
    model = LeftHalfBrightness().train()
    together = perturbation_aucs(model, images, maps, labels, MEAN, STD, targets=targets, batch_size=32)
    assert model.training and list(together) == list(maps)
    calls, rows = model.calls, model.rows
    model.rows = 0
    for name, rel in maps.items():
        alone = perturbation_auc(model, images, rel, labels, MEAN, STD, targets=targets, batch_size=32)
        for key, value in alone.as_dict().items():
            assert together[name].as_dict()[key] == pytest.approx(value), (name, key)
        assert torch.equal(together[name].pos_correct, alone.pos_correct)
    # one clean call, then 2 x 5 x 18 patch rows and 5 x 18 pixel rows in calls of 32
    assert calls == 1 + -(-180 // 32) + -(-90 // 32)
    assert rows == 5 + 3 * 5 * 18 < model.rows == 3 * 5 * 19
    assert perturbation_aucs(model, images, {}, labels, MEAN, STD) == {}
    with pytest.raises(ValueError, match="relevance must be"):
        perturbation_aucs(model, images, {"bad": torch.rand(4, 5, 5)}, labels, MEAN, STD)


def test_options_patches_and_fills():
    rec = Recorder()
    images01 = torch.full((1, 3, 8, 8), 0.6)
    images01[..., :4] = 0.2
    images = normalize(images01, MEAN, STD)
    rel = torch.arange(16.0).view(1, 4, 4)  # patch (3, 3) most relevant
    perturbation_auc(rec, images, rel, torch.zeros(1, dtype=torch.long), MEAN, STD, mode="patches", patch_size=2,
                     fill="mean", fractions=(0.1, 0.5), tests=("positive",))
    rows = torch.cat(rec.seen)
    assert rows.shape[0] == 3
    removed = (rows == 0).all(1)  # "mean" fill = 0 in model space
    assert removed[1].sum() == 4 and removed[1, 6:, 6:].all()  # int(0.1 * 16) = 1 patch
    assert removed[2].sum() == 8 * 4  # 8 patches
    rec = Recorder()
    res = perturbation_auc(rec, images, rel, torch.zeros(1, dtype=torch.long), MEAN, STD, fill="blur", blur_sigma=1.0,
                           tests=("negative",))
    assert res.pos_auc is None and res.neg_auc == pytest.approx(90.0)
    blurred = torch.cat(rec.seen)[-1] * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    assert 0.2 < float(blurred[0, 0, 3]) < 0.6  # a blurred edge value, neither side's colour
    with pytest.raises(ValueError, match="fill"):
        perturbation_auc(rec, images, rel, torch.zeros(1, dtype=torch.long), MEAN, STD, fill="white")
    with pytest.raises(ValueError, match="relevance"):
        perturbation_auc(rec, images, rel[:, :, :, None], torch.zeros(1, dtype=torch.long), MEAN, STD)


def test_curve_auc_of_a_known_curve():
    assert curve_auc([1.0] * 10) == pytest.approx(90.0)
    assert curve_auc([1.0, 0.0] + [0.0] * 8) == pytest.approx(5.0)


def test_average_precision_and_roc_auc_match_sklearn_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = (torch.rand(8, 200, generator=g) * 4).round() / 4  # many ties
    targets = torch.rand(8, 200, generator=g) < 0.3
    ap = average_precision(scores, targets)
    auc = roc_auc(scores, targets)
    for i in range(8):
        assert float(ap[i]) == pytest.approx(average_precision_score(targets[i], scores[i]), abs=1e-12)
        assert float(auc[i]) == pytest.approx(roc_auc_score(targets[i], scores[i]), abs=1e-12)
    assert torch.isnan(average_precision(torch.rand(5), torch.zeros(5))).all()


def test_segmentation_scores_of_known_masks():
    h1 = torch.tensor([[[0.0, 0.2], [0.8, 1.0]]])  # mean 0.5 -> foreground = bottom row
    g1 = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])
    h2 = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # mean 0.25 -> foreground = top left
    g2 = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    seg = SegmentationScores()
    seg.update(h1, g1)
    seg.update(torch.cat([h2, h1]), torch.cat([g2, g1]), valid=torch.tensor([True, False]))
    out = seg.compute()
    assert out["n_images"] == 2
    assert out["pixel_acc"] == pytest.approx(7 / 8)
    # background: inter 1 + 3, union 2 + 3; foreground: inter 2 + 1, union 3 + 1
    assert out["miou"] == pytest.approx((4 / 5 + 3 / 4) / 2)
    aps = []
    for h, g in ((h1, g1), (h2, g2)):
        s = torch.cat([1 - h.flatten(), h.flatten()])
        t = torch.cat([g.flatten() == 0, g.flatten() == 1])
        aps.append(average_precision_score(t.numpy(), s.numpy()))
    assert out["map"] == pytest.approx(np.mean(aps), abs=1e-12)
    assert aps[1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="masks"):
        seg.update(h1, torch.zeros(1, 3, 3))


def test_localisation_on_hand_made_maps():
    maps = torch.zeros(3, 4, 4)
    maps[0, 0, 0] = 1.0
    maps[0, 3, 3] = 0.5
    maps[1, 3, 3] = 1.0
    mask = torch.zeros(3, 4, 4)
    mask[:, :2, :2] = 1  # top-left quarter is the object
    mask[2] = 0  # no object in image 3
    assert pointing_game(maps, mask)[:2].tolist() == [1.0, 0.0]
    share = relevance_on_object(maps, mask)
    assert share[:2].tolist() == pytest.approx([1 / 1.5, 0.0])
    assert torch.isnan(share[2]) and torch.isnan(pointing_game(maps, mask)[2])
    # a constant (all-zero) map counts as uniform
    assert relevance_on_object(torch.zeros(1, 4, 4), mask[:1]).item() == pytest.approx(0.25)
    auc = mask_roc_auc(maps, mask)
    assert auc[0].item() == pytest.approx(roc_auc_score(mask[0].flatten(), maps[0].flatten()))
    loc = LocalizationScores()
    loc.update(maps, mask)  # image 3 has an empty mask: excluded, not a miss
    loc.update(maps, mask, valid=torch.tensor([True, False, False]))
    out = loc.compute()
    assert out["n_images"] == 3 and out["pointing_game"] == pytest.approx(2 / 3)


def test_boxes_become_masks_by_pixel_centres():
    m = boxes_to_masks(torch.tensor([[1.0, 0.0, 3.0, 2.0]]), (4, 5))
    expected = torch.zeros(1, 4, 5)
    expected[0, 0:2, 1:3] = 1
    assert torch.equal(m, expected)


def test_bootstrap_is_deterministic_and_sane():
    values = torch.rand(100, generator=torch.Generator().manual_seed(0))
    a = bootstrap_ci(values, seed=3)
    assert a == bootstrap_ci(values, seed=3)
    assert a != bootstrap_ci(values, seed=4)
    m = float(values.mean())
    assert a[0] < m < a[1] and 0.05 < a[1] - a[0] < 0.25  # about 4 standard errors (0.029) wide
    assert bootstrap_ci([0.7] * 10) == pytest.approx((0.7, 0.7))
    assert bootstrap_ci([1.0, float("nan"), 1.0]) == pytest.approx((1.0, 1.0))
    wide = bootstrap_ci(values, confidence=0.99)
    assert wide[0] <= a[0] and wide[1] >= a[1]
