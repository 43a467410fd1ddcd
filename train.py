"""Fine-tune a timm Vision Transformer with Lightning.

    python train.py fit                                   # configs/toybirds.yaml (the default)
    python train.py fit -c configs/cub200_mae_vitb16.yaml
    python train.py fit -c configs/imagefolder_vit_small.yaml --data.path /data/birds
    python train.py fit -c configs/toybirds.yaml --trainer.max_epochs 2 --model.lr 1e-3
    python train.py validate -c configs/toybirds.yaml --ckpt_path checkpoints/<run>/best.ckpt
    python train.py fit --print_config                    # the full resolved config

Without `-c`/`--config` after the subcommand, `configs/toybirds.yaml` is used. (It is added
as an explicit config rather than as a jsonargparse default config file, because default
config files are merged *under* a user's config, and the toy-bird settings would then leak
into it silently.) Linked arguments: `model.backbone` -> `data.backbone` (its mean/std),
`data.image_size` -> `model.img_size`, `data.class_names` -> `model.class_names`.
Runs are seeded (`seed_everything`), logged to W&B offline under ./wandb by default
(`wandb sync wandb/offline-run-*` uploads them later), and keep the best (val/acc) and
last checkpoints under checkpoints/<run id>/.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint  # noqa: E402
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback  # noqa: E402

from vitlens.callbacks import progress_bar  # noqa: E402
from vitlens.data import ImageDataModule  # noqa: E402
from vitlens.models import ViTClassifier  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "configs" / "toybirds.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")


def with_default_config(argv: list[str]) -> list[str]:
    """`argv` with `-c configs/toybirds.yaml` after the subcommand when no config is given."""
    if not argv or argv[0] not in SUBCOMMANDS:
        return argv
    if any(a in ("-c", "--config") or a.startswith("--config=") for a in argv[1:]):
        return argv
    return [argv[0], "--config", str(DEFAULT_CONFIG), *argv[1:]]


class LearningRateLog(LearningRateMonitor):
    """LearningRateMonitor that stands aside when the run has no logger
    (``--trainer.logger false``) instead of failing at the start of training."""

    def on_train_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


class SaveConfigWithCheckpoints(SaveConfigCallback):
    """Writes the resolved config as config.yaml beside the run's checkpoints (rank 0)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        checkpoint = trainer.checkpoint_callback
        # asked on every rank, unconditionally: under DDP `trainer.log_dir` is a broadcast, and
        # asking for it on some ranks only (rank 0; or where the checkpoint folder is not yet
        # known, which differs between ranks in `fit`) hung the run in that collective
        log_dir = trainer.log_dir
        folder = checkpoint.dirpath if checkpoint is not None and checkpoint.dirpath else log_dir
        if trainer.is_global_zero:
            folder = Path(folder or trainer.default_root_dir)
            folder.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(folder / self.config_filename), skip_none=False, overwrite=True,
                             multifile=self.multifile)
        self.already_saved = True


class VitlensCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/acc",
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            "checkpoint.filename": "best-epoch{epoch:03d}-acc{val/acc:.4f}",
            "checkpoint.auto_insert_metric_name": False,
        })
        parser.link_arguments("model.backbone", "data.backbone")
        parser.link_arguments("data.image_size", "model.img_size", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """validate/test --ckpt_path: the checkpoint's own val split and eval transform (its saved
        data settings, where the config leaves them at their defaults), its classes checked
        against the data; an override that puts training images into the split is an error
        (vitlens.data.from_checkpoint)."""
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub in ("validate", "test") else None
        if ckpt and Path(ckpt).is_file():
            import inspect

            from vitlens.data.errors import DataError
            from vitlens.data.from_checkpoint import use_checkpoint_data

            defaults = {k: p.default for k, p in inspect.signature(ImageDataModule).parameters.items()}
            try:
                notes = use_checkpoint_data(self.config[sub].data, ckpt, defaults)
            except DataError as error:
                sys.exit(f"train.py {sub}: error: {' '.join(str(error).split())}")
            for note in notes:
                print(f"note: {note}", file=sys.stderr)

    def before_fit(self) -> None:
        """Checkpoints of a W&B run go to checkpoints/<run id> (not ./<project>/<run id>)."""
        from lightning.pytorch.loggers import WandbLogger

        checkpoint = self.trainer.checkpoint_callback
        logger = self.trainer.logger
        if checkpoint is not None and checkpoint.dirpath is None and isinstance(logger, WandbLogger):
            version = logger.version if self.trainer.is_global_zero else None
            if version is None and self.trainer.is_global_zero:
                version = logger.experiment.id
            if version is not None:
                checkpoint.dirpath = str(Path("checkpoints") / str(version))
        if checkpoint is not None and checkpoint.save_last:
            # Lightning 2.6 writes last.ckpt only when it also writes a top-k checkpoint, so a
            # run whose final epochs are not its best kept a stale last.ckpt: a separate
            # callback writes last.ckpt after every validation.
            checkpoint.save_last = False
            self.trainer.callbacks.append(ModelCheckpoint(
                dirpath=checkpoint.dirpath, filename="last", monitor=None, save_top_k=1,
                enable_version_counter=False,
            ))


def main(argv: list[str] | None = None) -> VitlensCLI:
    """Run the CLI on `argv` (default: the command line)."""
    if argv is None:
        sys.argv[1:] = with_default_config(sys.argv[1:])
    else:
        argv = with_default_config(list(argv))
    return VitlensCLI(
        ViTClassifier,
        ImageDataModule,
        subclass_mode_model=False,
        subclass_mode_data=False,
        seed_everything_default=0,
        save_config_callback=SaveConfigWithCheckpoints,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            # Rich on a terminal, whole lines in log files (SLURM, CI, | tee)
            "callbacks": [LearningRateLog(logging_interval="step"), progress_bar()],
            "logger": {
                "class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {"project": "vitlens", "save_dir": ".", "offline": True},
            },
        },
        args=argv,
    )


if __name__ == "__main__":
    main()
