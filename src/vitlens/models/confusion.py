"""Confusion-matrix picture (rows: true class, normalised per row)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def confusion_matrix_image(matrix: torch.Tensor | np.ndarray, class_names: Sequence[str], *, title: str = "") -> np.ndarray:
    """(C, C) counts -> (H, W, 3) uint8 RGB heat map; tick labels only up to 40 classes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    counts = np.asarray(torch.as_tensor(matrix).detach().cpu(), dtype=np.float64)
    rows = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    n = len(class_names)
    side = min(12.0, max(4.0, 0.45 * n + 2.0))
    fig = Figure(figsize=(side, side), dpi=80)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    im = ax.imshow(rates, vmin=0.0, vmax=1.0, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if n <= 40:
        ax.set_xticks(range(n), labels=list(class_names), rotation=90, fontsize=8)
        ax.set_yticks(range(n), labels=list(class_names), fontsize=8)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
