"""AttnLRP and CP-LRP against LXT 2.1 + zennit 0.5.1 (golden maps, float64)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from vitlens.relevance import explain, explain_many
from vitlens.relevance import lrp_gradient
from vitlens.relevance.lrp_gradient import patch_grid

GOLDEN = Path(__file__).parent / "data" / "lxt_vit_tiny_f64.npz"
METHODS = ("attnlrp", "cp_lrp")


def rel_err(a, b):
    a, b = a.reshape(len(b), -1).double(), b.reshape(len(b), -1).double()
    return ((a - b).norm(dim=1) / b.norm(dim=1)).max().item()


@pytest.fixture(scope="module")
def golden():
    z = np.load(GOLDEN)
    model = VisionTransformer(**json.loads(str(z["config"]))).double()
    model.load_state_dict({k[3:]: torch.from_numpy(z[k]) for k in z.files if k.startswith("sd.")},
                          strict=True)
    return model.eval(), {k: torch.from_numpy(z[k]) for k in z.files
                          if not k.startswith("sd.") and k not in ("config", "gammas")}


@pytest.mark.parametrize("method", METHODS)
def test_matches_lxt_in_float64_in_a_batch_with_a_target_per_image(golden, method):
    model, g = golden
    mixed = torch.arange(6) % 2 == 1  # odd images explain their second class
    targets = torch.where(mixed, g["target2"], g["target"])
    want = torch.where(mixed[:, None, None], g[f"{method}_class2"], g[method])
    out = explain_many(model, g["inputs"], [method], targets)
    assert out.maps[method].shape == (6, 56, 56) and out.maps[method].dtype == torch.float64
    assert rel_err(out.maps[method], want) <= 1e-8
    assert torch.allclose(out.logits, g["logits"], rtol=0, atol=1e-12)
    gamma0 = explain(model, g["inputs"], method, gamma_linear=0, gamma_conv=0)
    assert rel_err(gamma0, g[f"{method}_gamma0"]) <= 1e-8
    # the options and the class really change the map
    assert rel_err(gamma0, g[method]) > 1e-3
    assert rel_err(g[f"{method}_class2"], g[method]) > 1e-3


def test_shared_call_equals_single_calls_and_patch_grid_sums_each_patch(golden):
    model, g = golden
    x = g["inputs"]
    many = explain_many(model, x, {"attnlrp": {}, "cp_lrp": {"resolution": "patch"},
                                   "transformer_attribution": {}})
    assert torch.equal(many.maps["attnlrp"], explain(model, x, "attnlrp"))
    pixels = explain(model, x, "cp_lrp")
    grid = many.maps["cp_lrp"]
    assert grid.shape == (6, 14, 14)
    assert torch.allclose(grid, patch_grid(pixels, 4), rtol=0, atol=1e-12)
    assert torch.allclose(grid[:, 1, 2], pixels[:, 4:8, 8:12].sum((1, 2)), rtol=0, atol=1e-12)
    assert torch.allclose(grid.sum((1, 2)), pixels.sum((1, 2)), rtol=1e-12)  # conserved


@pytest.mark.parametrize("block_bytes", [1 << 18, 1 << 40])
def test_row_blocks_do_not_change_the_maps(golden, monkeypatch, block_bytes):
    """On a CPU the rules run in blocks of rows (``CPU_BLOCK_BYTES``): ~35-row blocks and one
    block both give LXT's maps (the default, 2 MiB, is covered above)."""
    model, g = golden
    monkeypatch.setattr(lrp_gradient, "CPU_BLOCK_BYTES", block_bytes)
    for method in METHODS:
        out = explain_many(model, g["inputs"], [method], g["target"])
        assert rel_err(out.maps[method], g[method]) <= 1e-8


@pytest.mark.parametrize("method", METHODS)
def test_float32_stays_within_1e_3_of_float64(golden, method):
    model, g = golden
    exact = explain(model, g["inputs"], method)
    approx = explain(model.float(), g["inputs"].float(), method, targets=g["target"])
    model.double()
    err = (approx.double() - exact).flatten(1).abs().amax(1) / exact.flatten(1).abs().amax(1)
    assert approx.dtype == torch.float32 and err.max() <= 1e-3, err


def test_bad_options_are_named(golden):
    model, g = golden
    with pytest.raises(ValueError, match="resolution must be 'pixel' or 'patch'"):
        explain(model, g["inputs"], "attnlrp", resolution="grid")
    with pytest.raises(ValueError, match="gamma_linear must be a number >= 0"):
        explain(model, g["inputs"], "cp_lrp", gamma_linear=-1)
