"""How well a heat map points at the object: pointing game, share of relevance, ROC AUC.

All take heat maps (B, H, W) (min-max normalised, :func:`vitlens.relevance.heatmap`) and
object masks (B, H, W) in {0, 1}; a box becomes a mask with :func:`boxes_to_masks`. Each
returns one value per image, NaN where the score is undefined; :class:`LocalizationScores`
averages over a dataset and leaves out samples without a mask or box (never counted as misses).
"""
from __future__ import annotations

import torch

from vitlens.metrics.ranking import roc_auc
from vitlens.relevance.heatmap import SIGNED, heatmap


def boxes_to_masks(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 4) boxes ``[x_min, y_min, x_max, y_max]`` in pixels -> (B, H, W) float masks.

    A pixel (row y, column x) covers ``[x, x+1) x [y, y+1)``; it is on the object when its
    centre ``(x + 0.5, y + 0.5)`` lies inside the box (edges included).
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (B, 4) [x_min, y_min, x_max, y_max], got shape {tuple(boxes.shape)}")
    h, w = size
    xs = torch.arange(w, device=boxes.device, dtype=boxes.dtype) + 0.5
    ys = torch.arange(h, device=boxes.device, dtype=boxes.dtype) + 0.5
    inside_x = (xs >= boxes[:, 0:1]) & (xs <= boxes[:, 2:3])  # (B, W)
    inside_y = (ys >= boxes[:, 1:2]) & (ys <= boxes[:, 3:4])  # (B, H)
    return (inside_y.unsqueeze(2) & inside_x.unsqueeze(1)).float()


def object_masks(batch: dict, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The object of every sample of a batch dict: ``(masks (B, H, W) float, valid (B,) bool)``, or None.

    One rule for the callback and ``explain.py evaluate``: a sample's ``mask`` where it has one
    (``has_mask``, default: all), else its ``box`` (``has_box``, default: all); a sample with
    neither gets an empty mask and ``valid=False`` (its scores are NaN, left out of means).
    None when the batch has neither key.
    """
    h, w = size
    masks = valid = None
    if "mask" in batch:
        masks = torch.as_tensor(batch["mask"]).float()
        if tuple(masks.shape[-2:]) != (h, w):
            raise ValueError(f"object masks are {tuple(masks.shape[-2:])} but the images are {(h, w)}: "
                             "masks must be transformed with their images")
        valid = torch.as_tensor(batch.get("has_mask", torch.ones(len(masks), dtype=torch.bool))).bool().to(masks.device)
    if "box" in batch:
        boxes = torch.as_tensor(batch["box"])
        has_box = torch.as_tensor(batch.get("has_box", torch.ones(len(boxes), dtype=torch.bool))).bool().to(boxes.device)
        box_masks = boxes_to_masks(boxes, (h, w))
        if masks is None:
            masks, valid = box_masks, has_box
        else:
            masks = torch.where(valid.view(-1, 1, 1), masks, box_masks.to(masks.device))
            valid = valid | has_box.to(valid.device)
    if masks is None:
        return None
    return masks * valid.view(-1, 1, 1).to(masks), valid


def _check(heatmaps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if heatmaps.dim() != 3 or masks.shape != heatmaps.shape:
        raise ValueError(
            f"heatmaps and masks must both be (B, H, W) of the same size, got {tuple(heatmaps.shape)} "
            f"and {tuple(masks.shape)} (upsample the maps with vitlens.relevance.heatmap first)"
        )
    return heatmaps.flatten(1).double(), masks.to(heatmaps.device).flatten(1) > 0.5


def pointing_game(heatmaps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B,) 1.0 where the most relevant pixel lies on the object, else 0.0; NaN for an empty mask.

    Ties for the maximum: the first pixel in row-major order counts.
    """
    maps, on = _check(heatmaps, masks)
    hit = on.gather(1, maps.argmax(1, keepdim=True)).squeeze(1).double()
    return torch.where(on.any(1), hit, torch.full_like(hit, float("nan")))


def relevance_on_object(heatmaps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B,) share of the map's total relevance that falls on the object; NaN for an empty mask.

    A map that is 0 everywhere (a constant relevance map) counts as uniform: its share is the
    object's share of the image.
    """
    maps, on = _check(heatmaps, masks)
    total = maps.sum(1)
    share = (maps * on).sum(1) / total.where(total > 0, torch.ones_like(total))
    share = torch.where(total > 0, share, on.double().mean(1))
    return torch.where(on.any(1), share, torch.full_like(share, float("nan")))


def mask_roc_auc(heatmaps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B,) ROC AUC of the map as a per-pixel object score; NaN when the mask is empty or full."""
    maps, on = _check(heatmaps, masks)
    return roc_auc(maps, on)


SCORES = ("pointing_game", "relevance_on_object", "roc_auc")


def localization(relevance: torch.Tensor, masks: torch.Tensor, *, signed: str = "positive",
                 scores: tuple[str, ...] = SCORES) -> dict[str, torch.Tensor]:
    """Per-image localisation scores of raw relevance maps: the one rule of ``explain.py evaluate``
    and the training callback, so both give the same number for the same map.

    ``relevance`` (B, h, w) raw maps (patch grid or pixels) are upsampled and scaled to [0, 1]
    with :func:`vitlens.relevance.heatmap` at the masks' size, ``signed`` deciding how negative
    relevance enters (``"positive"``: the evidence for the class, as LRP papers show it, the
    default; ``"absolute"``; ``"raw"``: plain min-max, which puts a signed map's zero at
    mid-scale). Non-negative maps score the same under all three. ``masks`` (B, H, W) in {0, 1}.
    Returns ``{score: (B,) values}`` for ``scores`` (NaN where a score is undefined).
    """
    if signed not in SIGNED:
        raise ValueError(f"signed must be one of {', '.join(SIGNED)}, got {signed!r}")
    unknown = [s for s in scores if s not in SCORES]
    if unknown:
        raise ValueError(f"unknown localisation score {unknown[0]!r}; choose from {', '.join(SCORES)}")
    maps = heatmap(relevance, tuple(masks.shape[-2:]), signed=signed)
    return {name: LocalizationScores.SCORES[name](maps, masks) for name in scores}


class LocalizationScores:
    """Streams pointing game, relevance share and ROC AUC over a dataset.

    ``update(heatmaps, masks, valid=None)``; ``valid`` (B,) bool marks samples that have a
    mask or box (e.g. ``has_mask``). ``compute()`` -> means over the samples where each
    score is defined, plus ``n_images``; ``per_image[name]`` keeps the values for
    :func:`vitlens.metrics.bootstrap_ci`.
    """

    SCORES = {"pointing_game": pointing_game, "relevance_on_object": relevance_on_object, "roc_auc": mask_roc_auc}

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._values: dict[str, list[torch.Tensor]] = {k: [] for k in self.SCORES}

    def update(self, heatmaps: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        if valid is not None:
            valid = torch.as_tensor(valid, device=heatmaps.device).bool()
            heatmaps, masks = heatmaps[valid], masks.to(heatmaps.device)[valid]
        for name, fn in self.SCORES.items():
            self._values[name].append(fn(heatmaps, masks).cpu())

    def add(self, relevance: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor | None = None, *,
            signed: str = "positive") -> None:
        """Like ``update``, from raw relevance maps scored by :func:`localization` (``signed``)."""
        if valid is not None:
            valid = torch.as_tensor(valid, device=relevance.device).bool()
            relevance, masks = relevance[valid], masks.to(relevance.device)[valid]
        for name, values in localization(relevance, masks, signed=signed).items():
            self._values[name].append(values.cpu())

    @property
    def per_image(self) -> dict[str, torch.Tensor]:
        """Each score's defined per-image values (NaN ones dropped)."""
        out = {}
        for name, parts in self._values.items():
            v = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
            out[name] = v[~v.isnan()]
        return out

    def compute(self) -> dict[str, float]:
        per = self.per_image
        out = {name: float(v.mean()) if len(v) else float("nan") for name, v in per.items()}
        out["n_images"] = len(per["pointing_game"])
        return out
