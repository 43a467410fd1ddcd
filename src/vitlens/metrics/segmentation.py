"""The segmentation test (Chefer et al. 2021, Table 2; spec section 6), streamed over a dataset.

Per image the heat map (upsampled, min-max normalised: :func:`vitlens.relevance.heatmap`)
is thresholded at its own mean: foreground = ``map > mean(map)``. Pixel accuracy and the
intersection / union of background and foreground are *accumulated over the dataset*
(``correct / (total + eps)``, ``IoU_c = inter_c / (union_c + eps)``, mIoU = mean of the two
classes, eps = ``np.spacing(1)`` as in the authors' code). mAP is the mean over images of the
average precision of the scores ``[1 - map, map]`` against the targets ``[gt == 0, gt == 1]``
pooled into one binary problem.
"""
from __future__ import annotations

import torch

from vitlens.metrics.ranking import average_precision

_EPS = 2.220446049250313e-16  # np.spacing(1.0), as in the authors' evaluation


def _check_maps(heatmaps: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor | None):
    if heatmaps.dim() != 3:
        raise ValueError(f"heatmaps must be (B, H, W), got shape {tuple(heatmaps.shape)}")
    if masks.shape != heatmaps.shape:
        raise ValueError(
            f"masks {tuple(masks.shape)} must match heatmaps {tuple(heatmaps.shape)} "
            "(upsample the maps to the image with vitlens.relevance.heatmap first)"
        )
    if valid is None:
        valid = torch.ones(heatmaps.shape[0], dtype=torch.bool, device=heatmaps.device)
    valid = torch.as_tensor(valid, device=heatmaps.device).bool()
    if valid.shape != heatmaps.shape[:1]:
        raise ValueError(f"valid must be ({heatmaps.shape[0]},), got shape {tuple(valid.shape)}")
    return heatmaps[valid], masks.to(heatmaps.device)[valid] > 0.5


def segmentation_scores_per_image(heatmaps: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image pieces of the test: ``correct``, ``total``, ``inter`` (B, 2), ``union`` (B, 2), ``ap`` (B,)."""
    # 1 - map in the maps' own dtype (as the authors' float32 code does: ties stay ties)
    scores = torch.cat([1 - heatmaps.flatten(1), heatmaps.flatten(1)], 1)
    heatmaps = heatmaps.double()
    fg = heatmaps > heatmaps.flatten(1).mean(1).view(-1, 1, 1)
    gt = masks.bool()
    correct = (fg == gt).flatten(1).sum(1)
    total = torch.full_like(correct, fg[0].numel()) if fg.numel() else correct
    inter = torch.stack([(~fg & ~gt).flatten(1).sum(1), (fg & gt).flatten(1).sum(1)], 1)
    union = torch.stack([(~fg | ~gt).flatten(1).sum(1), (fg | gt).flatten(1).sum(1)], 1)
    targets = torch.cat([~gt.flatten(1), gt.flatten(1)], 1)
    ap = torch.nan_to_num(average_precision(scores, targets), nan=0.0)
    return {"correct": correct, "total": total, "inter": inter, "union": union, "ap": ap}


class SegmentationScores:
    """Accumulates the paper's segmentation test over batches.

    >>> scores = SegmentationScores()
    >>> scores.update(heatmaps, masks)          # (B, H, W) in [0, 1], (B, H, W) in {0, 1}
    >>> scores.compute()                        # {"pixel_acc", "miou", "map", "n_images"}

    ``valid`` (B,) bool drops samples without a mask (e.g. a batch's ``has_mask``); they are
    never counted. Scores are fractions in [0, 1] (the paper prints them times 100).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.correct = 0
        self.total = 0
        self.inter = torch.zeros(2, dtype=torch.int64)
        self.union = torch.zeros(2, dtype=torch.int64)
        self.ap: list[torch.Tensor] = []

    def update(self, heatmaps: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        heatmaps, masks = _check_maps(heatmaps, masks, valid)
        if heatmaps.shape[0] == 0:
            return
        if heatmaps.min() < 0 or heatmaps.max() > 1:
            raise ValueError("heatmaps must be min-max normalised to [0, 1] (use vitlens.relevance.heatmap)")
        s = segmentation_scores_per_image(heatmaps, masks)
        self.correct += int(s["correct"].sum())
        self.total += int(s["total"].sum())
        self.inter += s["inter"].sum(0).cpu()
        self.union += s["union"].sum(0).cpu()
        self.ap.append(s["ap"].cpu())

    @property
    def ap_per_image(self) -> torch.Tensor:
        """(N,) the average precision of each image seen (for a bootstrap of mAP)."""
        return torch.cat(self.ap) if self.ap else torch.zeros(0, dtype=torch.float64)

    def compute(self) -> dict[str, float]:
        n = len(self.ap_per_image)
        if n == 0:
            return {"pixel_acc": float("nan"), "miou": float("nan"), "map": float("nan"), "n_images": 0}
        iou = self.inter.double() / (self.union.double() + _EPS)
        return {
            "pixel_acc": self.correct / (self.total + _EPS),
            "miou": float(iou.mean()),
            "map": float(self.ap_per_image.mean()),
            "n_images": n,
        }
