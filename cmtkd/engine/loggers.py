"""Experiment tracking: where each epoch's row (every loss term, train/validation accuracy, learning
rate, CMT-KD's importance weights pi, time) goes besides ``history.csv``.

``train.loggers`` lists the trackers, any of:

* ``csv`` (default): ``RUN_DIR/history.csv`` (and ``metrics.json``). Always written whatever the list
  says: the workflow and exact resume read it.
* ``tensorboard``: event files in ``RUN_DIR/tensorboard/`` (``tensorboard --logdir runs/``). Needs
  ``pip install 'cmtkd[tensorboard]'``.
* ``wandb``: Weights & Biases, one W&B run per run directory (files in ``RUN_DIR/wandb/``); the
  project comes from ``WANDB_PROJECT`` (default ``cmtkd``), offline mode from ``WANDB_MODE=offline``.
  Needs ``pip install 'cmtkd[wandb]'``.

Each tracker's package is imported only when chosen; a missing one is one ``cmtkd: error:`` line
naming the pip extra, raised before the run directory is touched. Scalars are grouped by prefix
(``loss/``, ``val_top1/``, ``pi/``, ``train/``) and the step is the epoch. A resumed run continues
the same curves: TensorBoard discards events after the resumed epoch (``purge_step``), W&B resumes
the run of the same id.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from cmtkd.errors import UserError

LOGGERS = ("csv", "tensorboard", "wandb")
# logger -> (module that must be importable, pip extra that installs it)
_REQUIRES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def check_loggers(names: list[str]) -> None:
    """Unknown names as a UserError (config resolution; the packages need not be installed to read a run)."""
    for name in names:
        if name not in LOGGERS:
            raise UserError(f"train.loggers: unknown logger '{name}'; choose from {', '.join(LOGGERS)}")


def check_logger_packages(names: list[str]) -> None:
    """Unknown names and missing packages as a UserError (before training touches the run directory)."""
    check_loggers(names)
    for name in names:
        if name in _REQUIRES:
            module, extra = _REQUIRES[name]
            if importlib.util.find_spec(module) is None:
                raise UserError(f"train.loggers={name} needs the '{module}' package: pip install 'cmtkd[{extra}]' "
                                f"(or drop {name} from train.loggers)")


def scalar_name(key: str) -> str:
    """history.csv column -> grouped scalar tag: ``loss_ce`` -> ``loss/ce``, ``pi_layer1_0`` -> ``pi/layer1_0``."""
    if key == "loss":
        return "loss/total"
    for prefix in ("loss_", "val_top1_", "pi_"):
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key[len(prefix):]}"
    return f"train/{key}"


def epoch_scalars(row: dict) -> dict[str, float]:
    return {scalar_name(k): float(v) for k, v in row.items()
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardLogger:
    def __init__(self, out: Path, start_epoch: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events a killed run wrote after its last checkpoint are dropped on resume.
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_epoch + 1 if start_epoch else None)

    def log_epoch(self, row: dict) -> None:
        for tag, value in epoch_scalars(row).items():
            self.writer.add_scalar(tag, value, global_step=row["epoch"])
        self.writer.flush()

    def log_final(self, metrics: dict, epoch: int) -> None:
        for key in ("top1", "top5"):
            self.writer.add_scalar(f"test/{key}", float(metrics[key]), global_step=epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, out: Path, config: dict, config_hash: str):
        import wandb

        # One W&B run per run directory and configuration: a resumed run continues it.
        run_id = hashlib.sha256(f"{out.resolve()}:{config_hash}".encode()).hexdigest()[:16]
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "cmtkd"), name=out.name, id=run_id,
                              resume="allow", dir=str(out), config=config)

    def log_epoch(self, row: dict) -> None:
        self.run.log(epoch_scalars(row), step=row["epoch"])

    def log_final(self, metrics: dict, epoch: int) -> None:
        for key in ("top1", "top5"):
            self.run.summary[f"test/{key}"] = metrics[key]

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The chosen trackers of one run (on the main process only); ``csv`` needs no object."""

    def __init__(self, names: list[str], out: Path, *, config: dict, config_hash: str, start_epoch: int):
        check_logger_packages(names)
        self.loggers = []
        if "tensorboard" in names:
            self.loggers.append(TensorBoardLogger(out, start_epoch))
        if "wandb" in names:
            self.loggers.append(WandbLogger(out, config, config_hash))

    def log_epoch(self, row: dict) -> None:
        for logger in self.loggers:
            logger.log_epoch(row)

    def log_final(self, metrics: dict, epoch: int) -> None:
        for logger in self.loggers:
            logger.log_final(metrics, epoch)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
        self.loggers = []
