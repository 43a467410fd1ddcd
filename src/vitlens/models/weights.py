"""Initial weights for a timm backbone: timm's hub, a timm state dict, an official checkpoint
in its original layout (DINOv2, EVA-02, OpenAI/OpenCLIP CLIP, MAE, Swin), or a checkpoint of
this project.

The rules, in one place (`adapt_state_dict`):
- the state dict is unwrapped (Lightning `state_dict` with our `model.` prefix, MAE's
  `{"model": ...}`, a `module.` prefix from DataParallel/DDP);
- MAE's decoder (`decoder_*`) is dropped;
- the family's own timm `checkpoint_filter_fn` converts an original layout into timm's
  (`family_checkpoint_filter`: ViT/DeiT/DINOv2/CLIP/SigLIP -> vision_transformer's, EVA ->
  eva's, Swin -> swin_transformer's): DINOv2's `register_tokens`/`w12`/`w3`, OpenAI CLIP's
  `visual.*` names, OpenCLIP's `visual.trunk.` prefix, EVA's MIM `norm` -> `fc_norm`, SwiGLU
  and rotary buffers, Swin's old downsample placement and relative-position tables, patch
  embedding and position embedding resampling to the model's grid; then any `mask_token`
  left (MAE) is dropped;
- the position embedding is resampled (timm's `resample_abs_pos_embed`) when the patch
  grid differs (another image size);
- the classifier head is not loaded (re-initialised for the dataset's classes), except
  from a checkpoint of this project whose classes are the dataset's;
- with average pooling (MAE fine-tuning, `global_pool="avg"`), `fc_norm` is new and the
  source's final `norm` is dropped;
- anything else that is missing, unexpected or of another shape is an error listing the keys.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
MODULE_PREFIX = "model."  # ViTClassifier keeps the timm model in `.model`
_HEAD_PREFIXES = ("head.", "head_dist.")
_MAE_DROPPED_PREFIXES = ("decoder", "mask_token")


class CheckpointClassMismatchError(ValueError):
    """A checkpoint trained on other classes than the dataset's."""


def class_mismatch_message(source: str, checkpoint_classes: Sequence[str], dataset_classes: Sequence[str]) -> str:
    """One line naming how two class lists differ."""
    ck, ds = list(checkpoint_classes), list(dataset_classes)
    only_ck = [c for c in ck if c not in ds]
    only_ds = [c for c in ds if c not in ck]
    if not only_ck and not only_ds:
        detail = f"same classes in another order: checkpoint {ck}, dataset {ds}"
    else:
        detail = f"only in checkpoint: {_short(only_ck)}; only in dataset: {_short(only_ds)}"
    return f"{source} has {len(ck)} classes that differ from the dataset's {len(ds)} ({detail})"


def _short(items: Sequence[str], limit: int = 8) -> str:
    items = list(items)
    text = ", ".join(repr(i) for i in items[:limit])
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"[{text}{more}]"


def read_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a weights file (.pth/.pt/.bin/.ckpt via torch.load, .safetensors) on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path), device="cpu"))
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            if path.suffix != ".ckpt":
                raise
            # Lightning checkpoints may hold pickled hyper-parameters; this is the user's own file.
            obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # one line, naming the file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot read weights file {path}: {reason}") from exc
    if not isinstance(obj, Mapping):
        raise ValueError(f"weights file {path} holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def unwrap_state_dict(obj: Mapping[str, Any], *, source: str = "weights") -> tuple[dict[str, torch.Tensor], str]:
    """The timm-named tensors in `obj`, and its format: "lightning", "mae" or "timm"."""
    if isinstance(obj.get("state_dict"), Mapping):
        fmt, sd = "lightning", dict(obj["state_dict"])
        if any(k.startswith(MODULE_PREFIX) for k in sd):
            sd = {k[len(MODULE_PREFIX):]: v for k, v in sd.items() if k.startswith(MODULE_PREFIX)}
    elif isinstance(obj.get("model"), Mapping):
        fmt, sd = "mae", dict(obj["model"])
    elif isinstance(obj.get("model_state_dict"), Mapping):
        fmt, sd = "timm", dict(obj["model_state_dict"])
    else:
        fmt, sd = "timm", dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise ValueError(f"{source} holds no tensors (expected a timm state dict, an MAE checkpoint or a vitlens checkpoint)")
    return sd, fmt


def _grid(num_tokens: int, source: str) -> list[int]:
    side = int(round(num_tokens ** 0.5))
    if side * side != num_tokens:
        raise ValueError(f"{source}: cannot infer the patch grid of a position embedding with {num_tokens} patch tokens")
    return [side, side]


def _filter_fn(model: nn.Module):
    """The timm `checkpoint_filter_fn` of `model`'s family (None for a family without one)."""
    from timm.models import eva, swin_transformer, vision_transformer

    for module, cls in ((eva, "Eva"), (swin_transformer, "SwinTransformer"), (vision_transformer, "VisionTransformer")):
        if isinstance(model, getattr(module, cls)):
            return module.checkpoint_filter_fn
    return None


def family_checkpoint_filter(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """`state_dict` through timm's own `checkpoint_filter_fn` of `model`'s family, and "" or the
    reason the filter failed (then the state dict is returned as given, and the strict key
    check of `adapt_state_dict` names what does not fit)."""
    fn = _filter_fn(model)
    if fn is None:
        return dict(state_dict), ""
    try:
        import logging

        timm_logger = logging.getLogger("timm")
        level = timm_logger.level
        timm_logger.setLevel(logging.WARNING)  # the filters log every resampling at INFO
        try:
            out = fn(dict(state_dict), model)  # a copy: some converters pop keys in place
        finally:
            timm_logger.setLevel(level)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return dict(state_dict), f"timm's {fn.__module__}.checkpoint_filter_fn failed ({type(exc).__name__}: {reason})"
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}, ""


def adapt_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, keep_head: bool = False, source: str = "weights"
) -> dict[str, torch.Tensor]:
    """`state_dict` made to fit `model` by the rules in the module docstring; errors list offending keys."""
    from timm.layers import resample_abs_pos_embed

    sd = {k: v for k, v in state_dict.items() if not k.startswith("decoder")}
    sd, filter_error = family_checkpoint_filter(model, sd)
    sd = {k: v for k, v in sd.items() if not k.startswith(_MAE_DROPPED_PREFIXES)}
    target = model.state_dict()
    allowed_missing: set[str] = set()

    if not keep_head:
        sd = {k: v for k, v in sd.items() if not k.startswith(_HEAD_PREFIXES)}
        allowed_missing |= {k for k in target if k.startswith(_HEAD_PREFIXES)}

    # average pooling (MAE fine-tuning): fc_norm is new, the final norm is an Identity
    has_fc_norm = any(k.startswith("fc_norm.") for k in target)
    if has_fc_norm and not any(k.startswith("fc_norm.") for k in sd):
        allowed_missing |= {k for k in target if k.startswith("fc_norm.")}
        if not any(k.startswith("norm.") for k in target):
            sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}

    if "pos_embed" in sd and "pos_embed" in target and sd["pos_embed"].shape != target["pos_embed"].shape:
        num_prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
        new_grid = list(model.patch_embed.grid_size)
        old = sd["pos_embed"]
        if old.shape[-1] != target["pos_embed"].shape[-1]:
            raise ValueError(
                f"{source}: pos_embed width {old.shape[-1]} differs from the model's {target['pos_embed'].shape[-1]} (another backbone size?)"
            )
        old_grid = _grid(old.shape[1] - num_prefix, source)
        sd["pos_embed"] = resample_abs_pos_embed(old, new_size=new_grid, old_size=old_grid, num_prefix_tokens=num_prefix)

    missing = sorted(k for k in target if k not in sd and k not in allowed_missing)
    unexpected = sorted(k for k in sd if k not in target)
    wrong_shape = sorted(
        f"{k} {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
        for k in sd
        if k in target and sd[k].shape != target[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatches {_short(wrong_shape)}")
    if problems:
        if filter_error:
            problems.append(filter_error)
        raise ValueError(f"{source} does not fit the backbone: " + "; ".join(problems))
    return {k: v.to(dtype=target[k].dtype) for k, v in sd.items()}


def load_backbone_weights(
    model: nn.Module,
    weights: str | os.PathLike | Mapping[str, Any],
    *,
    backbone: str | None = None,
    class_names: Sequence[str] | None = None,
    reset_head: bool = False,
) -> str:
    """Load `weights` into the timm `model` in place; returns the format that was read.

    `weights`: "timm" (timm's hub: the pretrained `backbone`), a path (.pth/.pt/.bin/
    .safetensors timm state dict, MAE `{"model": ...}`, or a vitlens Lightning .ckpt), or an
    already-loaded dict. From a vitlens checkpoint the head is kept when its classes equal
    `class_names`; other classes are an error unless `reset_head=True`.
    """
    if isinstance(weights, Mapping):
        obj, source = dict(weights), "weights dict"
    elif str(weights) == "timm":
        if backbone is None:
            raise ValueError('weights="timm" needs the backbone name')
        import timm

        source = f"timm hub weights of {backbone}"
        try:
            obj = timm.create_model(backbone, pretrained=True).state_dict()
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RuntimeError(f"cannot download {source} (offline? give a local weights file instead): {reason}") from exc
    else:
        obj, source = read_checkpoint_file(weights), str(weights)

    sd, fmt = unwrap_state_dict(obj, source=source)
    keep_head = False
    if fmt == "lightning":
        ck_classes = (obj.get("hyper_parameters") or {}).get("class_names")
        if ck_classes is not None and class_names is not None and not reset_head:
            if list(ck_classes) != list(class_names):
                raise CheckpointClassMismatchError(
                    class_mismatch_message(f"checkpoint {source}", ck_classes, class_names)
                    + "; set reset_head=True to fine-tune it on the new classes"
                )
            keep_head = True
    adapted = adapt_state_dict(model, sd, keep_head=keep_head, source=source)
    model.load_state_dict(adapted, strict=False)
    return fmt
