"""AdamW parameter groups with layer-wise lr decay (the MAE fine-tuning recipe) and the
per-step warmup + cosine schedule."""
from __future__ import annotations

import math
from typing import Sequence

from torch import nn

# no weight decay on these (besides every 1-d parameter: biases and norm scales), wherever they
# sit; plus whatever the timm model's own `no_weight_decay()` names (e.g. Swin's relative
# position bias tables)
NO_WEIGHT_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token", "reg_token")
_TOKEN_PATTERNS = tuple(p for n in NO_WEIGHT_DECAY_NAMES for p in (n, f"*.{n}"))


def layer_map(model: nn.Module) -> dict[str, int]:
    """Layer id of every parameter, as timm's own `param_groups_layer_decay` assigns it: the
    model's `group_matcher(coarse=False)` (ViT/DINOv2/CLIP/SigLIP/EVA: embeddings 0,
    `blocks.i` i+1, the readout last; Swin: one id per block across stages, a stage's patch
    merging with its first block), or timm's fallback grouping for models without one."""
    from timm.models import group_parameters
    from timm.optim._param_groups import auto_group_layers

    if hasattr(model, "group_matcher"):
        return group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    return auto_group_layers(model)


def no_weight_decay_patterns(model: nn.Module) -> list[str]:
    """fnmatch patterns (timm's `no_weight_decay_list`) of the parameters kept out of weight decay."""
    own = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    return sorted(set(own) | set(_TOKEN_PATTERNS))


def uses_weight_decay(name: str, param: nn.Parameter, patterns: Sequence[str] = _TOKEN_PATTERNS) -> bool:
    """timm's rule: weight decay unless 1-d or matching one of `patterns` (fnmatch)."""
    import fnmatch

    return param.ndim > 1 and not any(fnmatch.fnmatch(name, p) for p in patterns)


def _layer_label(lid: int, last: int, names: list[str]) -> str:
    if lid == 0:
        return "embed"
    if lid == last:
        return "head"
    parts = [n.split(".") for n in names]
    common = []
    for column in zip(*parts):
        if len(set(column)) != 1:
            break
        common.append(column[0])
    if common:
        return ".".join(common)
    first = parts[0]  # e.g. a Swin stage's last block with the final norm: its block prefix
    numeric = [i for i, c in enumerate(first) if c.isdigit()]
    return ".".join(first[: numeric[-1] + 1]) if numeric else f"layer{lid}"


def param_groups_layer_decay(model: nn.Module, *, lr: float, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups with layer-wise lr decay, by timm's own `timm.optim.param_groups_layer_decay`
    (so the layers are the ones the model's `group_matcher` says, for every timm family).

    Layer id k of K+1 ids gets `lr * layer_decay ** (K - k)` (the readout/head gets `lr`);
    no weight decay on 1-d parameters (biases, norms), tokens and position embeddings. Each
    group carries `lr_scale`, `layer_id`, the names of its parameters (`param_names`) and a
    readable `name` for the lr monitor, e.g. `00_embed/wd`, `03_blocks.2/no_wd`, `05_head/wd`.
    """
    from timm.optim import param_groups_layer_decay as timm_param_groups_layer_decay

    names = {id(p): n for n, p in model.named_parameters()}
    ids = layer_map(model)
    patterns = no_weight_decay_patterns(model)
    timm_groups = timm_param_groups_layer_decay(
        model, weight_decay=weight_decay, no_weight_decay_list=patterns,
        layer_decay=layer_decay,
    )
    last = max(ids.values()) if ids else 0
    by_layer: dict[int, list[str]] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            by_layer.setdefault(ids.get(n, last), []).append(n)
    groups = []
    for g in timm_groups:
        param_names = [names[id(p)] for p in g["params"]]
        lid = ids.get(param_names[0], last)
        decay = uses_weight_decay(param_names[0], g["params"][0], patterns)
        label = _layer_label(lid, last, by_layer[lid])
        groups.append({
            "params": list(g["params"]),
            "param_names": param_names,
            "name": f"{lid:02d}_{label}/{'wd' if decay else 'no_wd'}",
            "layer_id": lid,
            "lr_scale": g["lr_scale"],
            "lr": lr * g["lr_scale"],
            "weight_decay": g["weight_decay"],
            "_decay": decay,
        })
    groups.sort(key=lambda g: (g["layer_id"], g["_decay"]))
    for g in groups:
        del g["_decay"]
    return groups


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """lr multiplier: linear warmup from 1/warmup_steps to 1, then cosine down to `min_ratio`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
