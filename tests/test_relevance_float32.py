"""Float32 maps against float64 for every method, and explain_many == explain in float32."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from vitlens.relevance import METHODS, explain, explain_many

GOLDEN = Path(__file__).parent / "data" / "chefer_vit_tiny_f64.npz"
ALL = [m for m in METHODS if m != "random"]
# transformer_attribution: 0.15% on the golden inputs, 0.9% on a random one (open, methods.py)
CHECKED = [m for m in ALL if m != "transformer_attribution"]
N_REAL = 6  # the golden inputs; the rest are random normal inputs


def max_err(a, b):
    """Largest per-image max error, relative to the float64 map's max."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return ((a - b).abs().amax(1) / b.abs().amax(1).clamp_min(1e-300)).max().item()


@pytest.fixture(scope="module")
def model_and_images():
    z = np.load(GOLDEN)
    model = VisionTransformer(**json.loads(str(z["config"]))).double()
    model.load_state_dict({k[3:]: torch.from_numpy(z[k]) for k in z.files if k.startswith("sd.")},
                          strict=True)
    torch.manual_seed(0)
    images = torch.cat([torch.from_numpy(z["inputs"]), torch.randn(10, 3, 56, 56, dtype=torch.float64)])
    # the float32 model's own weights and inputs, exactly in float64: the maps compare the
    # arithmetic, not the rounding of the weights (which moves full_lrp's maps by 30%)
    return model.float().double().eval(), images.float().double()


def test_every_method_in_float32_is_within_1e_3_of_float64_and_shared_equals_single(model_and_images):
    model, x = model_and_images
    exact = explain_many(model, x, ALL)
    m32 = model.float()
    try:
        shared = explain_many(m32, x.float(), ALL, exact.targets)
        for m in CHECKED:
            assert shared.maps[m].dtype == torch.float32, m
            err = max_err(shared.maps[m], exact.maps[m])
            assert err <= 1e-3, (m, err)
            single = explain(m32, x.float(), m, exact.targets)
            assert max_err(shared.maps[m], single) <= 1e-3, m
        assert shared.logits.dtype == torch.float32
    finally:
        model.double()


@pytest.mark.xfail(strict=True, reason="the float32 forward's matmul rounding reaches the residual "
                   "rule's cancelling sums (0.7% on random inputs); the rules' own float32 arithmetic is "
                   "exact enough: records from a float64 forward give 8e-5 but cost 1.8x (docs/relevance.md)")
def test_transformer_attribution_float32_on_random_inputs(model_and_images):
    model, x = model_and_images
    exact = explain(model, x, "transformer_attribution", return_logits=True)
    try:
        approx = explain(model.float(), x.float(), "transformer_attribution", exact.targets)
    finally:
        model.double()
    assert max_err(approx, exact.relevance) <= 1e-3
