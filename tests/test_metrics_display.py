"""vitlens.relevance.display: overlays, captions, contact sheets and perturbation curves."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vitlens.metrics import PerturbationResult
from vitlens.relevance.display import (
    caption,
    colorize,
    contact_sheet,
    explanation_panel,
    overlay,
    plot_perturbation_curves,
    save_png,
    side_by_side,
)


def test_overlay_blends_the_colormap_over_the_image():
    images = torch.zeros(2, 3, 8, 8)
    images[1] = 1.0
    maps = torch.zeros(2, 8, 8)
    maps[:, :, 4:] = 1.0
    out = overlay(images, maps, alpha=0.5, colormap="jet")
    assert out.dtype == np.uint8 and out.shape == (2, 8, 8, 3)
    jet = colorize(maps)
    assert tuple(jet[0, 0, 7]) == (128, 0, 0)  # jet at 1.0 is dark red
    assert tuple(jet[0, 0, 0]) == (0, 0, 128)  # jet at 0.0 is dark blue
    np.testing.assert_allclose(out[0].astype(float), jet[0] / 2, atol=1)  # black image: half the colour
    np.testing.assert_allclose(out[1].astype(float), 127.5 + jet[1] / 2, atol=1)
    # alpha 0 is the image itself; a patch-grid map is upsampled with heatmap()
    assert (overlay(images, maps, alpha=0.0)[1] == 255).all()
    grid = overlay(images, torch.tensor([[[0.0, 1.0]]]).expand(2, 1, 2), alpha=1.0)
    assert tuple(grid[0, 0, 0]) == (0, 0, 128) and tuple(grid[0, 0, 7]) == (128, 0, 0)
    with pytest.raises(ValueError, match="heatmaps"):
        overlay(images, maps[:1])


def test_panels_captions_and_contact_sheet(tmp_path):
    tile = np.zeros((32, 32, 3), np.uint8)
    captioned = caption(tile, "a very long class name that does not fit 0.93")
    assert captioned.shape[0] > 32 and captioned.shape[1] == 32
    assert (captioned[32:] < 255).any()  # some text was drawn
    row = side_by_side([tile, tile, tile], ["cat 0.9", "rollout", "grad_rollout"], gap=4)
    assert row.shape[1] == 3 * 32 + 2 * 4
    sheet = contact_sheet([row] * 5, ncols=2, gap=4)
    assert sheet.shape == (3 * row.shape[0] + 2 * 4, 2 * row.shape[1] + 4, 3)
    assert (sheet[-row.shape[0]:, row.shape[1] + 4:] == 255).all()  # the sixth cell is empty
    panel = explanation_panel(torch.rand(3, 16, 16), {"a": torch.rand(2, 2), "b": torch.rand(16, 16)}, "cat 0.50",
                              min_size=40)
    assert panel.shape[1] == 3 * 48 + 2 * 4  # 16 px tiles enlarged 3x to reach 40 px
    save_png(panel, tmp_path / "p.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "p.png")), panel)


def test_perturbation_curves_figure_leaves_pyplot_alone(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    x = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    res = PerturbationResult(fractions=x, pos_accuracy=[1.0 - f for f in x], neg_accuracy=[1.0] * 10,
                             pos_auc=49.5, neg_auc=90.0)
    fig = plot_perturbation_curves({"transformer_attribution": res, "random": res}, tmp_path / "curves.png")
    assert plt.get_fignums() == before
    img = Image.open(tmp_path / "curves.png")
    assert img.size == (1000, 400)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["transformer_attribution (AUC 49.5)", "random (AUC 49.5)"]
