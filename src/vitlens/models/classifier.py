"""ViTClassifier: a timm Vision Transformer fine-tuned with Lightning."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from vitlens.data.normalization import backbone_normalization
from vitlens.models.backbone import create_backbone
from vitlens.models.mixup import Mixup
from vitlens.models.optim import param_groups_layer_decay, warmup_cosine
from vitlens.models.weights import CheckpointClassMismatchError, class_mismatch_message, load_backbone_weights


def _resolve_class_names(class_names: Sequence[str] | None, num_classes: int | None) -> list[str]:
    if class_names is None:
        if num_classes is None:
            raise ValueError("ViTClassifier needs class_names (or num_classes)")
        return [str(i) for i in range(num_classes)]
    names = [str(c) for c in class_names]
    if num_classes is not None and num_classes != len(names):
        raise ValueError(f"ViTClassifier got num_classes={num_classes} but {len(names)} class_names")
    if len(set(names)) != len(names):
        raise ValueError(f"ViTClassifier class_names has duplicates: {sorted({c for c in names if names.count(c) > 1})}")
    return names


class ViTClassifier(L.LightningModule):
    """Image classification with a timm ViT / DeiT / MAE / DINOv2 / CLIP / SigLIP / EVA-02 / Swin backbone.

    Args:
        backbone: timm model name (`vit_*`, `deit_*`, `deit3_*`, `eva02_*`, `swin_*`, with tags
            such as `.mae`); see the supported-models table in the README.
        class_names: the dataset's classes (linked from the data module by train.py).
        num_classes: only needed without class_names.
        img_size: input size the backbone is built for (position embeddings are resized to it).
        backbone_kwargs: any other timm keyword (patch_size, embed_dim, depth, num_heads,
            drop_path_rate, global_pool, reg_tokens, ...).
        weights: initial weights, loaded when fitting starts (not when resuming or
            rebuilding from a checkpoint): None (from scratch), "timm" (timm's hub), or a
            file (timm state dict, MAE checkpoint, vitlens .ckpt). See `vitlens.models.weights`.
        reset_head: fine-tune a vitlens checkpoint given as `weights` on other classes.
        mean, std: input normalisation; the backbone's own (timm config) unless given.
        lr: peak learning rate (of the head; layer k of K+1 gets lr * layer_decay**(K-k), the layers being those of timm's group_matcher for the family).
        weight_decay: AdamW weight decay (none on biases, norms, position embedding, tokens).
        layer_decay: layer-wise lr decay (0.65 for ViT-B in the MAE recipe; 1 = off).
        betas: AdamW betas.
        warmup_epochs: linear warmup length (fractions allowed), then cosine per step.
        min_lr: the cosine's floor.
        label_smoothing: cross-entropy label smoothing (also applied to mixed targets).
        mixup_alpha, cutmix_alpha, mixup_prob, mixup_switch_prob: batch mixup / cutmix.
        log_per_class_accuracy: log `val/acc_class/<name>` for each class.
    """

    def __init__(
        self,
        backbone: str = "vit_small_patch16_224",
        class_names: list[str] | None = None,
        num_classes: int | None = None,
        img_size: int | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        weights: str | None = None,
        reset_head: bool = False,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        layer_decay: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 0.0,
        min_lr: float = 0.0,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        log_per_class_accuracy: bool = True,
    ) -> None:
        super().__init__()
        names = _resolve_class_names(class_names, num_classes)
        default_mean, default_std = backbone_normalization(backbone)
        # the backbone's own mean/std is recorded as None in the initial hparams (what loggers
        # get, and what Lightning compares with the data module's `mean=None`); `hparams` holds
        # the resolved values either way
        if mean is not None and tuple(float(v) for v in mean) == tuple(default_mean):
            mean = None
        if std is not None and tuple(float(v) for v in std) == tuple(default_std):
            std = None
        kwargs = dict(backbone_kwargs or {})
        if img_size is not None:
            kwargs["img_size"] = img_size
        self.model = create_backbone(backbone, len(names), **kwargs)
        grid_img = tuple(self.model.patch_embed.img_size)
        self.save_hyperparameters()
        # LightningCLI records the raw arguments it was given, not the locals above: with
        # `validate --ckpt_path` it passes the checkpoint's resolved mean/std, and Lightning
        # then refused to log (the data module says None). Record the normalised values.
        for key, value in (("mean", mean), ("std", std)):
            if key in self._hparams_initial:
                self._hparams_initial[key] = value
        # resolved values, so a checkpoint rebuilds the same model without data
        self.hparams["class_names"] = names
        self.hparams["num_classes"] = len(names)
        self.hparams["img_size"] = grid_img[0] if grid_img[0] == grid_img[1] else list(grid_img)
        self.hparams["mean"] = tuple(float(v) for v in (mean if mean is not None else default_mean))
        self.hparams["std"] = tuple(float(v) for v in (std if std is not None else default_std))
        self.class_names: list[str] = names
        self.mixup = Mixup(len(names), mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=mixup_prob,
                           switch_prob=mixup_switch_prob, label_smoothing=label_smoothing,
                           seed=torch.initial_seed() % 2**32)
        n = len(names)
        self.metrics = torch.nn.ModuleDict({
            stage: torch.nn.ModuleDict({
                "acc": MulticlassAccuracy(n, average="micro"),
                "acc_top5": MulticlassAccuracy(n, top_k=min(5, n), average="micro"),
                "acc_per_class": MulticlassAccuracy(n, average=None),
                "confusion": MulticlassConfusionMatrix(n),
            })
            for stage in ("val", "test")
        })
        self._initial_weights_loaded = weights is None

    # ------------------------------------------------------------------ properties
    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.hparams["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.hparams["std"])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # ------------------------------------------------------------------ weights
    def load_initial_weights(self) -> None:
        """Load `weights` into the backbone now (done automatically when fitting starts)."""
        if self.hparams["weights"] is not None:
            load_backbone_weights(self.model, self.hparams["weights"], backbone=self.hparams["backbone"],
                                  class_names=self.class_names, reset_head=self.hparams["reset_head"])
        self._initial_weights_loaded = True

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(dm, "class_names", None)
        if data_classes is not None and list(data_classes) != self.class_names:
            raise CheckpointClassMismatchError(class_mismatch_message("the model (class_names)", self.class_names, data_classes))
        if stage == "fit" and not self._initial_weights_loaded and self.trainer.ckpt_path is None:
            self.load_initial_weights()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        ck_classes = (checkpoint.get("hyper_parameters") or {}).get("class_names")
        if ck_classes is not None and list(ck_classes) != self.class_names:
            where = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
            raise CheckpointClassMismatchError(class_mismatch_message(f"checkpoint {where or ''}".strip(), ck_classes, self.class_names))
        self._initial_weights_loaded = True

    # ------------------------------------------------------------------ steps
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def on_train_epoch_start(self) -> None:
        self.mixup.set_epoch(self.current_epoch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch["image"], batch["label"]
        if self.mixup.enabled:
            images, targets = self.mixup(images, labels)
            logits = self(images)
            loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        else:
            logits = self(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.hparams["label_smoothing"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        return loss

    def _eval_step(self, stage: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        images, labels = batch["image"], batch["label"]
        logits = self(images).float()
        loss = F.cross_entropy(logits, labels)
        metrics = self.metrics[stage]
        for name in ("acc", "acc_top5"):
            metrics[name](logits, labels)
            self.log(f"{stage}/{name}", metrics[name], prog_bar=name == "acc", batch_size=len(labels))
        metrics["acc_per_class"].update(logits, labels)
        metrics["confusion"].update(logits, labels)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True, batch_size=len(labels))
        return logits

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._eval_step("val", batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._eval_step("test", batch)

    def on_validation_epoch_end(self) -> None:
        self._end_eval_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._end_eval_epoch("test")

    def _end_eval_epoch(self, stage: str) -> None:
        metrics = self.metrics[stage]
        per_class = metrics["acc_per_class"].compute()
        confusion = metrics["confusion"].compute()
        metrics["acc_per_class"].reset()
        metrics["confusion"].reset()
        if self.trainer.sanity_checking:
            return
        if self.hparams["log_per_class_accuracy"]:
            for name, value in zip(self.class_names, per_class):
                self.log(f"{stage}/acc_class/{name}", value)
        if self.trainer.is_global_zero:
            self._log_confusion_matrix(stage, confusion)

    def _log_confusion_matrix(self, stage: str, confusion: torch.Tensor) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        from vitlens.models.confusion import confusion_matrix_image

        key = f"{stage}/confusion_matrix"
        image = confusion_matrix_image(confusion, self.class_names,
                                       title=f"{stage} epoch {self.current_epoch} step {self.global_step}")
        logged = False
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=key, images=[image], step=self.global_step)
                logged = True
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(key, image, self.global_step, dataformats="HWC")
                logged = True
        if not logged:
            from PIL import Image

            log_dir = next((lg.log_dir for lg in self.loggers if getattr(lg, "log_dir", None)), None)
            out = Path(log_dir or self.trainer.default_root_dir) / "confusion_matrix"
            out.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(out / f"{stage}_epoch{self.current_epoch:03d}_step{self.global_step:06d}.png")

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        hp = self.hparams
        groups = param_groups_layer_decay(self.model, lr=hp["lr"], weight_decay=hp["weight_decay"],
                                          layer_decay=hp["layer_decay"])
        optimizer = torch.optim.AdamW(groups, lr=hp["lr"], betas=tuple(hp["betas"]))
        total_steps = int(self.trainer.estimated_stepping_batches)
        batches = self.trainer.num_training_batches
        if not math.isfinite(batches):
            batches = total_steps
        steps_per_epoch = max(1, math.ceil(batches / self.trainer.accumulate_grad_batches))
        warmup_steps = int(round(hp["warmup_epochs"] * steps_per_epoch))
        min_ratio = hp["min_lr"] / hp["lr"] if hp["lr"] > 0 else 0.0

        def multiplier(step: int) -> float:
            return warmup_cosine(step, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=min_ratio)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def load_classifier(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> ViTClassifier:
    """A ViTClassifier rebuilt from a checkpoint of this project, in eval mode.

    Raises a one-line error naming the file when it is missing, unreadable or not ours.
    """
    from vitlens.models.weights import read_checkpoint_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = read_checkpoint_file(path)
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict) or "backbone" not in hparams or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a vitlens checkpoint (no ViTClassifier hyper-parameters and state_dict)")
    known = set(ViTClassifier.__init__.__code__.co_varnames[1:ViTClassifier.__init__.__code__.co_argcount])
    model = ViTClassifier(**{k: v for k, v in hparams.items() if k in known})
    try:
        model.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: state_dict does not fit its hyper-parameters: {str(exc).splitlines()[0]}") from exc
    model._initial_weights_loaded = True
    return model.to(map_location).eval()
