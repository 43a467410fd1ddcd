"""ExplanationCallback: every validation epoch, what the model looks at, how faithfully, and
whether it has learned a shortcut.

At the end of a validation epoch (every ``every_n_epochs``) the callback explains a fixed,
class-stratified set of validation images with each method: the probe set (shown), the
perturbation set (the paper's perturbation test), and the shortcut set (maps only, for the
shortcut signals); it scores localisation when the data has masks or boxes, measures how much
the maps moved since the last time, judges the shortcut signals with hysteresis and raises an
alarm when they cross the thresholds. The pieces: :mod:`vitlens.callbacks.result` computes one
rank's share into a typed result and merges the ranks', :mod:`vitlens.metrics.shortcut` holds
the signals and the alarm, :mod:`vitlens.callbacks.backends` has one back-end per logger (W&B,
TensorBoard, CSV, none: PNGs under ``trainer.default_root_dir``).

It never hurts the training run: an error switches the callback off with one warning
(``strict=True`` re-raises), and the model's mode, gradients, attention settings and every
random-number state are as before, so training is bit-identical with and without it (unless
``on_shortcut="stop"`` and the alarm fires). Under DDP the work is sharded across ranks,
gathered, and logged by global rank 0 (one alarm, from rank 0); every rank reaches every
collective call, also after a failure on one of them. Its state (probe set, the previous maps
behind drift, the alarm's hysteresis and history) is in the checkpoint: a resumed run goes on.

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
- ``shortcut/<method>/<class>/position_ratio`` (and ``peak_mass``), ``shortcut/<method>/position_ratio_max``:
  position consistency of each class's predicted-class maps over all explained images (their
  mean map's peak mass over the random control's, :mod:`vitlens.metrics.shortcut`);
  with masks or boxes also ``object_share``/``object_ratio`` (per class and overall,
  ``object_ratio_min``). ``shortcut/<method>/class_mean_maps``: the per-class mean maps (images).
- ``shortcut/<class>/recognition``: how well the model tells the class apart on the explained
  images (chance-corrected, :func:`vitlens.metrics.shortcut.class_recognition`); classes below
  ``min_recognition`` are not judged that epoch (an info line names them, the end-of-fit summary too).
- When the alarm fires: a W&B alert (``run.alert``), the run summary's ``shortcut/...`` keys and
  the ``shortcut/alarms`` table; ``shortcut_alarms.csv`` for CSV / no logger; text on
  TensorBoard; always a one-line :class:`ShortcutWarning` naming the classes, method and region,
  and a summary at the end of fitting.
"""
from __future__ import annotations

import contextlib
import random
import traceback
import warnings
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import default_collate

from vitlens.callbacks.backends import Backend, FilesBackend, backend_for
from vitlens.callbacks.probe import dataset_class_names, dataset_labels, stratified_order
from vitlens.callbacks.result import RANDOM, EpochResult, compute_shard, correlation, merge, signals_of
from vitlens.metrics.shortcut import ShortcutAlarm, ShortcutThresholds, class_recognition
from vitlens.relevance import METHODS, PRECISIONS, explain_many
from vitlens.relevance.heatmap import SIGNED
from vitlens.relevance.registry import with_options

__all__ = ["ExplanationCallback", "ShortcutWarning"]

ON_SHORTCUT = ("warn", "stop")


class ShortcutWarning(UserWarning):
    """The shortcut alarm fired: relevance of a class piles up in one place or left the object."""


class ExplanationCallback(Callback):
    """Relevance maps, faithfulness and shortcut signals of fixed validation samples, every validation epoch.

    Args:
        methods: relevance methods to show and score (names from ``vitlens.relevance.METHODS``).
        method_options: options per method, e.g. ``{"transformer_attribution": {"start_layer": 0}}``
            (``python explain.py methods`` lists them; ``random`` takes ``seed``).
        num_samples: size of the probe set shown every epoch (stratified by class, seeded).
        every_n_epochs: run at the end of every n-th validation epoch (never in the sanity check).
        perturbation_samples: validation images in the perturbation test (0 switches it off).
        shortcut_samples: validation images whose maps feed the shortcut signals (stratified:
            ``shortcut_samples / num_classes`` per class; the probe and perturbation images are
            among them). Maps only: about one relevance pass per image.
        batch_size: images per ``explain_many`` call (bounds memory of the relevance pass).
        perturbation_batch_size: perturbed images per model call in the perturbation test.
        precision: ``explain``'s precision, one of ``vitlens.relevance.PRECISIONS`` (float64,
            float32, tf32, bf16) or None: the model's dtype, in full float32 for a float32 model
            even when the trainer enables TF32; ``"bf16"`` is fastest on GPUs and stays within
            1e-2 of float64 for transformer_attribution.
        include_random: also score the ``random`` control, the chance level of every metric
            (and of the shortcut signals; without it their chance level is the uniform map's).
        shortcut_alarm: judge the shortcut signals and raise alarms (False: signals are still logged).
        shortcut_thresholds: overrides of :class:`vitlens.metrics.shortcut.ShortcutThresholds`
            (``position_fire``, ``position_clear``, ``object_fire``, ``object_clear``,
            ``min_images``, ``min_recognition``, ``patience``, ``warmup_epochs``).
        on_shortcut: ``"warn"`` (default: alert and warn, training goes on) or ``"stop"``
            (also stop training at the end of the epoch the alarm fires).
        strict: re-raise errors instead of warning and switching off (for tests).
        log_table: log the W&B table ``explain/table`` (one row per epoch and probe sample).
        seed: seed of the probe-set selection.
        signed: how maps with negative values (the LRP family) are shown and enter pointing game
            and relevance on object: ``"positive"`` (their positive part, the default),
            ``"absolute"`` or ``"raw"`` (plain min-max). The rule of ``explain.py evaluate
            --signed`` (:func:`vitlens.metrics.localization`): the same map gets the same score in
            both. Non-negative maps (transformer_attribution, grad_rollout) score the same under all three.
    """

    def __init__(
        self,
        methods: Sequence[str] = ("transformer_attribution", "grad_rollout"),
        num_samples: int = 8,
        every_n_epochs: int = 1,
        perturbation_samples: int = 8,
        shortcut_samples: int = 64,
        batch_size: int = 64,
        perturbation_batch_size: int = 128,
        precision: str | None = None,
        include_random: bool = True,
        shortcut_alarm: bool = True,
        shortcut_thresholds: dict[str, float] | None = None,
        on_shortcut: str = "warn",
        strict: bool = False,
        log_table: bool = True,
        seed: int = 0,
        signed: str = "positive",
        method_options: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(methods, str):
            methods = (methods,)
        methods = tuple(methods)
        for method in methods:
            if method not in METHODS:
                raise ValueError(f"ExplanationCallback: unknown method {method!r}; choose from {', '.join(METHODS)}")
        try:
            with_options(dict.fromkeys((*methods, RANDOM)), method_options)
        except (TypeError, ValueError) as error:
            raise ValueError(f"ExplanationCallback: method_options: {error}") from None
        self.method_options = {m: dict(o) for m, o in (method_options or {}).items()}
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"ExplanationCallback: precision must be None or one of {', '.join(PRECISIONS)}, got {precision!r}")
        if signed not in SIGNED:
            raise ValueError(f"ExplanationCallback: signed must be one of {', '.join(SIGNED)}, got {signed!r}")
        if on_shortcut not in ON_SHORTCUT:
            raise ValueError(f"ExplanationCallback: on_shortcut must be one of {', '.join(ON_SHORTCUT)}, got {on_shortcut!r}")
        for name, value, low in (
            ("num_samples", num_samples, 0),
            ("every_n_epochs", every_n_epochs, 1),
            ("perturbation_samples", perturbation_samples, 0),
            ("shortcut_samples", shortcut_samples, 0),
            ("batch_size", batch_size, 1),
            ("perturbation_batch_size", perturbation_batch_size, 1),
        ):
            if int(value) != value or value < low:
                raise ValueError(f"ExplanationCallback: {name} must be an integer >= {low}, got {value!r}")
        try:
            thresholds = ShortcutThresholds.from_options(shortcut_thresholds)
        except (TypeError, ValueError) as error:
            raise ValueError(f"ExplanationCallback: {error}") from None
        self.methods = tuple(m for m in methods if m != RANDOM)
        self.num_samples = int(num_samples)
        self.every_n_epochs = int(every_n_epochs)
        self.perturbation_samples = int(perturbation_samples)
        self.shortcut_samples = int(shortcut_samples)
        self.batch_size = int(batch_size)
        self.perturbation_batch_size = int(perturbation_batch_size)
        self.precision = precision
        self.include_random = bool(include_random or RANDOM in methods)
        self.shortcut_alarm = bool(shortcut_alarm)
        self.on_shortcut = on_shortcut
        self.strict = bool(strict)
        self.log_table = bool(log_table)
        self.seed = int(seed)
        self.signed = signed

        self.enabled = True
        self.sample_indices: list[int] | None = None  # dataset indices, probe set first
        self.class_names: list[str] | None = None
        self.alarm = ShortcutAlarm(thresholds)
        self.last_result: EpochResult | None = None
        self._dataset_size: int | None = None
        self._pending_error: tuple[BaseException, str] | None = None
        self._cache: tuple[tuple[int, ...], dict[str, torch.Tensor]] | None = None
        self._previous_maps: dict[str, dict[int, torch.Tensor]] = {}
        self._previous_epoch: int | None = None
        self._backends: dict[int, Backend] = {}
        self._stop = False

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        """One checkpoint entry per set of methods, so that two callbacks (say, one for
        transformer_attribution every epoch, one for full_lrp every 5) keep their own state.
        The seed is not part of it: a resume keeps the checkpoint's probe set."""
        if self.method_options:  # two callbacks with other options keep their own state
            return self._generate_state_key(methods=self.methods, method_options=self.method_options)
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
            # drift and the alarm go on after a resume
            "previous_maps": {m: {int(i): t.clone() for i, t in maps.items()} for m, maps in self._previous_maps.items()},
            "previous_epoch": self._previous_epoch,
            "alarm": self.alarm.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        indices = state_dict.get("sample_indices")
        self.sample_indices = None if indices is None else [int(i) for i in indices]
        self.class_names = state_dict.get("class_names")
        self._dataset_size = state_dict.get("dataset_size")
        self._previous_maps = {m: {int(i): t for i, t in maps.items()}
                               for m, maps in (state_dict.get("previous_maps") or {}).items()}
        self._previous_epoch = state_dict.get("previous_epoch")
        if state_dict.get("alarm"):
            self.alarm.load_state_dict(state_dict["alarm"])
        self._cache = None

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stop = False
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
            stop = False
            if trainer.is_global_zero:
                try:
                    result = merge(shards, epoch=trainer.current_epoch, step=trainer.global_step,
                                   class_names=self.class_names)
                    stop = self._judge_and_log(trainer, pl_module, result)
                except Exception as error:
                    failure = (error, traceback.format_exc())
            if not self._all_ranks_ok(trainer, failure, "logging"):
                return
            if self.on_shortcut == "stop" and _all_gather_object(trainer, stop)[0]:  # rank 0 decides, all stop
                trainer.should_stop = True
                self._stop = True

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or not self.shortcut_alarm or not self.alarm.history:
            return
        summary = self.alarm.summary()
        if self.alarm.fired:
            warnings.warn(summary + (" (training stopped: on_shortcut=stop)" if self._stop else ""),
                          ShortcutWarning, stacklevel=2)
        else:
            rank_zero_info(summary)
        for backend in self._backends.values():
            try:
                backend.finish(self.alarm)
            except Exception as error:  # the run is over: report, never raise
                if self.strict:
                    raise
                warnings.warn(f"ExplanationCallback: could not write the shortcut summary: {error}", RuntimeWarning,
                              stacklevel=2)

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
    def _count(self) -> int:
        return max(self.num_samples, self.perturbation_samples, self.shortcut_samples)

    def _select(self, trainer: Trainer, pl_module: LightningModule, dataset) -> None:
        size = len(dataset)
        names = dataset_class_names(dataset, trainer.datamodule, pl_module)
        count = self._count()
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
        methods = self.methods + ((RANDOM,) if self.include_random else ())
        requested = with_options(methods, {m: o for m, o in self.method_options.items() if m in methods})
        maps: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
        logits = []
        for i in range(0, len(images), self.batch_size):
            out = explain_many(
                pl_module,
                images[i : i + self.batch_size],
                requested,
                None if targets is None else targets[i : i + self.batch_size],
                precision=self.precision,
            )
            for method in methods:
                maps[method].append(out.maps[method].detach().float())
            logits.append(out.logits.detach().float())
        return {m: torch.cat(v) for m, v in maps.items()}, torch.cat(logits)

    def _compute(self, trainer: Trainer, pl_module: LightningModule):
        positions = self._shard(trainer)
        if not positions:
            return None
        mean, std = _normalisation(trainer, pl_module)
        with torch.inference_mode(False):
            pl_module.eval()
            return compute_shard(
                pl_module, self._load(trainer, positions), positions,
                explain=lambda images, targets: self._explain(pl_module, images, targets),
                num_samples=self.num_samples, perturbation_samples=self.perturbation_samples, mean=mean, std=std,
                perturbation_batch_size=self.perturbation_batch_size,
                forward_context=trainer.precision_plugin.forward_context, signed=self.signed,
            )

    # ------------------------------------------------------------------ judging and logging (global rank 0)
    def _judge_and_log(self, trainer: Trainer, pl_module: LightningModule, result: EpochResult) -> bool:
        """Drift, shortcut signals, alarm; then every back-end. Returns whether to stop (on_shortcut=stop)."""
        result.drift = self._drift(result)
        num_classes = len(self.class_names) if self.class_names else int(getattr(pl_module, "num_classes", 0) or 0)
        num_classes = max(num_classes, int(result.labels.max()) + 1 if len(result.labels) else 0)
        result.signals = signals_of(result, num_classes)
        result.recognition = class_recognition(result.labels, result.predictions, num_classes)
        if self.shortcut_alarm:
            result.events = self.alarm.update(result.epoch, result.signals, result.class_labels(), result.image_size,
                                              recognition=result.recognition)
            if self.alarm.not_judged:
                rank_zero_info(self.alarm.not_judged_message(result.epoch))
        self.last_result = result
        scalars = result.scalars()
        backends = self._active_backends(trainer)
        if result.events:
            for event in result.events:
                warnings.warn(event.message(), ShortcutWarning, stacklevel=2)
            for backend in backends:
                backend.alarm(result.events, result)
        for backend in backends:
            backend.log(result, scalars)
        return any(e.kind == "fired" for e in result.events)

    def _active_backends(self, trainer: Trainer) -> list[Backend]:
        loggers = list(trainer.loggers)
        if not loggers:
            key = -1
            if key not in self._backends:
                self._backends[key] = FilesBackend(trainer.default_root_dir)
            return [self._backends[key]]
        out = []
        for logger in loggers:
            if id(logger) not in self._backends:
                self._backends[id(logger)] = backend_for(logger, log_table=self.log_table)
            out.append(self._backends[id(logger)])
        return out

    def _drift(self, result: EpochResult) -> dict[str, list[float]]:
        """Per method and probe sample: correlation of its map with the previous one (NaN if none)."""
        drift = {}
        for method, maps in result.maps.items():
            previous = self._previous_maps.get(method, {})
            current = {}
            values = []
            for index, m in zip(result.index, maps):
                current[int(index)] = m
                values.append(correlation(previous[index], m) if index in previous else float("nan"))
            self._previous_maps[method] = current  # only the last epoch's maps are kept
            drift[method] = values
        self._previous_epoch = result.epoch
        return drift


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


def _all_gather_object(trainer: Trainer, value):
    """``[value of rank 0, value of rank 1, ...]``; every rank must call it."""
    if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, value)
        return gathered
    return [value]
