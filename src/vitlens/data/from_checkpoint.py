"""Evaluate on the split a model was trained with: the data settings a checkpoint holds.

`ImageDataModule` calls `save_hyperparameters`, so every Lightning checkpoint of a run holds
its data settings (`datamodule_hyper_parameters`). Rebuilding the validation split with other
`val_fraction` / `seed` (e.g. the defaults) puts training images into it when the source has
no val split of its own, and another `eval_resize` / `crop_pct` shows the model images it was
not validated on. Both `explain.py evaluate` and `train.py validate/test` go through here:

* `checkpoint_data_settings(path)`: the settings of the checkpoint (None for a checkpoint
  without them);
* `evaluation_datamodule(...)`: the checkpoint's settings with a user's overrides, checked:
  an override that puts training images into the evaluated split is a `SplitOverlapError`
  naming how many, a class list that differs from the model's a `DataError` naming the
  checkpoint, the data path and the fix;
* `use_checkpoint_data(data, ckpt_path, defaults)`: the same for a LightningCLI config.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from vitlens.data.errors import DataError

__all__ = ["SPLIT_KEYS", "TRANSFORM_KEYS", "REUSED_KEYS", "SplitOverlapError", "EvaluationData",
           "checkpoint_data_settings", "checkpoint_class_names", "check_classes", "evaluation_datamodule",
           "split_overlap", "use_checkpoint_data"]

SPLIT_KEYS = ("val_fraction", "seed")  # which images are train and which val (source without a val split)
TRANSFORM_KEYS = ("eval_resize", "crop_pct")  # what the model sees of a val/test image
# reused from the checkpoint unless overridden (the rest, e.g. batch sizes and workers, is not the data)
REUSED_KEYS = ("path", *SPLIT_KEYS, *TRANSFORM_KEYS, "mask_column", "skip_corrupt", "generate", "generate_options")


class SplitOverlapError(DataError):
    """The evaluated split holds images the model was trained on."""


def _read(checkpoint: str | os.PathLike | Mapping) -> Mapping:
    if isinstance(checkpoint, Mapping):
        return checkpoint
    import torch

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same problem for the user
        raise DataError(f"{path} is not a readable checkpoint ({type(error).__name__}: {' '.join(str(error).split())[:200]})") from None


def checkpoint_data_settings(checkpoint: str | os.PathLike | Mapping) -> dict[str, Any] | None:
    """The `ImageDataModule` settings saved in a Lightning checkpoint (a path or the loaded
    dict), or None when it holds none (a checkpoint written without a data module)."""
    saved = _read(checkpoint).get("datamodule_hyper_parameters")
    if not saved:
        return None
    return {k: v for k, v in dict(saved).items() if not k.startswith("_")}


def checkpoint_class_names(checkpoint: str | os.PathLike | Mapping) -> list[str] | None:
    names = (_read(checkpoint).get("hyper_parameters") or {}).get("class_names")
    return None if names is None else [str(c) for c in names]


def _short(names: Sequence[str], limit: int = 6) -> str:
    names = list(names)
    return "[" + ", ".join(repr(n) for n in names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "") + "]"


def check_classes(model_classes: Sequence[str], data_classes: Sequence[str], *, checkpoint, data_path,
                  trained_on: str | None = None) -> None:
    """A `DataError` naming the checkpoint, the data path and the fix when the class lists differ."""
    ck, ds = list(model_classes), list(data_classes)
    if ck == ds:
        return
    only_ck = [c for c in ck if c not in ds]
    only_ds = [c for c in ds if c not in ck]
    detail = (f"same classes in another order: checkpoint {_short(ck)}, dataset {_short(ds)}" if not only_ck and not only_ds
              else f"only in checkpoint: {_short(only_ck)}; only in dataset: {_short(only_ds)}")
    fix = (f"evaluate it on the data it was trained on ({trained_on})" if trained_on and str(trained_on) != str(data_path)
           else "evaluate it on the data it was trained on, or pick the checkpoint trained on this data")
    raise DataError(f"checkpoint {checkpoint} has {len(ck)} classes but data path {data_path} has {len(ds)} "
                    f"({detail}): {fix}")


def split_overlap(path: str, split: str, *, trained: Mapping[str, Any], evaluated: Mapping[str, Any],
                  trained_path: str | None = None) -> tuple[int, int]:
    """(how many images of `split` built with `evaluated` settings are training images under
    `trained` settings, how many images the split has). Reads only the file lists."""
    from vitlens.data.datamodule import ImageDataModule

    def build(where: str, settings: Mapping[str, Any]):
        keys = ("val_fraction", "seed", "mask_column", "generate", "generate_options")
        dm = ImageDataModule(where, batch_size=1, num_workers=0, **{k: settings[k] for k in keys if k in settings})
        dm.setup("fit" if split != "test" else "test")
        return dm

    ours = build(path, evaluated)
    dataset = {"val": ours.val_dataset, "test": ours.test_dataset, "train": ours.train_dataset}[split]
    if dataset is None:
        return 0, 0
    theirs = build(trained_path or path, trained)
    train = {os.path.realpath(p) for p in theirs.train_dataset.paths}
    return sum(os.path.realpath(p) in train for p in dataset.paths), len(dataset)


@dataclass
class EvaluationData:
    """What `evaluation_datamodule` built and why: `settings` (the data settings used),
    `origin[key]` ("checkpoint", "override" or "default"), `notes` (one line each)."""

    datamodule: Any
    settings: dict
    origin: dict
    notes: list[str] = field(default_factory=list)


def evaluation_datamodule(checkpoint, overrides: Mapping[str, Any] | None = None, *, split: str = "val",
                          class_names: Sequence[str] | None = None, **datamodule_kwargs) -> EvaluationData:
    """An `ImageDataModule` for evaluating `checkpoint` on `split`, on the split it was trained with.

    The checkpoint's data settings (`REUSED_KEYS`) are reused; `overrides` (None values
    ignored) replace them. An override of `val_fraction` / `seed` (or another `path` to the
    same images) that puts training images into the evaluated val/test split raises a
    `SplitOverlapError` naming how many. `class_names` (the model's) must match the data's.
    `datamodule_kwargs` (image_size, mean, std, batch sizes, workers) go to the data module.
    """
    from vitlens.data.datamodule import ImageDataModule

    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    saved = checkpoint_data_settings(checkpoint)
    settings, origin, notes = {}, {}, []
    for key in REUSED_KEYS:
        if key in overrides:
            settings[key], origin[key] = overrides[key], "override"
        elif saved is not None and key in saved:
            settings[key], origin[key] = saved[key], "checkpoint"
    for key, value in overrides.items():  # other data-module options a caller passes through
        if key not in settings:
            settings[key], origin[key] = value, "override"
    name = checkpoint if not isinstance(checkpoint, Mapping) else "the checkpoint"
    if "path" not in settings:
        raise DataError(f"checkpoint {name} holds no data path: give --data.path")
    path = str(settings["path"])
    if origin["path"] == "checkpoint" and not Path(path).exists() and not settings.get("generate"):
        raise DataError(f"checkpoint {name} was trained on data at {path}, which is not there "
                        f"(relative to {os.getcwd()}): give --data.path")
    if saved is None:
        notes.append(f"checkpoint {name} holds no data settings: the {split} split is built with "
                     f"val_fraction={settings.get('val_fraction', 0.2)}, seed={settings.get('seed', 0)}; if the model was "
                     "trained with others, pass them (--data.val_fraction, --data.seed)")
    for key in TRANSFORM_KEYS:
        if origin.get(key) == "override" and saved is not None and key in saved and saved[key] != settings[key]:
            notes.append(f"--data.{key} {settings[key]}: the model was validated with {key}={saved[key]}")
    dm = ImageDataModule(path, **{k: v for k, v in settings.items() if k != "path"}, **datamodule_kwargs)
    if class_names is not None:
        check_classes(class_names, dm.class_names, checkpoint=name, data_path=path,
                      trained_on=saved.get("path") if saved else None)
    if saved is not None and split in ("val", "test"):
        changed = [k for k in SPLIT_KEYS if origin.get(k) == "override" and saved.get(k) != settings[k]]
        moved = origin["path"] == "override" and saved.get("path") not in (None, path)
        if changed or moved:
            trained_path = saved.get("path") if moved and saved.get("path") and Path(saved["path"]).exists() else None
            overlap, total = split_overlap(path, split, trained=saved, evaluated=settings, trained_path=trained_path)
            if overlap:
                what = ", ".join(f"--data.{k} {settings[k]}" for k in changed) or f"--data.path {path}"
                raise SplitOverlapError(
                    f"{what} puts {overlap} of the {total} {split} images into the evaluated split that "
                    f"{name} was trained on (it was trained with "
                    + ", ".join(f"{k}={saved.get(k)}" for k in SPLIT_KEYS)
                    + f"): drop {'the override' if changed else '--data.path'} to evaluate on the model's own {split} split")
    return EvaluationData(dm, settings, origin, notes)


def use_checkpoint_data(data, ckpt_path, defaults: Mapping[str, Any]) -> list[str]:
    """For `train.py validate/test --ckpt_path`: the checkpoint's data settings in a config.

    `data`: the data section of the parsed config (attribute or item access), updated in
    place; `defaults`: `ImageDataModule`'s signature defaults. A value still at its default
    takes the checkpoint's; a value set to something else (in a config file or on the command
    line) is the user's override: for `SPLIT_KEYS` an error when it puts training images into
    the val/test split. Checks the classes too. Returns one-line notes of what was taken.
    """
    get = (lambda k: data[k]) if isinstance(data, Mapping) else (lambda k: getattr(data, k, None))

    def put(k, v):
        if isinstance(data, Mapping):
            data[k] = v
        else:
            setattr(data, k, v)

    saved = checkpoint_data_settings(ckpt_path)
    names = checkpoint_class_names(ckpt_path)
    notes: list[str] = []
    path = str(get("path"))
    if names is not None and Path(path).exists():
        from vitlens.data.sources import describe_source

        check_classes(names, describe_source(path).class_names, checkpoint=ckpt_path, data_path=path,
                      trained_on=saved.get("path") if saved else None)
    if saved is None:
        return notes
    taken, overridden = [], {}
    for key in SPLIT_KEYS + TRANSFORM_KEYS + ("mask_column",):
        if key not in saved or get(key) == saved[key]:
            continue
        if get(key) == defaults.get(key):
            put(key, saved[key])
            taken.append(f"{key}={saved[key]}")
        else:
            overridden[key] = get(key)
    if any(k in SPLIT_KEYS for k in overridden) and Path(path).exists():
        current = {k: get(k) for k in REUSED_KEYS}
        for split in ("val", "test"):
            overlap, total = split_overlap(path, split, trained=saved, evaluated=current)
            if overlap:
                what = ", ".join(f"data.{k}={v}" for k, v in overridden.items() if k in SPLIT_KEYS)
                raise SplitOverlapError(
                    f"{what} puts {overlap} of the {total} {split} images of {path} into the split that {ckpt_path} "
                    "was trained on (it was trained with " + ", ".join(f"{k}={saved.get(k)}" for k in SPLIT_KEYS)
                    + "): remove the override to validate on the model's own split")
    if taken:
        notes.append(f"data settings of {Path(ckpt_path).name}: {', '.join(taken)}")
    for key, value in overridden.items():
        if key in TRANSFORM_KEYS:
            notes.append(f"data.{key}={value}: the model was validated with {key}={saved[key]}")
    return notes
