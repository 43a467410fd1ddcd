"""Rendering relevance maps for people: overlays, captioned panels, contact sheets, curves.

The one place that turns maps into pictures (explain.py and the training callback use it).
Everything returns uint8 RGB numpy arrays (H, W, 3) or a matplotlib ``Figure``; nothing
touches pyplot's global state (colormaps come from ``matplotlib.colormaps``, figures from
``matplotlib.figure.Figure`` with the Agg canvas).
"""
from __future__ import annotations

import io
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from vitlens.relevance.heatmap import heatmap

_LUT_CACHE: dict[str, np.ndarray] = {}


def _lut(colormap: str) -> np.ndarray:
    """(256, 3) float table of a matplotlib colormap, looked up once."""
    if colormap not in _LUT_CACHE:
        import matplotlib

        try:
            cmap = matplotlib.colormaps[colormap]
        except KeyError:
            raise ValueError(f"unknown colormap {colormap!r} (try 'jet', 'inferno', 'viridis')") from None
        _LUT_CACHE[colormap] = cmap(np.linspace(0.0, 1.0, 256))[:, :3].astype(np.float32)
    return _LUT_CACHE[colormap]


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def colorize(heatmaps, colormap: str = "jet") -> np.ndarray:
    """(B, H, W) maps in [0, 1] -> uint8 (B, H, W, 3) colours."""
    maps = np.clip(_to_numpy(heatmaps), 0.0, 1.0)
    idx = np.round(maps * 255).astype(np.uint8)
    return (_lut(colormap)[idx] * 255 + 0.5).astype(np.uint8)


def overlay(images01, heatmaps, alpha: float = 0.5, colormap: str = "jet", *, signed: str = "positive") -> np.ndarray:
    """Blend heat maps over images: uint8 (B, H, W, 3).

    Args:
        images01: (B, 3, H, W) or (B, H, W, 3) images in [0, 1] (tensor or array; a
            uint8 array is taken as 0..255).
        heatmaps: (B, H, W) maps in [0, 1]. Maps of another size (e.g. the patch grid) are
            upsampled and scaled with :func:`vitlens.relevance.heatmap` (``signed``).
        alpha: weight of the colour map (0 = the image only, 1 = the map only).
        colormap: any matplotlib colormap name.
        signed: for maps that are scaled here, how negative values are shown:
            ``"positive"`` (only the evidence for the class, as LRP papers show it; zero is the
            colour map's bottom), ``"absolute"`` or ``"raw"`` (min-max: zero at mid-scale).
    """
    images = _to_numpy(images01)
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255
    if images.ndim != 4:
        raise ValueError(f"images must be (B, 3, H, W) or (B, H, W, 3), got shape {images.shape}")
    if images.shape[1] == 3 and images.shape[-1] != 3:
        images = images.transpose(0, 2, 3, 1)
    b, h, w, _ = images.shape
    maps = heatmaps if isinstance(heatmaps, torch.Tensor) else torch.as_tensor(np.asarray(heatmaps))
    if maps.dim() != 3 or maps.shape[0] != b:
        raise ValueError(f"heatmaps must be ({b}, h, w) for {b} images, got shape {tuple(maps.shape)}")
    if tuple(maps.shape[1:]) != (h, w):
        maps = heatmap(maps, (h, w), signed=signed)
    colours = colorize(maps, colormap).astype(np.float32) / 255
    out = (1 - alpha) * np.clip(images, 0, 1) + alpha * colours
    return (out * 255 + 0.5).astype(np.uint8)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def caption(tile: np.ndarray, text: str, *, height: int | None = None) -> np.ndarray:
    """A uint8 (H, W, 3) tile with a white strip of ``text`` (e.g. "cardinal 0.93") below it.

    Long text gets a smaller font (down to 9 px), then is cut with "...".
    """
    tile = np.asarray(tile, dtype=np.uint8)
    h, w = tile.shape[:2]
    height = height or max(16, h // 9)
    strip = Image.new("RGB", (w, height), "white")
    draw = ImageDraw.Draw(strip)
    size = max(9, int(height * 0.75))
    font = _font(size)
    while size > 9 and draw.textlength(text, font=font) > w - 4:
        size -= 1
        font = _font(size)
    while draw.textlength(text, font=font) > w - 4 and len(text) > 4:
        text = text.removesuffix("...")[:-1] + "..."
    draw.text((2, (height - size) // 2), text, fill="black", font=font)
    return np.concatenate([tile, np.asarray(strip)], axis=0)


def upscale(tile: np.ndarray, min_size: int) -> np.ndarray:
    """Enlarge a uint8 (H, W, 3) tile (nearest neighbour, whole factors) until its shorter side is >= min_size."""
    h, w = tile.shape[:2]
    factor = -(-min_size // min(h, w))
    if factor <= 1:
        return tile
    return np.asarray(tile).repeat(factor, axis=0).repeat(factor, axis=1)


def side_by_side(tiles: Sequence[np.ndarray], captions: Sequence[str] | None = None, *, gap: int = 4) -> np.ndarray:
    """Tiles (each uint8 (H, W, 3), same height) in one row, each captioned: uint8 (H', W', 3)."""
    if not len(tiles):
        raise ValueError("side_by_side needs at least one tile")
    if captions is not None:
        if len(captions) != len(tiles):
            raise ValueError(f"{len(tiles)} tiles but {len(captions)} captions")
        tiles = [caption(t, c) for t, c in zip(tiles, captions)]
    h = max(t.shape[0] for t in tiles)
    padded = []
    for i, t in enumerate(tiles):
        t = np.asarray(t, dtype=np.uint8)
        if t.shape[0] < h:
            t = np.concatenate([t, np.full((h - t.shape[0], t.shape[1], 3), 255, np.uint8)])
        padded.append(t)
        if i < len(tiles) - 1:
            padded.append(np.full((h, gap, 3), 255, np.uint8))
    return np.concatenate(padded, axis=1)


def contact_sheet(tiles: Sequence[np.ndarray], ncols: int = 4, *, gap: int = 4) -> np.ndarray:
    """Tiles (uint8 (H, W, 3), sizes may differ) in a grid of ``ncols`` columns on white."""
    if not len(tiles):
        raise ValueError("contact_sheet needs at least one tile")
    ncols = max(1, min(ncols, len(tiles)))
    nrows = -(-len(tiles) // ncols)
    th = max(t.shape[0] for t in tiles)
    tw = max(t.shape[1] for t in tiles)
    sheet = np.full((nrows * th + (nrows - 1) * gap, ncols * tw + (ncols - 1) * gap, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, ncols)
        y, x = r * (th + gap), c * (tw + gap)
        sheet[y:y + t.shape[0], x:x + t.shape[1]] = t
    return sheet


def explanation_panel(image01, heatmaps: Mapping[str, torch.Tensor], title: str, *, alpha: float = 0.5,
                      colormap: str = "jet", min_size: int = 160, signed: str = "positive") -> np.ndarray:
    """One image beside an overlay of each method's map: uint8 (H', W', 3).

    ``image01``: (3, H, W) in [0, 1]; ``heatmaps``: method name -> (H, W) or (h, w) raw map
    (upsampled and scaled to [0, 1] with :func:`vitlens.relevance.heatmap`, ``signed``: see
    :func:`overlay`);
    ``title``: the first tile's caption (e.g. "cardinal 0.93"); overlays are captioned
    with the method names. Small images are enlarged (whole factors, nearest neighbour) to
    at least ``min_size`` pixels so captions stay readable.
    """
    image = image01.unsqueeze(0) if isinstance(image01, torch.Tensor) else np.asarray(image01)[None]
    base = overlay(image, torch.zeros(1, *image.shape[-2:]), alpha=0.0)[0]
    tiles, names = [base], [title]
    for name, m in heatmaps.items():
        m = m if isinstance(m, torch.Tensor) else torch.as_tensor(np.asarray(m))
        m = heatmap(m.unsqueeze(0), tuple(image.shape[-2:]), signed=signed)  # raw pixel-level maps too
        tiles.append(overlay(image, m, alpha=alpha, colormap=colormap)[0])
        names.append(name)
    return side_by_side([upscale(t, min_size) for t in tiles], names)


def plot_perturbation_curves(results_by_method: Mapping[str, object], path=None, *, title: str = ""):
    """Accuracy against the removed fraction, positive and negative test side by side.

    ``results_by_method``: method name -> a :class:`vitlens.metrics.PerturbationResult`
    (anything with ``fractions``, ``pos_accuracy``/``neg_accuracy`` and the AUCs). Returns a
    matplotlib ``Figure`` (not registered with pyplot); with ``path`` also writes a PNG.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, prefix, name in ((axes[0], "pos", "positive (lower AUC is better)"),
                             (axes[1], "neg", "negative (higher AUC is better)")):
        for method, res in results_by_method.items():
            acc = getattr(res, f"{prefix}_accuracy", None)
            if acc is None:
                continue
            auc = getattr(res, f"{prefix}_auc")
            ax.plot(np.asarray(res.fractions) * 100, np.asarray(acc) * 100, marker="o", ms=3,
                    label=f"{method} (AUC {auc:.1f})")
        ax.set_title(name)
        ax.set_xlabel("pixels removed (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("top-1 accuracy (%)")
    if title:
        fig.suptitle(title)
    # fixed margins, not tight_layout(): that draws the whole figure once more to measure it,
    # which doubled the cost of the callback's per-epoch curves
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.84 if title else 0.9, wspace=0.06)
    if path is not None:
        fig.savefig(path, format="png")
    return fig


def figure_to_array(fig) -> np.ndarray:
    """A matplotlib figure -> uint8 (H, W, 3) (for loggers that take arrays)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def save_png(array: np.ndarray, path) -> None:
    """Write a uint8 (H, W, 3) array as a PNG."""
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path, format="PNG")
