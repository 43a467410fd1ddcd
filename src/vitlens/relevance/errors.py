"""Errors of vitlens.relevance."""


class UnsupportedModelError(TypeError):
    """The model is not a Vision Transformer that vitlens.relevance can explain."""
