"""The shortcut alarm: when it fires on the shortcut job, and false alarms on the clean default job.

Fits the shipped toy-birds jobs with their ExplanationCallback (real Trainer, CPU) and records,
per explained epoch, the values the alarm judges (``ExplanationCallback.alarm.history``): per
method the largest position ratio over the classes and the smallest object ratio, the
validation accuracy, and the alarms that fired. Then the margins of the thresholds:

* clean job: how far the largest judged value (from ``warmup_epochs`` on) stays below
  ``position_fire`` (and the smallest object ratio above ``object_fire``): the false-alarm margin;
* shortcut job: the epoch the alarm fires and how far past the threshold its value was.

With a counterfactual split (``DIR/counterfactual``) it also prints the test accuracy on the
marked test split beside the clean counterfactual one (what the shortcut costs).

    python benchmarks/shortcut_alarm.py --config configs/toybirds.yaml --seeds 0 1 2    # false alarms
    python benchmarks/shortcut_alarm.py --config configs/toybirds_shortcut.yaml          # the alarm
    python benchmarks/shortcut_alarm.py --replay outputs/shortcut_alarm/*.json --position-fire 2.5

``--replay`` re-judges saved histories under other thresholds without training (how the shipped
thresholds were chosen). Histories are saved as JSON under --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

ROOT = Path(__file__).resolve().parent.parent


def _shipped_callback_options(config) -> dict:
    for entry in config["trainer"].get("callbacks") or []:
        if entry.get("class_path", "").endswith("ExplanationCallback"):
            return dict(entry.get("init_args") or {})
    return {}


class _Accuracy:
    def __init__(self):
        import lightning as L

        class Recorder(L.Callback):
            def __init__(self):
                self.val_acc = {}

            def on_validation_epoch_end(self, trainer, pl_module):
                if not trainer.sanity_checking and "val/acc" in trainer.callback_metrics:
                    self.val_acc[trainer.current_epoch] = float(trainer.callback_metrics["val/acc"])

        self.callback = Recorder()


def _test_accuracy(model, path, image_size, mean, std) -> float | None:
    import torch

    from vitlens.data import ImageDataModule

    if not (Path(path) / "manifest.csv").exists():
        return None
    data = ImageDataModule(str(path), image_size=image_size, mean=mean, std=std, batch_size=64, num_workers=0,
                           eval_resize="resize")
    data.setup("test")
    if data.test_dataset is None:
        return None
    correct = total = 0
    model.eval()
    with torch.inference_mode():
        for batch in data.test_dataloader():
            correct += int((model(batch["image"]).argmax(-1) == batch["label"]).sum())
            total += len(batch["label"])
    return correct / total


def run(config_path: Path, seed: int, epochs: int | None, out: Path) -> dict:
    import lightning as L
    import yaml

    from vitlens.callbacks import ExplanationCallback
    from vitlens.data import ImageDataModule
    from vitlens.models import ViTClassifier

    config = yaml.safe_load(config_path.read_text())
    data_cfg = dict(config["data"])
    data_cfg["path"] = str(ROOT / data_cfg["path"])
    model_cfg = dict(config["model"])
    options = _shipped_callback_options(config)
    epochs = epochs or config["trainer"].get("max_epochs", 12)
    L.seed_everything(seed, verbose=False)
    data = ImageDataModule(**{**data_cfg, "seed": seed}, backbone=model_cfg["backbone"])
    data.prepare_data()
    model = ViTClassifier(class_names=data.class_names, img_size=data.image_size, **model_cfg)
    class Recording(ExplanationCallback):
        """The real callback; keeps every explained epoch's coarse maps (for re-judging offline)."""

        saved: dict = {}

        def on_validation_epoch_end(self, trainer, pl_module):
            before = self.last_result
            super().on_validation_epoch_end(trainer, pl_module)
            r = self.last_result
            if r is not None and r is not before:
                save(partial=True)  # every explained epoch: a run cut short still leaves its history
                self.saved[f"labels_{r.epoch}"] = r.labels
                self.saved[f"predictions_{r.epoch}"] = r.predictions
                for m, maps in r.coarse.items():
                    self.saved[f"maps_{r.epoch}_{m}"] = maps.half().numpy()
                for m, scores in r.localisation.items():
                    self.saved[f"on_object_{r.epoch}_{m}"] = scores["relevance_on_object"]

    callback = Recording(**options)
    accuracy = _Accuracy()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
                        callbacks=[callback, accuracy.callback], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(out / f"{config_path.stem}_seed{seed}"),
                        precision=config["trainer"].get("precision", "32-true"))
    start = time.perf_counter()

    def save(partial: bool) -> dict:
        record = {
            "config": str(config_path.relative_to(ROOT)) if config_path.is_relative_to(ROOT) else str(config_path),
            "seed": seed, "epochs": epochs, "seconds": time.perf_counter() - start, "partial": partial,
            "thresholds": callback.alarm.thresholds.__dict__, "history": callback.alarm.history,
            "events": [e.as_dict() for e in callback.alarm.events], "val_acc": accuracy.callback.val_acc,
        }
        if not partial:
            record["test_acc"] = _test_accuracy(model, data_cfg["path"], data.image_size, model.mean, model.std)
            record["counterfactual_test_acc"] = _test_accuracy(model, Path(data_cfg["path"]) / "counterfactual",
                                                               data.image_size, model.mean, model.std)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{config_path.stem}_seed{seed}.json").write_text(json.dumps(record, indent=1))
        return record

    trainer.fit(model, datamodule=data)
    record = save(partial=False)
    import numpy as np

    np.savez_compressed(out / f"{config_path.stem}_seed{seed}.maps.npz", **callback.saved)
    return record


def _worst(row: dict, signal: str, method: str, thresholds) -> float:
    """The most alarming value of the classes the thresholds judge (recognised classes only)."""
    from vitlens.metrics.shortcut import judged_values

    values = [v for k, v in judged_values(row, thresholds).items() if k.startswith(f"{signal}|{method}|")]
    if not values:
        return float("nan")
    return max(values) if signal == "position" else min(values)


def report(records: list[dict], thresholds) -> None:
    from vitlens.metrics.shortcut import ShortcutThresholds, replay_alarm

    for rec in records:
        methods = sorted({k.split("|")[1] for row in rec["history"] for k in row
                          if k.split("|")[0] in ("position", "object")})
        fired = replay_alarm(rec["history"], thresholds)
        done = f"{len(rec['history'])} of {rec['epochs']} epochs (CUT SHORT)" if rec.get("partial") else f"{rec['epochs']} epochs"
        print(f"\n{rec['config']} seed {rec['seed']}: {done} in {rec.get('seconds', 0):.0f} s; "
              f"test acc {_pct(rec.get('test_acc'))}, counterfactual (clean) test acc {_pct(rec.get('counterfactual_test_acc'))}")
        header = f"{'epoch':>5} {'val acc':>8} {'judged':>6}" + "".join(f" {m[:22] + ' pos max':>30} {'obj min':>8}" for m in methods)
        print(header)
        for row in rec["history"]:
            e = int(row["epoch"])
            recognition = [k for k in row if k.startswith("recognition|")]
            judged = sum(1 for k in recognition if row[k] >= (thresholds.min_recognition
                                                               if thresholds.min_recognition is not None else -2))
            judged_text = f"{judged}/{len(recognition)}" if recognition else "all"
            line = f"{e:5d} {_pct(rec['val_acc'].get(str(e), rec['val_acc'].get(e))):>8} {judged_text:>6}"
            for m in methods:
                line += f" {_worst(row, 'position', m, thresholds):30.2f} {_worst(row, 'object', m, thresholds):8.2f}"
            alarms = sorted({k.split('|')[0] + ' ' + k.split('|')[1] for ep, k in fired if ep == e})
            print(line + ("   ALARM: " + "; ".join(f"{a} ({sum(1 for ep, k in fired if ep == e and k.startswith(a.replace(' ', '|')))} classes)" for a in alarms) if alarms else ""))
        judged = [r for r in rec["history"] if r["epoch"] >= thresholds.warmup_epochs]
        for m in methods:
            pos = max((v for r in judged if math.isfinite(v := _worst(r, "position", m, thresholds))), default=float("nan"))
            obj = min((v for r in judged if math.isfinite(v := _worst(r, "object", m, thresholds))), default=float("nan"))
            first = min((ep for ep, k in fired if k.split("|")[1] == m), default=None)
            print(f"  {m}: first alarm {'epoch ' + str(first) if first is not None else 'never'}; from epoch "
                  f"{thresholds.warmup_epochs} on: largest position ratio {pos:.2f} (fire at {thresholds.position_fire:g}, "
                  f"margin {thresholds.position_fire / pos:.2f}x), smallest object ratio {obj:.2f} (fire at "
                  f"{thresholds.object_fire:g}, margin {obj / thresholds.object_fire:.2f}x)")
        rows = {int(r["epoch"]): r for r in rec["history"]}
        for ep, key in fired:
            name = key.split("|", 2)[2]
            value = rows[ep].get(f"recognition|{name}")
            print(f"  alarm: epoch {ep}, {key.split('|')[1]}, {key.split('|')[0]} signal, class {name}: value "
                  f"{rows[ep][key]:.2f}, recognition {'–' if value is None else f'{value:.2f}'} "
                  f"(judged from {thresholds.min_recognition})")
        if any(k.startswith("recognition|") for r in rec["history"] for k in r):
            # the recognition gate: how many judgeable values it kept out, and what they would have done
            ungated = replay_alarm(rec["history"], ShortcutThresholds(**{**thresholds.__dict__, "min_recognition": None}))
            kept_out = sum(1 for r in rec["history"] if r["epoch"] >= thresholds.warmup_epochs
                           for k in r if k.startswith("recognition|") and thresholds.min_recognition is not None
                           and r[k] < thresholds.min_recognition)
            print(f"  recognition gate: {kept_out} class-epochs (from epoch {thresholds.warmup_epochs} on) not judged; "
                  f"without the gate the alarm would fire {len(ungated)} time(s)"
                  + (f": {', '.join(f'epoch {ep} {k}' for ep, k in ungated)}" if ungated else ""))
    false = sum(1 for rec in records if "shortcut" not in rec["config"] for _ in replay_alarm(rec["history"], thresholds))
    print(f"\nalarms on clean runs (false alarms): {false}")


def _pct(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "toybirds.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=None, help="default: the config's max_epochs")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "shortcut_alarm")
    p.add_argument("--replay", type=Path, nargs="+", default=None, help="saved histories to re-judge (no training)")
    for name in ("position_fire", "position_clear", "object_fire", "object_clear"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=None)
    p.add_argument("--patience", type=int, default=None)
    p.add_argument("--min-recognition", type=lambda v: None if v.lower() == "none" else float(v), default=False,
                   help="classes below this recognition are not judged ('none': judge every class)")
    p.add_argument("--warmup-epochs", type=int, default=None)
    args = p.parse_args()

    import torch

    from vitlens.metrics.shortcut import ShortcutThresholds

    torch.set_num_threads(max(1, torch.get_num_threads()))
    overrides = {k: v for k, v in vars(args).items() if k in {f for f in ShortcutThresholds.__dataclass_fields__}
                 and (v is not None or k == "min_recognition") and v is not False}
    thresholds = ShortcutThresholds(**overrides)
    if args.replay:
        records = [json.loads(path.read_text()) for path in args.replay]
    else:
        records = [run(args.config.resolve(), seed, args.epochs, args.out) for seed in args.seeds]
    print(f"thresholds: {thresholds}")
    report(records, thresholds)


if __name__ == "__main__":
    main()
