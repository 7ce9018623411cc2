"""Shared fixtures: tiny run arguments, a command runner, and one finished reference run per session.

Everything here runs on CPU with one torch thread: the test machine is small and shared, and a
single thread also keeps the bit-exactness checks independent of the core count.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# The smallest run that still exercises every part of the engine: ResNet-18 at 1/8 width on the
# embedded digits, 14 steps per epoch (~5 s/epoch on one core).
TINY_SETTINGS = ["--threads", "1", "--set", "model.width=0.125", "--set", "data.batch_size=256"]


def tiny_args(method: str = "qat", epochs: int = 3, seed: int = 1, w_bits: int | None = 2,
              a_bits: int | None = 2, arch: str = "resnet18", dataset: str = "digits") -> list[str]:
    """``cmtkd train`` arguments (without ``train`` and ``--out``) for a tiny CPU run."""
    args = ["--method", method, "--arch", arch, "--dataset", dataset]
    if w_bits is not None:
        args += ["--w-bits", str(w_bits)]
    if a_bits is not None:
        args += ["--a-bits", str(a_bits)]
    return args + ["--epochs", str(epochs), "--seed", str(seed)] + TINY_SETTINGS


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_run_args():
    """Factory: ``tiny_run_args(epochs=1, seed=2)`` -> argument list for ``cmtkd train``."""
    return tiny_args


def cli_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def cli_command(*args: str) -> list[str]:
    """``python -m cmtkd.cli ARGS`` with this interpreter (works without the console script)."""
    return [sys.executable, "-m", "cmtkd.cli", *args]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args), cwd=REPO_ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)


def start_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(cli_command(*args), cwd=REPO_ROOT, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture
def cli():
    """``cli("train", ...)`` -> CompletedProcess of ``python -m cmtkd.cli`` in a fresh process."""
    return run_cli


@pytest.fixture
def cli_popen():
    """``cli_popen("train", ...)`` -> a running Popen of ``python -m cmtkd.cli`` (stdout/stderr piped)."""
    return start_cli


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Path:
    """A finished, uninterrupted 3-epoch W2A2 QAT run (seed 1) made in a subprocess. Read-only:
    tests that change a run directory work on a copy (``copy_run``)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = run_cli("train", *tiny_args(), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture
def copy_run(tmp_path):
    """``copy_run(run_dir)`` -> a private copy of a run directory under this test's tmp_path."""
    def _copy(run_dir: Path) -> Path:
        target = tmp_path / f"copy-{run_dir.name}"
        shutil.copytree(run_dir, target)
        return target

    return _copy
