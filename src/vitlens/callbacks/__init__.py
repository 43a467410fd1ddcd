"""Lightning callbacks: what the model looks at, logged every validation epoch."""
from vitlens.callbacks.explanation import ExplanationCallback, ShortcutWarning
from vitlens.callbacks.progress import LineProgress, progress_bar

__all__ = ["ExplanationCallback", "ShortcutWarning", "LineProgress", "progress_bar"]
