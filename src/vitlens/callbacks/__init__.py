"""Lightning callbacks: what the model looks at, logged every validation epoch."""
from vitlens.callbacks.explanation import ExplanationCallback

__all__ = ["ExplanationCallback"]
