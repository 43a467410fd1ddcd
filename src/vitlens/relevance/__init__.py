"""Relevance maps for timm Vision Transformers (Chefer et al., CVPR 2021, and baselines).

``explain(model, images, method=..., targets=...)`` -> (B, grid_h, grid_w) raw relevance;
``explain_many`` shares one forward/backward pass between several methods; ``heatmap``
upsamples and min-max normalises maps for display and evaluation. See docs/relevance.md.
"""
from vitlens.relevance.errors import UnsupportedModelError
from vitlens.relevance.heatmap import heatmap
from vitlens.relevance.methods import (
    METHODS,
    PRECISIONS,
    Explanation,
    Explanations,
    explain,
    explain_many,
)

__all__ = [
    "METHODS",
    "PRECISIONS",
    "Explanation",
    "Explanations",
    "UnsupportedModelError",
    "explain",
    "explain_many",
    "heatmap",
]
