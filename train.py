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
With the default config, `--data.path` other than data/toybirds is read as your data (image
folder, CSV manifest or CUB root); toy birds are generated only at data/toybirds.
Runs are seeded (`seed_everything`), logged to W&B offline under <root>/wandb (`wandb sync
wandb/offline-run-*` uploads them later), and keep the best (val/acc) and last checkpoints and
the resolved config under <root>/checkpoints/<run id>/; <root> is `--trainer.default_root_dir`
(default: the current folder). Before anything starts a preflight checks the data, model and
callbacks (exit code 2, one line per finding). SIGTERM/SIGINT write last.ckpt and exit non-zero
(143/1); `fit --ckpt_path last` resumes the same W&B run and checkpoint folder.
Errors are one line; `VITLENS_DEBUG=1` shows the traceback.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "configs" / "toybirds.yaml"
TOYBIRDS_PATH = "data/toybirds"  # the default config's data.path: the only place it generates toy birds
SUBCOMMANDS = ("fit", "validate", "test", "predict")
EXIT_PREFLIGHT = 2  # bad data / config, found before the run started
EXIT_INTERRUPTED = {"SIGTERM": 143, "SIGINT": 130}  # 128 + signal number, as shells and SLURM read it

USAGE = """usage: train.py [-h] {fit,validate,test,predict} ...

Fine-tune a timm Vision Transformer on your images and watch what it looks at (vitlens).

subcommands (each has its own --help listing every option):
  fit        train; writes checkpoints/<run id>/{best-*,last}.ckpt and config.yaml
  validate   evaluate a checkpoint on the val split (--ckpt_path)
  test       evaluate a checkpoint on the test split (--ckpt_path)
  predict    run a checkpoint on a split

common options (after the subcommand):
  -c, --config FILE             YAML config (default: configs/toybirds.yaml)
  --data.path PATH              image folder, CSV manifest or CUB-200-2011 root
  --data.image_size N           side of the square images the model sees
  --model.backbone NAME         timm model name; --model.weights FILE for local weights
  --trainer.max_epochs N        epochs; --trainer.default_root_dir DIR for all outputs
  --ckpt_path {PATH,last}       resume (fit) or the checkpoint to evaluate
  --print_config                print the resolved config and exit

examples:
  python train.py fit                                   # toy birds (generated once)
  python train.py fit --data.path my_birds/             # your photos, one folder per class
  python train.py fit --ckpt_path last                  # resume the latest interrupted run
  python train.py fit --help                            # every option, described

Exit codes: 0 done, 2 bad data/config (found before the run), 143 stopped by SIGTERM, 130 by Ctrl-C (last.ckpt
written), 1 other errors. VITLENS_DEBUG=1 shows tracebacks.
"""


def _option_value(argv: list[str], name: str) -> str | None:
    """The last value given for `--name` (as `--name v` or `--name=v`) in `argv`."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def with_default_config(argv: list[str]) -> list[str]:
    """`argv` with `-c configs/toybirds.yaml` after the subcommand when no config is given.

    With the default config, a `--data.path` other than data/toybirds is the user's data:
    the default config's `data.generate: toybirds` is switched off for it (a mistyped folder
    is then an error naming it, not 3,360 toy birds), unless the command line asks for
    `--data.generate` itself.
    """
    if not argv or argv[0] not in SUBCOMMANDS:
        return argv
    if any(a in ("-c", "--config") or a.startswith("--config=") for a in argv[1:]):
        return argv
    extra = []
    path = _option_value(argv[1:], "--data.path")
    ckpt = _option_value(argv[1:], "--ckpt_path")
    if path is None and argv[0] != "fit" and ckpt and Path(ckpt).is_file():
        # `validate --ckpt_path run/last.ckpt` of a run on your photos: evaluate on them, not on toy birds
        trained_on = _checkpoint_data_path(ckpt)
        if trained_on is not None and os.path.normpath(trained_on) != os.path.normpath(TOYBIRDS_PATH):
            print(f"note: --data.path {trained_on} (the data {Path(ckpt).name} was trained on)", file=sys.stderr)
            extra = ["--data.path", trained_on]
            path = trained_on
    if path is not None and os.path.normpath(path) != os.path.normpath(TOYBIRDS_PATH):
        extra += ["--data.generate", "null", "--data.generate_options", "null"]
    return [argv[0], "--config", str(DEFAULT_CONFIG), *extra, *argv[1:]]


def _checkpoint_data_path(ckpt: str) -> str | None:
    """The data path stored in a checkpoint of this project (None when it holds none or is unreadable:
    the run then reports the checkpoint itself)."""
    try:
        from vitlens.data.from_checkpoint import checkpoint_data_settings

        path = (checkpoint_data_settings(ckpt) or {}).get("path")
    except Exception:  # noqa: BLE001 - not ours to report here
        return None
    return str(path) if path else None


def _quiet() -> None:
    """No deprecation blocks or tips in a normal run (VITLENS_DEBUG=1 keeps them)."""
    if os.environ.get("VITLENS_DEBUG"):
        return
    for message in (
        r".*skip_none.*",
        r"Checkpoint directory .* exists and is not empty",  # our folders are per run id: only a resume reuses one
        r".*LightningCLI's args parameter.*",
        r".*does not have many workers.*",
        r".*Starting from v1\.9\.0, `tensorboardX` has been removed.*",
        r".*You are using a CUDA device.*",
        r".*is an invalid version and will not be supported.*",
        r".*`weights_only` was not set.*",
        r".*LeafSpec.*",  # lightning 2.6 on torch 2.14
        r".*smaller than the logging interval.*",
    ):
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")  # worker processes
    import logging

    # Lightning's lines that say nothing about this run ("TPU available: False", how it counts steps)
    said_nothing = ("litlogger", "Tip:", "TPU available: False", "HPU available: False",
                    "to estimate number of stepping batches")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not any(text in record.getMessage() for text in said_nothing))
    # "Seed set to N" on every start: the seed is in the saved config.yaml
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)


def _quiet_evaluation() -> None:
    """validate/test --ckpt_path: no warnings about the checkpoint's fit-only callbacks (the last.ckpt
    writer) and their checkpoint folder, which evaluation neither uses nor writes."""
    if os.environ.get("VITLENS_DEBUG"):
        return
    warnings.filterwarnings("ignore", message=r".*callbacks used to create the checkpoint need to be provided.*")
    warnings.filterwarnings("ignore", message=r".*The dirpath has changed from .*")


# `train.py --help` answers here, before Lightning and timm are imported (seconds each)
if __name__ == "__main__" and sys.argv[1:] in (["-h"], ["--help"]):
    print(USAGE)
    sys.exit(0)

from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint  # noqa: E402
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback  # noqa: E402

from vitlens.callbacks import progress_bar  # noqa: E402
from vitlens.data import ImageDataModule  # noqa: E402
from vitlens.models import ViTClassifier  # noqa: E402

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
            self.parser.save(self.config, str(folder / self.config_filename), overwrite=True,
                             multifile=self.multifile)
        self.already_saved = True


class RunIdentity(Callback):
    """Stores the W&B run id in every checkpoint (``checkpoint["wandb_run_id"]``), so that
    ``--ckpt_path`` resumes into the same run."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        from lightning.pytorch.loggers import WandbLogger

        logger = trainer.logger
        if isinstance(logger, WandbLogger) and logger.version is not None:
            checkpoint["wandb_run_id"] = str(logger.version)


class InterruptCheckpoint(Callback):
    """SIGTERM (SLURM pre-emption, CI cancel, `kill`) or Ctrl-C during fit: last.ckpt of where the
    run is, in the run's checkpoint folder, for `fit --ckpt_path last`. (Lightning's
    OnExceptionCheckpoint deletes its file at teardown, and would also overwrite last.ckpt
    with the state of a crashed run.)"""

    interrupted_by: str | None = None  # "SIGINT" once Ctrl-C stopped a fit (read by main)

    def __init__(self, dirpath: str) -> None:
        self.path = str(Path(dirpath) / "last.ckpt")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            trainer.save_checkpoint(self.path)
        if isinstance(exception, KeyboardInterrupt):
            InterruptCheckpoint.interrupted_by = "SIGINT"  # Lightning then calls sys.exit(1)


class EpochSeed(Callback):
    """Re-seeds torch, numpy and random at the start of every training epoch from
    (seed_everything, epoch), so a run resumed from an epoch-end checkpoint draws the same
    dropout and drop-path as the uninterrupted run (Lightning does not keep RNG states in
    checkpoints). The batches and their augmentations come from (data seed, epoch) by
    `vitlens.data.dataset.EpochShuffle`, mixup's draws from (seed, epoch) by the model."""

    def on_train_start(self, trainer, pl_module) -> None:
        # On a resume Lightning iterates the training loader the first time when
        # configure_optimizers asks for estimated_stepping_batches, before the checkpoint's epoch
        # is restored, and uses that iterator for the resumed epoch: with workers it has already
        # drawn epoch 0's order. A fresh iterator draws the resumed epoch's (as Lightning does
        # itself at the start of every later epoch).
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        if trainer.ckpt_path is not None and fetcher is not None:
            iter(fetcher)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        from lightning.fabric.utilities.seed import seed_everything

        base = int(os.environ.get("PL_GLOBAL_SEED", "0"))
        seed_everything((base * 1_000_003 + 7919 * trainer.current_epoch + 1) % 2**32, workers=True, verbose=False)
        os.environ["PL_GLOBAL_SEED"] = str(base)  # keep the run's seed for the next epoch


def find_last_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest `<root>/checkpoints/*/last.ckpt` (what `--ckpt_path last` resumes)."""
    found = [p for pattern in ("checkpoints/*/last.ckpt", "checkpoints/last.ckpt") for p in Path(root).glob(pattern) if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def checkpoint_run_id(path: str | os.PathLike) -> str | None:
    """The W&B run id stored in a checkpoint by `RunIdentity` (None when it has none)."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # not a zip checkpoint (mmap needs one): read it plainly
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    run_id = checkpoint.get("wandb_run_id") if isinstance(checkpoint, dict) else None
    return str(run_id) if run_id else None


def _is_wandb(logger) -> bool:
    class_path = getattr(logger, "class_path", None) or (logger.get("class_path") if isinstance(logger, dict) else None)
    return bool(class_path) and str(class_path).rsplit(".", 1)[-1] == "WandbLogger"


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
        """Outputs under trainer.default_root_dir; `--ckpt_path last` -> that run's last.ckpt,
        resumed into the same W&B run."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config["trainer"]
        root = trainer.get("default_root_dir")
        loggers = trainer.get("logger")
        loggers = loggers if isinstance(loggers, list) else [loggers]
        wandb = [lg for lg in loggers if _is_wandb(lg)]
        for logger in wandb:
            args = logger["init_args"]
            if root and args.get("save_dir") in (None, ".", ""):
                args["save_dir"] = str(root)  # the W&B run goes under the run folder too
        if self.subcommand in ("validate", "test") and config.get("ckpt_path"):
            self._checkpoint_data(config)
        if self.subcommand != "fit" or not config.get("ckpt_path"):
            return
        ckpt_path = config["ckpt_path"]
        if ckpt_path == "last":
            found = find_last_checkpoint(root or ".")
            if found is None:
                raise FileNotFoundError(f"--ckpt_path last: no checkpoints/*/last.ckpt under {Path(root or '.').resolve()}; "
                                        "give the checkpoint's path, or set --trainer.default_root_dir to the run's folder")
            ckpt_path = config["ckpt_path"] = str(found)
        if ckpt_path in ("best", "hpc", "registry") or str(ckpt_path).startswith("registry:"):
            return
        if not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
        self._resume_folder = Path(ckpt_path).parent
        run_id = checkpoint_run_id(ckpt_path)
        if run_id:
            for logger in wandb:
                logger["init_args"]["id"] = run_id  # WandbLogger resumes it (resume="allow")

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            init = getattr(logger, "_wandb_init", None) if isinstance(logger, WandbLogger) else None
            if isinstance(init, dict) and init.get("anonymous") is None:
                # Lightning passes anonymous=None to wandb.init, and wandb >= 0.19 warns "The
                # anonymous setting has no effect" for any value on every run: pass none
                init.pop("anonymous", None)
        return trainer

    def _checkpoint_data(self, config) -> None:
        """validate/test --ckpt_path: the split and eval transform the model was trained with
        (the checkpoint's data settings), not the config's defaults; an override that puts
        training images into the evaluated split is an error (vitlens.data.from_checkpoint)."""
        import inspect

        from vitlens.data import ImageDataModule
        from vitlens.data.from_checkpoint import use_checkpoint_data

        ckpt_path = str(config["ckpt_path"])
        if not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
        defaults = {name: p.default for name, p in inspect.signature(ImageDataModule.__init__).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        for note in use_checkpoint_data(config["data"], ckpt_path, defaults):
            print(f"note: {note}", file=sys.stderr)

    def _preflight(self) -> None:
        from vitlens.preflight import preflight

        preflight(self.datamodule, self.model, self.trainer.callbacks, stage=self.subcommand)

    def before_validate(self) -> None:
        _quiet_evaluation()
        self._preflight()

    def before_test(self) -> None:
        _quiet_evaluation()
        self._preflight()

    def before_fit(self) -> None:
        """The preflight (before the W&B run or a checkpoint folder exists), then: checkpoints of
        a W&B run go to <default_root_dir>/checkpoints/<run id> (not ./<project>/<run id>); a
        resumed run keeps its folder; SIGTERM/SIGINT write last.ckpt first."""
        from lightning.pytorch.loggers import WandbLogger

        self._preflight()
        checkpoint = self.trainer.checkpoint_callback
        logger = self.trainer.logger
        resume_folder = getattr(self, "_resume_folder", None)
        if checkpoint is not None and checkpoint.dirpath is None:
            if resume_folder is not None:
                checkpoint.dirpath = str(resume_folder)
            elif isinstance(logger, WandbLogger):
                version = logger.version if self.trainer.is_global_zero else None
                if version is None and self.trainer.is_global_zero:
                    version = logger.experiment.id
                if version is not None:
                    checkpoint.dirpath = str(Path(self.trainer.default_root_dir) / "checkpoints" / str(version))
        if checkpoint is not None and checkpoint.dirpath is not None:
            folder = Path(checkpoint.dirpath)
            if resume_folder is not None or not folder.exists() or not any(folder.iterdir()):
                # a new folder (only our config.yaml will be in it) or the resumed run's own one
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        self.trainer.callbacks += [RunIdentity(), EpochSeed()]
        if checkpoint is not None and checkpoint.save_last:
            # Lightning 2.6 writes last.ckpt only when it also writes a top-k checkpoint, so a
            # run whose final epochs are not its best kept a stale last.ckpt: a separate
            # callback writes last.ckpt after every validation.
            checkpoint.save_last = False
            self.trainer.callbacks.append(ModelCheckpoint(
                dirpath=checkpoint.dirpath, filename="last", monitor=None, save_top_k=1,
                enable_version_counter=False,
            ))
        if checkpoint is not None and checkpoint.dirpath is not None:
            # SIGTERM (SLURM, CI, kill), Ctrl-C or a crash mid-epoch: last.ckpt is where the run was
            self.trainer.callbacks.append(InterruptCheckpoint(checkpoint.dirpath))


def _cli(argv: list[str] | None) -> VitlensCLI:
    if argv is None:
        sys.argv[1:] = with_default_config(sys.argv[1:])
    else:
        argv = with_default_config(list(argv))
    _quiet()
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
        parser_kwargs={"exit_on_error": False},  # main() prints parse errors in one line
        args=argv,
    )


def _argument_error_lines(message: str) -> list[str]:
    """The lines of a jsonargparse error that name the culprit (our own ValueErrors inside a
    Union/subclass dump), not its list of accepted forms and the Namespace it was given."""
    generic = ("Does not validate against", "Subtypes:", "Errors:", "Not a valid subclass", "Subclass types expect",
               "a class path", "a dict", "Expected a", "Given value", "Problem with given class_path")
    lines = [" ".join(line.strip().lstrip("- ").split()) for line in message.splitlines()]
    lines = [line for line in lines if line]
    useful = [line for line in lines if not line.startswith(generic)]
    return useful or lines[:1]


# errors of the user's data or settings: one line (VITLENS_DEBUG=1 for the traceback), exit code 2
def _known_errors() -> tuple[type[BaseException], ...]:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    return (ValueError, FileNotFoundError, NotADirectoryError, MisconfigurationException)


def main(argv: list[str] | None = None) -> VitlensCLI:
    """Run the CLI on `argv` (default: the command line).

    A bad data set or setting ends the program with one line per finding naming it and exit
    code 2 (`VITLENS_DEBUG=1` re-raises with the traceback); SIGTERM mid-run exits 143 after
    last.ckpt is written (Ctrl-C: last.ckpt too, exit 130).
    """
    from jsonargparse import ArgumentError
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    debug = os.environ.get("VITLENS_DEBUG", "") not in ("", "0")
    try:
        return _cli(argv)
    except ArgumentError as error:
        if debug:
            raise
        for line in _argument_error_lines(str(error)):
            print(f"train.py: error: {line}", file=sys.stderr)
        print("train.py: see `python train.py fit --help` for every option", file=sys.stderr)
        raise SystemExit(EXIT_PREFLIGHT) from None
    except SystemExit as stop:  # SIGTERMException is a SystemExit too; Ctrl-C ends in Lightning's sys.exit(1)
        signame = "SIGTERM" if isinstance(stop, SIGTERMException) else InterruptCheckpoint.interrupted_by
        if signame is None:
            raise
        said = {"SIGTERM": "SIGTERM", "SIGINT": "Ctrl-C (SIGINT)"}[signame]
        print(f"train.py: stopped by {said}; last.ckpt holds where the run was (resume: the same command plus "
              "--ckpt_path last)", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED[signame]) from None
    except _known_errors() as error:
        if debug:
            raise
        for line in _argument_error_lines(str(error).strip() or type(error).__name__):
            print(f"train.py: error: {line}", file=sys.stderr)
        raise SystemExit(EXIT_PREFLIGHT) from None


if __name__ == "__main__":
    main()
