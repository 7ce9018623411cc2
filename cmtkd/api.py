"""The public Python API for trained runs: ``cmtkd.load_student`` and ``cmtkd.load_run``.

    import cmtkd
    model = cmtkd.load_student("runs/cmtkd-w2a2")        # the selected student, eval mode, CPU
    run = cmtkd.load_run("runs/cmtkd-w2a2")              # + resolved config, metrics, history

Both read the run's ``model.pt`` through the engine's own checked loader
(:func:`cmtkd.engine.trainer.load_student`), so they accept exactly what ``cmtkd evaluate`` accepts.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmtkd.errors import UserError

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch import nn

    from cmtkd.config import RunConfig

MODEL_FILE = "model.pt"


def run_directory(path: str | Path) -> Path:
    """A run directory, given itself or its ``model.pt``."""
    path = Path(path)
    if path.is_file():
        if path.name != MODEL_FILE:
            raise UserError(f"{path} is not a run's {MODEL_FILE}; pass the run directory (the --out of `cmtkd train`) "
                            f"or its {MODEL_FILE}")
        return path.parent
    if not path.is_dir():
        raise UserError(f"{path} does not exist; pass the run directory (the --out of `cmtkd train`)")
    return path


def load_student(path: str | Path, device: "str | torch.device" = "cpu") -> "nn.Module":
    """The run's selected student as a plain quantized ``nn.Module`` in eval mode on ``device``.

    ``path`` is a run directory or its ``model.pt``. Input: normalised images (N, C, H, W) as the
    run's dataset produces them; output: logits (N, classes)."""
    import torch

    from cmtkd.engine.trainer import load_student as _load

    model, _ = _load(run_directory(path), torch.device(device))
    return model.eval()


@dataclass
class Run:
    """A finished (or resumable) run directory, read back."""

    path: Path
    config: "RunConfig"               # the resolved config it was trained with
    student: "nn.Module"              # the selected student, eval mode
    arch_config: dict                 # everything needed to rebuild the student (cmtkd.models.build_model)
    selected_epoch: int | None        # the epoch whose weights the student holds
    metrics: dict | None              # metrics.json (None while training has not finished)
    history: "pd.DataFrame"           # history.csv: one row per epoch


def load_run(path: str | Path, device: "str | torch.device" = "cpu") -> Run:
    """Everything a run directory holds that is useful after training: see :class:`Run`."""
    import io

    import pandas as pd
    import torch

    from cmtkd.config import config_hash, load_run_config
    from cmtkd.engine.trainer import REBUILD_METRICS, check_model_of_run, history_problem
    from cmtkd.engine.trainer import load_student as _load
    from cmtkd.errors import UserError
    from cmtkd.files import read_regular_file, read_sealed_json

    run_dir = run_directory(path)
    config = load_run_config(run_dir)
    model, blob = _load(run_dir, torch.device(device))
    check_model_of_run(run_dir, blob, config_hash(config))
    metrics_file = run_dir / "metrics.json"
    # Sealed like everything the tables read: an edited or truncated metrics.json is an error, not a number.
    metrics: Any = read_sealed_json(metrics_file, REBUILD_METRICS) if metrics_file.exists() else None
    history_file = run_dir / "history.csv"
    # model.pt is written after the last epoch, so the history must hold all of them: checked as `cmtkd train`
    # checks it before it calls a run complete (a run it would rebuild is not loaded).
    problem = history_problem(history_file, config.epochs)
    if problem is not None:
        raise UserError(f"{problem}; {REBUILD_METRICS}")
    try:
        history = pd.read_csv(io.BytesIO(read_regular_file(history_file)))
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise UserError(f"{history_file} is unreadable ({type(exc).__name__}); {REBUILD_METRICS}") from None
    return Run(path=run_dir, config=config, student=model.eval(), arch_config=dict(blob["arch_config"]),
               selected_epoch=blob.get("selected_epoch"), metrics=metrics, history=history)
