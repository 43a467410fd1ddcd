"""Model families: one adapter per family, registered here (and only here).

An adapter is a ``Family``: how to recognise the model, how to read its weights into a
``weights.Backbone``, and (optionally) how one of its blocks runs forward and which rules its
layers get. ``explain`` and every method go through ``read`` / ``unwrap`` only, so adding a
family never touches the methods. See docs/relevance.md, "Adding a model family".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from vitlens.relevance.errors import UnsupportedModelError
from vitlens.relevance.weights import Backbone


@dataclass(frozen=True)
class Family:
    """One model family.

    - ``matches(model) -> bool``: this adapter explains ``model`` (checked in registration
      order; the first match wins).
    - ``read(model, *, dtype, mm_dtype, rounding, tf32) -> Backbone``: detached weights, cast;
      raises ``UnsupportedModelError`` naming the part it cannot explain.
    - ``block_forward``: ``(bb, w, x, *, keep_attn, keep_all, fast, compact) ->
      (block output, BlockTrace)``; ``None``: the pre-norm ViT block (``forward.block_forward``).
    - ``block_rule``: the explicit-rule relevance pass through one block (Chefer / plain
      LRP), same signature as ``rules.block_rule``; ``None``: ``rules.block_rule``.
    - ``gradient_block_forward``: one block in the Gradient x Input form (AttnLRP, CP-LRP),
      ``(bb, rule_set, w, x, gamma_linear) -> x_out`` using the rule set's ops
      (``lrp_gradient.GradientRuleSet``); ``None``: ``lrp_gradient.block_forward``.
    """

    name: str
    supported: str  # one line for error messages: what this adapter explains
    matches: Callable[[nn.Module], bool]
    read: Callable[..., Backbone]
    block_forward: Callable | None = None
    block_rule: Callable | None = None
    gradient_block_forward: Callable | None = None


FAMILIES: list[Family] = []


def register_family(family: Family) -> Family:
    """Add ``family`` to the registry (replacing one of the same name)."""
    FAMILIES[:] = [f for f in FAMILIES if f.name != family.name] + [family]
    return family


def _supported() -> str:
    return "; ".join(f.supported for f in FAMILIES)


def find(model: nn.Module) -> tuple[nn.Module, Family]:
    """The explainable network inside ``model`` (itself or its ``.model``) and its family."""
    for candidate in (model, getattr(model, "model", None)):
        if isinstance(candidate, nn.Module):
            for fam in FAMILIES:
                if fam.matches(candidate):
                    return candidate, fam
    inner = getattr(model, "model", None)
    name = type(inner if isinstance(inner, nn.Module) else model).__name__
    raise UnsupportedModelError(f"cannot explain a {name}: vitlens.relevance supports {_supported()}")


def unwrap(model: nn.Module) -> nn.Module:
    """The explainable network inside ``model``, else a clear ``UnsupportedModelError``."""
    return find(model)[0]


def read(model: nn.Module, *, dtype: torch.dtype, mm_dtype: torch.dtype,
         rounding: bool | None = None, tf32: bool = False) -> Backbone:
    """Detached weights of ``model`` (any registered family), cast to ``dtype``."""
    net, fam = find(model)
    bb = fam.read(net, dtype=dtype, mm_dtype=mm_dtype, rounding=rounding, tf32=tf32)
    bb.family = fam
    return bb


from vitlens.relevance.families import eva as _eva, vit as _vit  # noqa: E402  (the built-in adapters)

register_family(Family("timm-vit", _vit.SUPPORTED, _vit.matches, _vit.read))
register_family(Family("timm-eva", _eva.SUPPORTED, _eva.matches, _eva.read,
                       block_forward=_eva.block_forward, block_rule=_eva.block_rule,
                       gradient_block_forward=_eva.gradient_block_forward))
