"""Data: readers (image folder, CSV manifest, CUB-200-2011), transforms, toy birds.

Names are imported on first use, so `python -m vitlens.data.toybirds` and code that only
needs `read_image` or the normalisation helpers do not pay for importing Lightning.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "vitlens.data.normalization": ("IMAGENET_MEAN", "IMAGENET_STD", "backbone_normalization", "denormalize", "normalize"),
    "vitlens.data.errors": ("CorruptImageError", "DataError", "MissingFileError"),
    "vitlens.data.images": ("IMAGE_EXTENSIONS", "read_image", "read_mask", "to_rgb"),
    "vitlens.data.transforms": ("eval_transform", "train_transform"),
    "vitlens.data.sources": ("Sample", "describe_source", "index_source", "stratified_split"),
    "vitlens.data.dataset": ("ImageDataset",),
    "vitlens.data.datamodule": ("ImageDataModule",),
    "vitlens.data.toybirds": ("generate_toybirds", "shortcut_box", "toybird_species_names"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'vitlens.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs
    from vitlens.data.datamodule import ImageDataModule
    from vitlens.data.dataset import ImageDataset
    from vitlens.data.errors import CorruptImageError, DataError, MissingFileError
    from vitlens.data.images import IMAGE_EXTENSIONS, read_image, read_mask, to_rgb
    from vitlens.data.normalization import IMAGENET_MEAN, IMAGENET_STD, backbone_normalization, denormalize, normalize
    from vitlens.data.sources import Sample, describe_source, index_source, stratified_split
    from vitlens.data.toybirds import generate_toybirds, shortcut_box, toybird_species_names
    from vitlens.data.transforms import eval_transform, train_transform
