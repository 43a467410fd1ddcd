"""Percentile bootstrap intervals over images."""
from __future__ import annotations

from typing import Sequence

import torch


def bootstrap_ci(
    per_image_values: torch.Tensor | Sequence[float],
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``per_image_values``.

    Images are resampled with replacement ``n_resamples`` times (a seeded CPU generator, so
    the interval is the same on every machine and run); the interval is the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the resampled means.
    NaN values (samples where the score is undefined, e.g. no mask) are left out.

    Works for every per-image score and for the perturbation AUC: the AUC is linear in the
    images' 0/1 step-correctness vectors, so ``bootstrap_ci(result.pos_auc_per_image)``
    is exactly the bootstrap that resamples those vectors.
    """
    values = torch.as_tensor(per_image_values, dtype=torch.float64).flatten().cpu()
    values = values[~values.isnan()]
    if len(values) == 0:
        return float("nan"), float("nan")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    gen = torch.Generator().manual_seed(seed)
    n = len(values)
    chunk = max(1, 2_000_000 // n)  # bounded memory: chunk x n indices at a time
    means = torch.cat([
        values[torch.randint(n, (min(chunk, n_resamples - s), n), generator=gen)].mean(1)
        for s in range(0, n_resamples, chunk)
    ])
    alpha = (1 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return low, high
