"""Compatibility names: the pieces now live in ``precision`` (switches, vocabulary),
``functions`` (autograd functions), ``weights`` (what is read), ``families`` (how each model
family is read) and ``forward`` (the recorded functional forward pass)."""
from vitlens.relevance.errors import UnsupportedModelError
from vitlens.relevance.families import read as read_backbone, unwrap
from vitlens.relevance.forward import (
    BlockTrace, Embedding, Trace, block_forward, embed, forward, layer_norm, qkv_output)
from vitlens.relevance.precision import float32_precision
from vitlens.relevance.weights import Backbone, BlockWeights, Linear, Norm

__all__ = ["Backbone", "BlockTrace", "BlockWeights", "Embedding", "Linear", "Norm", "Trace",
           "UnsupportedModelError", "block_forward", "embed", "float32_precision", "forward",
           "layer_norm", "qkv_output", "read_backbone", "unwrap"]
