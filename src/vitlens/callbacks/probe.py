"""Which validation images the callback explains: a seeded, class-stratified order.

The order is a permutation of (a prefix of) the validation set that cycles through the
classes: its first ``num_samples`` entries are the probe set shown every epoch, its first
``perturbation_samples`` entries the images of the perturbation test. Both are therefore
stratified by class, and the probe set is part of the perturbation set when it is smaller.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import Dataset, Subset

__all__ = ["stratified_order", "dataset_labels", "dataset_class_names"]


def stratified_order(labels: Sequence[int], count: int, *, seed: int = 0) -> list[int]:
    """Indices of ``count`` samples (all when fewer), cycling through the classes.

    Classes are visited in a seeded random order, and within a class the samples in a seeded
    random order, so that any prefix of the result is as balanced across classes as the
    data allows. Uses its own generator: the global random state is not touched.
    """
    if count <= 0:
        return []
    generator = torch.Generator().manual_seed(int(seed))
    labels_t = torch.as_tensor(list(labels), dtype=torch.long)
    classes = torch.unique(labels_t)
    classes = classes[torch.randperm(len(classes), generator=generator)]
    per_class = []
    for c in classes.tolist():
        members = torch.nonzero(labels_t == c).flatten()
        per_class.append(members[torch.randperm(len(members), generator=generator)].tolist())
    order: list[int] = []
    longest = max((len(m) for m in per_class), default=0)
    for rank in range(longest):
        for members in per_class:
            if rank < len(members):
                order.append(members[rank])
                if len(order) == count:
                    return order
    return order


def dataset_labels(dataset: Dataset) -> list[int]:
    """The label of every sample, from the dataset's label list when it exposes one.

    Looks for ``labels`` or ``targets`` (a sequence of ints, as our readers and torchvision's
    expose); a ``Subset`` is resolved through its parent. Otherwise every sample is read
    (``dataset[i]["label"]``), which loads its image: correct, but slow on a large set.
    """
    if isinstance(dataset, Subset):
        parent = dataset_labels(dataset.dataset)
        return [int(parent[i]) for i in dataset.indices]
    for name in ("labels", "targets"):
        values = getattr(dataset, name, None)
        if values is not None and not callable(values):
            values = [int(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]
            if len(values) != len(dataset):
                raise ValueError(
                    f"{type(dataset).__name__}.{name} has {len(values)} entries for {len(dataset)} samples"
                )
            return values
    labels = []
    for i in range(len(dataset)):
        sample = dataset[i]
        if not isinstance(sample, dict) or "label" not in sample:
            raise KeyError(
                f"{type(dataset).__name__}[{i}] has no 'label' key: the callback needs the batch dict of docs/DESIGN.md"
            )
        labels.append(int(sample["label"]))
    return labels


def dataset_class_names(dataset: Dataset, *fallbacks) -> list[str] | None:
    """``class_names`` of the dataset (through a ``Subset``), else of the first fallback having them."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    for source in (dataset, *fallbacks):
        names = getattr(source, "class_names", None)
        if names:
            return [str(n) for n in names]
    return None
