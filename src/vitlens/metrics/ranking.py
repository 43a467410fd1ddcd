"""Batched ranking scores in torch: average precision and ROC AUC, one value per row.

Both equal scikit-learn's ``average_precision_score`` / ``roc_auc_score`` on each row,
ties included (computed in float64).
"""
from __future__ import annotations

import torch


def _check(scores: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if scores.shape != targets.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and targets {tuple(targets.shape)} differ in shape")
    if scores.dim() == 1:
        scores, targets = scores.unsqueeze(0), targets.unsqueeze(0)
    return scores.flatten(1).double(), targets.flatten(1).bool()


def _tie_group_bounds(sorted_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each position of a row sorted by score: index of the first and last element of its tie group."""
    b, n = sorted_scores.shape
    idx = torch.arange(n, device=sorted_scores.device).expand(b, n)
    new_group = torch.ones_like(sorted_scores, dtype=torch.bool)
    new_group[:, 1:] = sorted_scores[:, 1:] != sorted_scores[:, :-1]
    ends_group = torch.ones_like(new_group)
    ends_group[:, :-1] = new_group[:, 1:]
    first = torch.where(new_group, idx, torch.zeros_like(idx)).cummax(1).values
    last = torch.where(ends_group, idx, torch.full_like(idx, n)).flip(1).cummin(1).values.flip(1)
    return first, last


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, ...) scores and binary targets -> (B,) average precision of each row.

    ``AP = sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds, highest first (the
    step-wise definition of scikit-learn, no interpolation). Tied scores form one threshold.
    A row without positives gives NaN (scikit-learn warns and returns a meaningless value).
    A 1-D input is one row.
    """
    scores, targets = _check(scores, targets)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    s = scores.gather(1, order)
    y = targets.gather(1, order).double()
    tps = y.cumsum(1)
    _, last = _tie_group_bounds(s)
    tp_at = tps.gather(1, last)  # true positives at the threshold of each element's tie group
    precision = tp_at / (last + 1).double()
    positives = tps[:, -1]
    # Each positive adds 1/P recall at its own group's threshold, weighted by that precision.
    ap = (y * precision).sum(1) / positives
    return torch.where(positives > 0, ap, torch.full_like(ap, float("nan")))


def roc_auc(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, ...) scores and binary targets -> (B,) area under the ROC curve of each row.

    The Mann-Whitney statistic with average ranks for ties (= scikit-learn's
    ``roc_auc_score``). NaN where a row has only one class.
    """
    scores, targets = _check(scores, targets)
    order = torch.sort(scores, dim=1, stable=True).indices
    s = scores.gather(1, order)
    y = targets.gather(1, order).double()
    first, last = _tie_group_bounds(s)
    avg_rank = (first + last).double() / 2 + 1  # 1-based average rank of the tie group
    pos = y.sum(1)
    neg = y.shape[1] - pos
    auc = ((y * avg_rank).sum(1) - pos * (pos + 1) / 2) / (pos * neg)
    return torch.where((pos > 0) & (neg > 0), auc, torch.full_like(auc, float("nan")))
