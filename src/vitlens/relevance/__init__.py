"""Relevance maps for timm Vision Transformers (Chefer et al., CVPR 2021, and baselines).

``explain(model, images, method=..., targets=...)`` -> (B, grid_h, grid_w) raw relevance;
``explain_many`` shares one forward/backward pass between several methods; ``heatmap``
upsamples and min-max normalises maps for display and evaluation; ``register_method`` adds
a method (``registry.py``). See docs/relevance.md.
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
from vitlens.relevance.registry import (
    Method,
    Needs,
    Option,
    Records,
    RuleSet,
    get_method,
    register_method,
    register_rule_set,
    unregister_method,
)

__all__ = [
    "METHODS",
    "PRECISIONS",
    "Explanation",
    "Explanations",
    "Method",
    "Needs",
    "Option",
    "Records",
    "RuleSet",
    "UnsupportedModelError",
    "explain",
    "explain_many",
    "get_method",
    "heatmap",
    "register_method",
    "register_rule_set",
    "unregister_method",
]
