"""ExplanationCallback: every validation epoch, what the model looks at and how faithfully.

At the end of a validation epoch (every ``every_n_epochs``) the callback explains a fixed,
class-stratified probe set of validation images with each method, runs the paper's
perturbation test on ``perturbation_samples`` validation images, scores localisation when
the data has masks or boxes, measures how much the maps moved since the last time, and logs
it all in one step: to W&B (images, an incremental table, scalars, a line plot), TensorBoard
(images, figure, scalars), CSV (scalars in the metrics file, PNGs in the log folder), or with
no logger as PNGs under ``trainer.default_root_dir``.

It never hurts the training run: an error switches the callback off with one warning
(``strict=True`` re-raises), and the model's mode, gradients, attention settings and every
random-number state are as before, so training is bit-identical with and without it.
Under DDP the work is sharded across ranks, gathered, and logged by global rank 0; every
rank reaches every collective call, also after a failure on one of them.

What is logged, in one step per explained epoch (W&B keys; TensorBoard uses the same tags):

- ``explain/<method>/maps``: one overlay per probe sample, the map of its true class, captioned
  ``#<index> true: <class> | predicted: <class> (<probability>)``; for misclassified samples
  ``explain/<method>/maps_predicted`` holds the map of the predicted class.
- ``explain/table``: an incremental W&B table, one row per epoch and probe sample (epoch,
  sample id, image, one overlay per method, label, prediction, probability, and per sample
  ``<method>/drift``, ``<method>/pointing_game``, ``<method>/relevance_on_object``).
- ``explain/<method>/pos_auc``, ``neg_auc``, ``pos_auc_probability``, ``neg_auc_probability``:
  the paper's perturbation test (spec section 5) on the first ``perturbation_samples`` images
  of the stratified order, explaining the predicted class; ``explain/random/...`` the chance level.
- ``explain/<method>/pointing_game`` and ``relevance_on_object`` (when the data has masks or
  boxes): means over all explained images, predicted-class maps (as the paper's segmentation test).
- ``explain/<method>/drift``: mean Pearson correlation between each probe map (true class, raw
  patch-grid relevance) and the same sample's map the previous time the callback ran (1 = the
  maps did not move); absent the first time.
- ``explain/perturbation_curves``: accuracy against the removed fraction, positive and
  negative test per method (a W&B line plot; a figure on TensorBoard, a PNG for CSV).
"""
from __future__ import annotations

import contextlib
import random
import traceback
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import default_collate

from vitlens.callbacks.probe import dataset_class_names, dataset_labels, stratified_order
from vitlens.data.normalization import denormalize
from vitlens.metrics import (
    PerturbationResult,
    boxes_to_masks,
    perturbation_auc,
    pointing_game,
    relevance_on_object,
)
from vitlens.relevance import METHODS, PRECISIONS, explain_many, heatmap
from vitlens.relevance.display import (
    caption,
    contact_sheet,
    figure_to_array,
    overlay,
    plot_perturbation_curves,
    save_png,
    side_by_side,
)

__all__ = ["ExplanationCallback"]

_AUC_KEYS = ("pos_auc", "neg_auc", "pos_auc_probability", "neg_auc_probability")
_CURVE_KEYS = ("pos_accuracy", "neg_accuracy", "pos_probability", "neg_probability")
_RANDOM = "random"


class ExplanationCallback(Callback):
    """Relevance maps and faithfulness of fixed validation samples, every validation epoch.

    Args:
        methods: relevance methods to show and score (names from ``vitlens.relevance.METHODS``).
        num_samples: size of the probe set shown every epoch (stratified by class, seeded).
        every_n_epochs: run at the end of every n-th validation epoch (never in the sanity check).
        perturbation_samples: validation images in the perturbation test (0 switches it off).
        batch_size: images per ``explain_many`` call (bounds memory of the relevance pass).
        perturbation_batch_size: perturbed images per model call in the perturbation test.
        precision: ``explain``'s precision (None: the model's dtype, in full float32 for a
            float32 model even when the trainer enables TF32; ``"bf16"`` is fastest on GPUs
            and stays within 1e-2 of float64 for transformer_attribution).
        include_random: also score the ``random`` control, the chance level of every metric.
        strict: re-raise errors instead of warning and switching off (for tests).
        log_table: log the W&B table ``explain/table`` (one row per epoch and probe sample).
        seed: seed of the probe-set selection.
    """

    def __init__(
        self,
        methods: Sequence[str] = ("transformer_attribution", "grad_rollout"),
        num_samples: int = 8,
        every_n_epochs: int = 1,
        perturbation_samples: int = 8,
        batch_size: int = 32,
        perturbation_batch_size: int = 128,
        precision: str | None = None,
        include_random: bool = True,
        strict: bool = False,
        log_table: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(methods, str):
            methods = (methods,)
        methods = tuple(methods)
        for method in methods:
            if method not in METHODS:
                raise ValueError(f"ExplanationCallback: unknown method {method!r}; choose from {', '.join(METHODS)}")
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"ExplanationCallback: precision must be None or one of {', '.join(PRECISIONS)}, got {precision!r}")
        for name, value, low in (
            ("num_samples", num_samples, 0),
            ("every_n_epochs", every_n_epochs, 1),
            ("perturbation_samples", perturbation_samples, 0),
            ("batch_size", batch_size, 1),
            ("perturbation_batch_size", perturbation_batch_size, 1),
        ):
            if int(value) != value or value < low:
                raise ValueError(f"ExplanationCallback: {name} must be an integer >= {low}, got {value!r}")
        self.methods = tuple(m for m in methods if m != _RANDOM)
        self.num_samples = int(num_samples)
        self.every_n_epochs = int(every_n_epochs)
        self.perturbation_samples = int(perturbation_samples)
        self.batch_size = int(batch_size)
        self.perturbation_batch_size = int(perturbation_batch_size)
        self.precision = precision
        self.include_random = bool(include_random or _RANDOM in methods)
        self.strict = bool(strict)
        self.log_table = bool(log_table)
        self.seed = int(seed)

        self.enabled = True
        self.sample_indices: list[int] | None = None  # dataset indices, probe set first
        self.class_names: list[str] | None = None
        self._dataset_size: int | None = None
        self._pending_error: tuple[BaseException, str] | None = None
        self._cache: tuple[tuple[int, ...], dict[str, torch.Tensor]] | None = None
        self._previous_maps: dict[str, dict[int, torch.Tensor]] = {}
        self._table = None

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        """One checkpoint entry per set of methods, so that two callbacks (say, one for
        transformer_attribution every epoch, one for full_lrp every 5) keep their own state.
        The seed is not part of it: a resume keeps the checkpoint's probe set."""
        return self._generate_state_key(methods=self.methods)

    @property
    def probe_indices(self) -> list[int]:
        """Dataset indices of the probe set (empty before fitting starts)."""
        return list((self.sample_indices or [])[: self.num_samples])

    def state_dict(self) -> dict[str, Any]:
        return {
            "sample_indices": self.sample_indices,
            "class_names": self.class_names,
            "dataset_size": self._dataset_size,
            "seed": self.seed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        indices = state_dict.get("sample_indices")
        self.sample_indices = None if indices is None else [int(i) for i in indices]
        self.class_names = state_dict.get("class_names")
        self._dataset_size = state_dict.get("dataset_size")
        self._cache = None

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled:
            return
        try:
            with _untouched(pl_module):
                dataset = _validation_dataset(trainer, required=False)
                if dataset is not None:
                    self._select(trainer, pl_module, dataset)
        except Exception as error:  # handled with the other ranks at the next epoch end
            self._pending_error = (error, traceback.format_exc())

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        with _untouched(pl_module):
            local, failure = None, self._pending_error
            self._pending_error = None
            if failure is None:
                try:
                    if self.sample_indices is None:
                        self._select(trainer, pl_module, _validation_dataset(trainer, required=True))
                    local = self._compute(trainer, pl_module)
                except Exception as error:
                    failure = (error, traceback.format_exc())
            if not self._all_ranks_ok(trainer, failure, "explaining"):
                return
            shards = _all_gather_object(trainer, local)
            failure = None
            if trainer.is_global_zero:
                try:
                    self._log(trainer, pl_module, _merge(shards))
                except Exception as error:
                    failure = (error, traceback.format_exc())
            self._all_ranks_ok(trainer, failure, "logging")

    # ------------------------------------------------------------------ failure guard
    def _all_ranks_ok(self, trainer: Trainer, failure: tuple[BaseException, str] | None, stage: str) -> bool:
        """Every rank tells the others whether it failed; all switch off together."""
        reports = _all_gather_object(trainer, None if failure is None else failure[1])
        failed = [(rank, text) for rank, text in enumerate(reports) if text is not None]
        if not failed:
            return True
        self.enabled = False
        rank, text = failed[0]
        where = f" on rank {rank}" if len(reports) > 1 else ""
        if self.strict:
            if failure is not None:
                raise failure[0]
            raise RuntimeError(f"ExplanationCallback failed while {stage}{where}:\n{text}")
        if trainer.is_global_zero:
            warnings.warn(
                f"ExplanationCallback failed while {stage}{where} and switched itself off; training continues "
                f"(strict=True re-raises). The error was:\n{text}",
                RuntimeWarning,
                stacklevel=2,
            )
        return False

    # ------------------------------------------------------------------ probe set
    def _select(self, trainer: Trainer, pl_module: LightningModule, dataset) -> None:
        size = len(dataset)
        names = dataset_class_names(dataset, trainer.datamodule, pl_module)
        count = max(self.num_samples, self.perturbation_samples)
        if self.sample_indices is not None:  # restored from a checkpoint
            same_data = self._dataset_size == size and (self.class_names is None or names is None or self.class_names == names)
            if same_data and len(self.sample_indices) >= min(count, size):
                return
            warnings.warn(
                "ExplanationCallback: picking a new probe set; the checkpoint's does not fit "
                + ("this validation set (its size or class names differ)" if not same_data else f"{count} samples"),
                RuntimeWarning,
                stacklevel=2,
            )
        self.sample_indices = stratified_order(dataset_labels(dataset), count, seed=self.seed)
        self.class_names = names
        self._dataset_size = size
        self._cache = None

    def _shard(self, trainer: Trainer) -> list[int]:
        """Positions (in ``sample_indices``) this rank explains."""
        return list(range(trainer.global_rank, len(self.sample_indices), trainer.world_size))

    def _load(self, trainer: Trainer, positions: list[int]) -> dict[str, torch.Tensor]:
        """The shard's samples as one batch dict on the CPU (read once, then cached)."""
        key = tuple(positions)
        if self._cache is None or self._cache[0] != key:
            dataset = _validation_dataset(trainer, required=True)
            with torch.inference_mode(False):
                batch = default_collate([dataset[self.sample_indices[p]] for p in positions])
            self._cache = (key, {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})
        return self._cache[1]

    # ------------------------------------------------------------------ computing (every rank)
    def _explain(self, pl_module: LightningModule, images: torch.Tensor, targets: torch.Tensor | None):
        """Maps of every method (one shared forward/backward pass per chunk) and the logits.

        ``targets=None`` explains the predicted class."""
        methods = self.methods + ((_RANDOM,) if self.include_random else ())
        maps: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
        logits = []
        for i in range(0, len(images), self.batch_size):
            out = explain_many(
                pl_module,
                images[i : i + self.batch_size],
                methods,
                None if targets is None else targets[i : i + self.batch_size],
                precision=self.precision,
            )
            for method in methods:
                maps[method].append(out.maps[method].detach().float())
            logits.append(out.logits.detach().float())
        return {m: torch.cat(v) for m, v in maps.items()}, torch.cat(logits)

    def _compute(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any] | None:
        positions = self._shard(trainer)
        if not positions:
            return None
        with torch.inference_mode(False):
            return self._compute_shard(trainer, pl_module, positions)

    def _compute_shard(self, trainer: Trainer, pl_module: LightningModule, positions: list[int]) -> dict[str, Any]:
        pl_module.eval()
        device = pl_module.device
        batch = self._load(trainer, positions)
        images = batch["image"].to(device)
        labels = batch["label"].to(device)
        # explain the predicted class (the perturbation test's and localisation's map); the same pass gives the
        # prediction; then the misclassified probe images again for their true class (shown beside it)
        where = torch.as_tensor(positions)
        probe_cpu = where < self.num_samples
        probe = probe_cpu.to(device)
        predicted_maps, logits = self._explain(pl_module, images, None)
        probabilities = logits.softmax(-1)
        predictions = probabilities.argmax(-1)
        wrong = predictions != labels
        true_maps = {m: t.clone() for m, t in predicted_maps.items()}
        if (wrong & probe).any():
            again, _ = self._explain(pl_module, images[wrong & probe], labels[wrong & probe])
            for method, maps in again.items():
                true_maps[method][wrong & probe] = maps

        perturbed = (where < self.perturbation_samples).to(device)
        mean, std = _normalisation(trainer, pl_module)
        size = tuple(images.shape[-2:])
        images01 = denormalize(images[probe], mean, std).clamp(0, 1)
        objects = _object_masks(batch, size)  # (N, H, W), empty where a sample has none; or None
        shown_wrong = wrong[probe]

        out: dict[str, Any] = {
            "all_positions": positions,
            "positions": where[probe_cpu].tolist(),
            "index": (batch["index"] if "index" in batch else where)[probe_cpu].tolist(),
            "label": labels[probe].tolist(),
            "prediction": predictions[probe].tolist(),
            "probability": probabilities[probe].gather(1, predictions[probe, None]).squeeze(1).tolist(),
            "image": _to_uint8(images01),
            "maps": {},
            "overlay": {},
            "overlay_predicted": {},
            "perturbation": {},
            "localisation": {},
        }
        for method in true_maps:
            if method != _RANDOM and probe.any():
                out["maps"][method] = true_maps[method][probe].cpu()
                out["overlay"][method] = list(overlay(images01, heatmap(true_maps[method][probe], size)))
                out["overlay_predicted"][method] = {}
                if shown_wrong.any():
                    tiles = overlay(images01[shown_wrong], heatmap(predicted_maps[method][probe][shown_wrong], size))
                    out["overlay_predicted"][method] = dict(zip(shown_wrong.nonzero().flatten().tolist(), tiles))
            if perturbed.any():
                with trainer.precision_plugin.forward_context():  # the trainer's autocast (bf16-mixed...), as in validation
                    result = perturbation_auc(
                        pl_module,
                        images[perturbed],
                        predicted_maps[method][perturbed],
                        labels[perturbed],
                        mean=mean,
                        std=std,
                        targets=predictions[perturbed],
                        batch_size=self.perturbation_batch_size,
                    )
                out["perturbation"][method] = (int(perturbed.sum()), result.as_dict())
            if objects is not None:
                maps = heatmap(predicted_maps[method], size)
                out["localisation"][method] = {
                    "pointing_game": pointing_game(maps, objects).cpu(),
                    "relevance_on_object": relevance_on_object(maps, objects).cpu(),
                }
        return out

    # ------------------------------------------------------------------ logging (global rank 0)
    def _log(self, trainer: Trainer, pl_module: LightningModule, merged: dict[str, Any]) -> None:
        scalars: dict[str, float] = {}
        for method, values in merged["perturbation"].items():
            for key in _AUC_KEYS:
                scalars[f"explain/{method}/{key}"] = float(getattr(values, key))
        scalars.update(merged["localisation"])
        drift = self._drift(merged)
        for method, per_sample in drift.items():
            finite = [v for v in per_sample if np.isfinite(v)]
            if finite:
                scalars[f"explain/{method}/drift"] = float(np.mean(finite))
        epoch, step = trainer.current_epoch, trainer.global_step
        from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

        loggers = list(trainer.loggers)
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                logger.log_metrics(self._wandb_payload(merged, scalars, drift, epoch), step=step)
            elif isinstance(logger, TensorBoardLogger):
                self._log_tensorboard(logger, merged, scalars, step)
            else:
                logger.log_metrics(scalars, step=step)
                if isinstance(logger, CSVLogger):
                    self._write_pngs(Path(logger.log_dir) / "explain" / f"epoch={epoch:03d}", merged)
        if not loggers:
            self._write_pngs(Path(trainer.default_root_dir) / "explain" / f"epoch={epoch:03d}", merged)

    def _drift(self, merged: dict[str, Any]) -> dict[str, list[float]]:
        """Per method and probe sample: correlation of its map with the previous one (NaN if none)."""
        drift = {}
        for method, maps in merged["maps"].items():
            previous = self._previous_maps.get(method, {})
            current = {}
            values = []
            for index, m in zip(merged["index"], maps):
                current[index] = m
                values.append(_correlation(previous[index], m) if index in previous else float("nan"))
            self._previous_maps[method] = current  # only the last epoch's maps are kept
            drift[method] = values
        return drift

    def _caption(self, merged: dict[str, Any], i: int, method: str, *, both: bool = True) -> str:
        label, prediction = merged["label"][i], merged["prediction"][i]
        caption = (
            f"#{merged['index'][i]} true: {self._name(label)} | predicted: {self._name(prediction)}"
            f" ({merged['probability'][i]:.2f})"
        )
        if both and i in merged["overlay_predicted"].get(method, {}):
            caption += f" | left: map of {self._name(label)}, right: map of {self._name(prediction)}"
        return caption

    def _name(self, label: int) -> str:
        names = self.class_names
        return names[label] if names and 0 <= label < len(names) else str(label)

    def _panels(self, merged: dict[str, Any], method: str) -> list[np.ndarray]:
        """One picture per probe sample: the true class's overlay, beside the predicted one's if they differ."""
        panels = []
        for i, true_overlay in enumerate(merged["overlay"][method]):
            other = merged["overlay_predicted"][method].get(i)
            panels.append(true_overlay if other is None else side_by_side([true_overlay, other]))
        return panels

    def _sheet(self, merged: dict[str, Any], method: str) -> np.ndarray:
        """All probe samples of one method in one captioned picture (TensorBoard, PNG files)."""
        tiles = []
        for i, panel in enumerate(self._panels(merged, method)):
            text = f"{self._name(merged['label'][i])} -> {self._name(merged['prediction'][i])} {merged['probability'][i]:.2f}"
            tiles.append(caption(panel, text))
        return contact_sheet(tiles)

    def _wandb_payload(self, merged, scalars, drift, epoch) -> dict[str, Any]:
        import wandb

        payload: dict[str, Any] = dict(scalars)
        payload["epoch"] = epoch
        for method in merged["overlay"]:  # same-size images per key, as the W&B UI wants
            payload[f"explain/{method}/maps"] = [
                wandb.Image(tile, caption=self._caption(merged, i, method, both=False))
                for i, tile in enumerate(merged["overlay"][method])
            ]
            predicted = merged["overlay_predicted"][method]
            if predicted:
                payload[f"explain/{method}/maps_predicted"] = [
                    wandb.Image(tile, caption=self._caption(merged, i, method, both=False) + f" | map of the predicted class")
                    for i, tile in sorted(predicted.items())
                ]
        if merged["perturbation"]:
            ys, keys = [], []
            for method, values in merged["perturbation"].items():
                for test, name in (("pos", "positive"), ("neg", "negative")):
                    ys.append(list(getattr(values, f"{test}_accuracy")))
                    keys.append(f"{method} {name}")
            payload["explain/perturbation_curves"] = wandb.plot.line_series(
                xs=list(values.fractions),
                ys=ys,
                keys=keys,
                title=f"Perturbation test, epoch {epoch}: accuracy vs fraction of pixels removed",
                xname="fraction removed",
            )
        if self.log_table and merged["overlay"]:
            payload["explain/table"] = self._table_rows(merged, drift, epoch)
        return payload

    def _table_rows(self, merged, drift, epoch):
        import wandb

        methods = list(merged["overlay"])
        columns = ["epoch", "sample_id", "image", *methods, "label", "prediction", "probability"]
        located = {k: v for k, v in merged["localisation_per_sample"].items() if k.split("/")[0] in methods}
        scores = [f"{m}/drift" for m in methods] + list(located)
        columns += scores
        if self._table is None or list(self._table.columns) != columns:
            self._table = wandb.Table(columns=columns, log_mode="INCREMENTAL")
        panels = {m: self._panels(merged, m) for m in methods}
        for i, index in enumerate(merged["index"]):
            self._table.add_data(
                epoch,
                int(index),
                wandb.Image(merged["image"][i]),
                *[wandb.Image(panels[m][i], caption=self._caption(merged, i, m)) for m in methods],
                self._name(merged["label"][i]),
                self._name(merged["prediction"][i]),
                float(merged["probability"][i]),
                *[float(drift[m][i]) for m in methods],
                *[float(v[i]) for v in located.values()],
            )
        return self._table

    def _log_tensorboard(self, logger, merged, scalars, step) -> None:
        for method in merged["overlay"]:
            logger.experiment.add_image(f"explain/{method}/maps", self._sheet(merged, method), global_step=step, dataformats="HWC")
        if merged["perturbation"]:
            curves = figure_to_array(plot_perturbation_curves(merged["perturbation"]))
            logger.experiment.add_image("explain/perturbation_curves", curves, global_step=step, dataformats="HWC")
        logger.log_metrics(scalars, step=step)

    def _write_pngs(self, folder: Path, merged: dict[str, Any]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for method in merged["overlay"]:
            save_png(self._sheet(merged, method), folder / f"{method}.png")
        if merged["perturbation"]:
            plot_perturbation_curves(merged["perturbation"], folder / "perturbation_curves.png")


# ---------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _untouched(module: torch.nn.Module) -> Iterator[None]:
    """Restore the module's modes, gradient flags and gradients, attention settings and all RNG states."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None, np.random.get_state(), random.getstate())
    modes = [(m, m.training) for m in module.modules()]
    fused = [(m, m.fused_attn) for m in module.modules() if hasattr(m, "fused_attn")]
    params = [(p, p.requires_grad, p.grad) for p in module.parameters()]
    try:
        yield
    finally:
        torch.set_rng_state(rng[0])
        if cuda:
            torch.cuda.set_rng_state_all(rng[1])
        np.random.set_state(rng[2])
        random.setstate(rng[3])
        for m, training in modes:
            m.training = training
        for m, flag in fused:
            m.fused_attn = flag
        for p, requires_grad, grad in params:
            p.requires_grad_(requires_grad)
            p.grad = grad


def _validation_dataset(trainer: Trainer, *, required: bool):
    datamodule = getattr(trainer, "datamodule", None)
    dataset = getattr(datamodule, "val_dataset", None)
    if dataset is None:
        loaders = trainer.val_dataloaders
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        dataset = getattr(loaders, "dataset", None)
    if dataset is None and required:
        raise RuntimeError(
            "ExplanationCallback needs a validation dataset: trainer.datamodule.val_dataset or a val dataloader"
        )
    return dataset


def _normalisation(trainer: Trainer, pl_module: LightningModule):
    for source in (getattr(pl_module, "hparams", {}), vars(trainer.datamodule) if trainer.datamodule else {}):
        mean, std = source.get("mean"), source.get("std")
        if mean is not None and std is not None:
            return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    for source in (pl_module, trainer.datamodule):
        mean, std = getattr(source, "mean", None), getattr(source, "std", None)
        if mean is not None and std is not None and not callable(mean):
            return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    raise ValueError(
        f"ExplanationCallback: {type(pl_module).__name__}.hparams has no 'mean'/'std' (nor has the datamodule);"
        " they are needed to undo the normalisation"
    )


def _object_masks(batch: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor | None:
    """Object masks of the batch (from ``mask``, else from ``box``); samples without one get an empty mask."""
    if "mask" in batch:
        masks = batch["mask"].float()
        valid = batch.get("has_mask")
    elif "box" in batch:
        masks = boxes_to_masks(batch["box"], size)
        valid = batch.get("has_box")
    else:
        return None
    if tuple(masks.shape[-2:]) != tuple(size):
        raise ValueError(f"ExplanationCallback: object masks are {tuple(masks.shape[-2:])} but images are {size}")
    if valid is not None:
        masks = masks * valid.view(-1, 1, 1).to(masks)
    return masks  # an empty mask gives NaN scores, left out of the means


def _to_uint8(images01: torch.Tensor) -> list[np.ndarray]:
    return list((images01 * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    denominator = a.norm() * b.norm()
    return float((a @ b) / denominator) if denominator > 0 else float("nan")


def _all_gather_object(trainer: Trainer, value):
    """``[value of rank 0, value of rank 1, ...]``; every rank must call it."""
    if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, value)
        return gathered
    return [value]


def _merge(shards: list[dict[str, Any] | None]) -> dict[str, Any]:
    """The ranks' results as one: probe samples in probe order, perturbation curves weighted by image count."""
    shards = [s for s in shards if s is not None]
    merged: dict[str, Any] = {"overlay": {}, "overlay_predicted": {}, "maps": {}, "perturbation": {}}
    order = sorted((p, r, i) for r, s in enumerate(shards) for i, p in enumerate(s["positions"]))
    for key in ("positions", "index", "label", "prediction", "probability", "image"):
        merged[key] = [shards[r][key][i] for _, r, i in order]
    methods = list(shards[0]["overlay"]) if shards else []
    for method in methods:
        merged["overlay"][method] = [shards[r]["overlay"][method][i] for _, r, i in order]
        merged["maps"][method] = [shards[r]["maps"][method][i] for _, r, i in order]
        merged["overlay_predicted"][method] = {
            k: shards[r]["overlay_predicted"][method][i]
            for k, (_, r, i) in enumerate(order)
            if i in shards[r]["overlay_predicted"][method]
        }
    for method in shards[0]["perturbation"] if shards else []:
        parts = [s["perturbation"][method] for s in shards if method in s["perturbation"]]
        total = sum(n for n, _ in parts)
        values = {}
        for key in (*_CURVE_KEYS, *_AUC_KEYS):  # the AUC is linear in the curve: weighted means are exact
            mean = np.sum([np.asarray(v[key], dtype=np.float64) * n for n, v in parts], axis=0) / total
            values[key] = mean.tolist() if mean.ndim else float(mean)
        merged["perturbation"][method] = PerturbationResult(fractions=tuple(parts[0][1]["fractions"]), **values)
    # localisation: per explained image; probe rows for the table, means over all explained images
    merged["localisation"] = {}
    merged["localisation_per_sample"] = {}
    everything = sorted((p, r, i) for r, s in enumerate(shards) for i, p in enumerate(s["all_positions"]))
    for method in shards[0]["localisation"] if shards else []:
        for score in shards[0]["localisation"][method]:
            values = np.array([float(shards[r]["localisation"][method][score][i]) for _, r, i in everything])
            by_position = dict(zip((p for p, _, _ in everything), values))
            merged["localisation_per_sample"][f"{method}/{score}"] = [by_position[p] for p in merged["positions"]]
            if np.isfinite(values).any():
                merged["localisation"][f"explain/{method}/{score}"] = float(np.nanmean(values))
    return merged
