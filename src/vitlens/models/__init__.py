"""timm Vision Transformer backbones, their weights, and the Lightning classifier."""
from vitlens.models.backbone import SUPPORTED_FAMILIES, create_backbone
from vitlens.models.classifier import ViTClassifier, load_classifier
from vitlens.models.optim import param_groups_layer_decay
from vitlens.models.weights import CheckpointClassMismatchError, load_backbone_weights

__all__ = [
    "SUPPORTED_FAMILIES",
    "CheckpointClassMismatchError",
    "ViTClassifier",
    "create_backbone",
    "load_backbone_weights",
    "load_classifier",
    "param_groups_layer_decay",
]
