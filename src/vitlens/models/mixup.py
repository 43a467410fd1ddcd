"""Batch mixup / cutmix with soft targets (timm's batch mode, without its even-batch limit)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    off = smoothing / num_classes
    return F.one_hot(labels, num_classes).to(torch.float32) * (1.0 - smoothing) + off


class Mixup:
    """Mix each image with the batch reversed; returns (images, soft targets).

    `mixup_alpha`/`cutmix_alpha`: Beta parameters (0 disables); with both on, cutmix is picked
    with probability `switch_prob`; `prob`: chance a batch is mixed at all.
    """

    def __init__(self, num_classes: int, *, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 prob: float = 1.0, switch_prob: float = 0.5, label_smoothing: float = 0.0, seed: int | None = None):
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob, self.label_smoothing = prob, switch_prob, label_smoothing
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's mixes from (seed, epoch) alone, so a run resumed from an epoch-end
        checkpoint mixes as the uninterrupted run did (the classifier calls it every epoch)."""
        self.rng = np.random.default_rng([int(self.seed or 0), int(epoch)])

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        targets = soft_targets(labels, self.num_classes, self.label_smoothing).to(images.device)
        if not self.enabled or self.rng.random() >= self.prob:
            return images, targets
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or self.rng.random() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(self.rng.beta(alpha, alpha))
        flipped = images.flip(0)
        if use_cutmix:
            h, w = images.shape[-2:]
            cut = (1.0 - lam) ** 0.5
            ch, cw = int(h * cut), int(w * cut)
            cy, cx = int(self.rng.integers(h)), int(self.rng.integers(w))
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
            images = images.clone()
            images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
        else:
            images = images * lam + flipped * (1.0 - lam)
        return images, targets * lam + targets.flip(0) * (1.0 - lam)
