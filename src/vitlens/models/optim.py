"""AdamW parameter groups with layer-wise lr decay (the MAE fine-tuning recipe) and the
per-step warmup + cosine schedule."""
from __future__ import annotations

import math
import re

from torch import nn

# no weight decay on these (besides every 1-d parameter: biases and norm scales)
NO_WEIGHT_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token", "reg_token")


def layer_id(name: str, num_blocks: int) -> int:
    """Depth of parameter `name` in a timm ViT: embeddings and tokens 0, `blocks.i` i+1,
    everything after the blocks (norm, fc_norm, head) num_blocks+1."""
    if name.startswith(("cls_token", "dist_token", "reg_token", "pos_embed", "patch_embed", "norm_pre")):
        return 0
    match = re.match(r"blocks\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    return num_blocks + 1


def uses_weight_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim > 1 and name.split(".")[-1] not in NO_WEIGHT_DECAY_NAMES and name not in NO_WEIGHT_DECAY_NAMES


def param_groups_layer_decay(model: nn.Module, *, lr: float, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups for a timm ViT: one per (layer id, decay / no decay).

    Layer id k of L+2 gets `lr * layer_decay ** (L + 1 - k)` (the head gets `lr`); each group
    carries `lr_scale`, `layer_id` and the names of its parameters (`param_names`).
    """
    num_blocks = len(model.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lid = layer_id(name, num_blocks)
        decay = uses_weight_decay(name, param)
        key = (lid, decay)
        if key not in groups:
            scale = layer_decay ** (num_blocks + 1 - lid)
            groups[key] = {
                "params": [],
                "param_names": [],
                "layer_id": lid,
                "lr_scale": scale,
                "lr": lr * scale,
                "weight_decay": weight_decay if decay else 0.0,
            }
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """lr multiplier: linear warmup from 1/warmup_steps to 1, then cosine down to `min_ratio`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
