"""Faithfulness and localisation scores of relevance maps (spec sections 5 and 6)."""
from vitlens.metrics.bootstrap import bootstrap_ci
from vitlens.metrics.localization import (
    LocalizationScores,
    boxes_to_masks,
    localization,
    mask_roc_auc,
    object_masks,
    pointing_game,
    relevance_on_object,
)
from vitlens.metrics.perturbation import PAPER_FRACTIONS, PerturbationResult, curve_auc, perturbation_auc, perturbation_aucs, removal_ranks
from vitlens.metrics.ranking import average_precision, roc_auc
from vitlens.metrics.segmentation import SegmentationScores, segmentation_scores_per_image

__all__ = [
    "PAPER_FRACTIONS", "PerturbationResult", "perturbation_auc", "perturbation_aucs", "curve_auc", "removal_ranks",
    "SegmentationScores", "segmentation_scores_per_image", "average_precision", "roc_auc",
    "LocalizationScores", "localization", "boxes_to_masks", "pointing_game", "relevance_on_object", "mask_roc_auc", "object_masks",
    "bootstrap_ci",
]
