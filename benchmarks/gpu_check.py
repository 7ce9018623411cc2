"""The one prepared GPU check (``make gpu-check``): everything the GPU path needs, in one command that
fits a short GPU lease (<= 8 minutes on one H100 by default, its phases each under a time limit).

    python benchmarks/gpu_check.py                       # on the GPU machine
    python benchmarks/gpu_check.py --wheels .whl         # first install what is missing from a wheel folder
    python benchmarks/gpu_check.py --download-wheels .whl   # (on a machine with a package index) fill it
    python benchmarks/gpu_check.py --tiny --device cpu   # the same phases at toy sizes, on CPU (a self-test)
    python benchmarks/gpu_check.py --dry-run             # print the plan, run nothing

Before the phases it makes the checkout importable (``pip install -e --no-deps``: ``cmtkd.baselines`` exists
only once installed). Phases, in order (a phase that fails or runs out of time is recorded and the next one
still runs); on CUDA, phases 2 and 3 run side by side while a background process compiles phase 4's compiled
cases once, filling torch.compile's on-disk caches (its cold compile times are rows of their own), so the
timed phase has the GPU to itself and compiles from warm caches:

1. ``env``: the environment fingerprint and the measured bf16 matrix-product peak (8192^3 on CUDA).
2. ``tests``: ``pytest -m cuda tests/test_cuda.py`` (passed / failed / skipped counts).
3. ``grid``: a 2-epoch grid (fp, qat, kd, cmtkd; ResNet-18 at width 1/4) through Snakemake with
   ``gpu: true`` and ``profiles/local-gpu`` on a synthetic dataset in the real cifar-100-python format.
4. ``throughput``: img/s of one training step (batch 256), each case in its own process: fp, qat and
   cmtkd (3 teachers) on the CIFAR ResNet-18 and AlexNet as config/cifar100.yaml trains them (bf16 +
   channels_last, deterministic: the ``+det`` rows; the projection and the targets use these); then, on
   ResNet-18, CMT-KD without determinism (cuDNN autotuning), the suite's QAT with plain (lossy) autocast in
   its quantized layers (``+det+lossy``: what exact low-bit arithmetic costs) and without TF32 convolutions
   (``+det+notf32``: exact on CUDA too, ASSUMPTIONS W18), and fp, qat, cmtkd compiled (``+compile``). FLOPs per step counted with
   ``torch.utils.flop_counter`` -> the fraction of the measured peak; the data pipeline's time per batch
   against the step; for ResNet-18 QAT and CMT-KD (the suite's mode) and FP (compiled), the step's device
   time by kernel (torch.profiler; ``profile`` rows: conv/matmul, batch norm, compiled Triton kernels,
   copies, the rest element-wise).
5. ``projection``: the wall time of one 200-epoch CIFAR-100 CMT-KD run and of the whole CIFAR-100 grid
   (workflow/scripts/estimate_cost.py with the throughputs measured in the suite's train settings),
   against the targets.

Every row goes to ``benchmarks/results/gpu-<device>-<date>.csv`` as soon as it is measured (a cut-off
run still leaves its evidence), each with the fingerprint; a missed target says by how much. One
summary is printed last. Exit status 0 when every phase ran and every check passed.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
PHASES = ("env", "tests", "grid", "throughput", "projection")
# What the check needs beyond torch/torchvision/numpy/pandas/pyyaml/matplotlib/tqdm/pytest (present on
# the usual GPU images): Snakemake for the grid phase, jsonschema for the suite-config validation.
REQUIREMENTS = ("snakemake>=8", "jsonschema")
# What building this checkout (pip install -e) needs, carried too in case the image lacks them.
BUILD_REQUIREMENTS = ("setuptools>=64", "wheel")
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                   "manylinux2014_x86_64", "manylinux1_x86_64")
TEACHER_BITS = [8, 6, 4]
CIFAR100_TRAIN = 45000  # 50,000 minus the 10 % held out for model selection
# Targets of the GPU path (issue 13), measured here rather than in timed tests.
TARGET_PEAK_FRACTION = 0.35  # ResNet-18 CIFAR CMT-KD (student + 3 teachers), of the bf16 matmul peak
TARGET_DATA_SHARE = 0.05     # data pipeline / training step
TARGET_RUN_HOURS = 1.0       # one 200-epoch CIFAR-100 CMT-KD run on one GPU
CSV_COLUMNS = ("phase", "name", "value", "unit", "target", "verdict", "note", "date", "device", "device_name",
               "torch", "cuda", "python", "git_commit", "cpus")


@dataclass
class Sizes:
    """What the phases run: full (GPU) or tiny (a CPU self-test of this script)."""
    matmul_n: int = 8192
    batch: int = 256
    width: float = 1.0
    steps: int = 20
    warmup: int = 5
    repeats: int = 3
    amp: str = "bf16"
    channels_last: bool = True
    grid_width: float = 0.25
    grid_train: int = 5000
    grid_test: int = 1000
    grid_epochs: int = 2
    grid_methods: list[str] = field(default_factory=lambda: ["fp", "qat", "kd", "cmtkd"])
    toy: bool = False
    # Seconds per phase (the total budget still bounds them). The tests decide the check, so they may run
    # longest (173 s on the H200 alone, now beside the grid and a background compilation); the timed
    # phase takes what is left, its compiled cases last.
    budgets: dict[str, float] = field(default_factory=lambda: {
        "env": 45, "tests": 300, "grid": 150, "throughput": 200, "projection": 20})

    @classmethod
    def tiny(cls) -> "Sizes":
        return cls(matmul_n=512, batch=16, width=0.125, steps=1, warmup=0, repeats=1, amp="none",
                   channels_last=False, grid_width=0.125, grid_train=400,
                   grid_test=100, grid_epochs=2, grid_methods=["qat", "cmtkd"], toy=True,
                   budgets={"env": 60, "tests": 120, "grid": 400, "throughput": 400, "projection": 60})


# ------------------------------------------------------------------------------------ the record
class Record:
    """The CSV, written row by row (flushed), plus what the summary needs."""

    def __init__(self, path: Path, fingerprint: dict):
        self.path = path
        self.fingerprint = fingerprint
        self.rows: list[dict] = []
        self._lock = threading.Lock()  # the tests and grid phases may run side by side (threads)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(path, "w", newline="")
        self._writer = csv.DictWriter(self._handle, fieldnames=CSV_COLUMNS)
        self._writer.writeheader()
        self._handle.flush()

    def add(self, phase: str, name: str, value, unit: str = "", target: str = "", verdict: str = "",
            note: str = "") -> dict:
        if isinstance(value, float):
            value = f"{value:.6g}"
        row = {"phase": phase, "name": name, "value": value, "unit": unit, "target": target, "verdict": verdict,
               "note": note, **{k: self.fingerprint.get(k, "") for k in CSV_COLUMNS[7:]}}
        shown = f"{value} {unit}".strip()
        with self._lock:
            self._writer.writerow(row)
            self._handle.flush()
            self.rows.append(row)
            print(f"[{phase}] {name}: {shown}" + (f"  ({verdict}{'; ' + note if note else ''})" if verdict else
                                                 (f"  ({note})" if note else "")), flush=True)
        return row

    def close(self) -> None:
        self._handle.close()


def verdict_at_least(value: float, target: float) -> tuple[str, str]:
    if value >= target:
        return "met", ""
    return "missed", f"{100 * (target - value) / target:.0f} % below the target"


def verdict_at_most(value: float, target: float) -> tuple[str, str]:
    if value <= target:
        return "met", ""
    return "missed", f"{value / target:.2f}x the target"


# ------------------------------------------------------------------------------ the environment
def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def fingerprint(device: str) -> dict:
    import torch

    from cmtkd.engine.env import git_commit

    name = torch.cuda.get_device_name(0) if device == "cuda" else (platform.processor() or platform.machine())
    if device == "cpu":
        try:
            for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
                if line.startswith("Model name:"):
                    name = line.split(":", 1)[1].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "device": device,
            "device_name": name, "torch": torch.__version__, "cuda": torch.version.cuda or "",
            "python": platform.python_version(), "git_commit": git_commit(), "cpus": os.cpu_count() or 0}


def default_csv_path(fp: dict) -> Path:
    return RESULTS / f"gpu-{slug(fp['device_name'])}-{fp['date'][:10]}.csv"


def matmul_peak_tflops(device: str, n: int, dtype_name: str = "bfloat16", repeats: int = 10) -> float:
    """Measured dense matrix-product rate (TFLOP/s) on random data, the median of ``repeats`` timed products."""
    import statistics

    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = []
    for i in range(repeats + 3):
        if device == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b)
            stop.record()
            stop.synchronize()
            seconds = start.elapsed_time(stop) / 1000
        else:
            t0 = time.perf_counter()
            torch.mm(a, b)
            seconds = time.perf_counter() - t0
        if i >= 3:  # warm-up: handle creation, algorithm choice
            times.append(seconds)
    return 2 * n**3 / statistics.median(times) / 1e12


# ------------------------------------------------------------------------------------ wheels
def requirement_met(requirement: str) -> bool:
    from importlib import metadata

    from packaging.requirements import Requirement

    req = Requirement(requirement)
    try:
        installed = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        return False
    return not req.specifier or req.specifier.contains(installed, prereleases=True)


def install_command(wheels: Path, requirements: list[str], target: Path | None = None) -> list[str]:
    """pip from the wheel folder alone (no index): into this environment, or ``--target`` a folder."""
    command = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels),
               "--no-cache-dir", "--disable-pip-version-check", "--quiet"]
    if target is not None:
        command += ["--target", str(target), "--upgrade"]
    return command + list(requirements)


def install_missing(wheels: Path, requirements=REQUIREMENTS, target: Path | None = None,
                    into_env: bool = True) -> tuple[list[str], str]:
    """Install the requirements this interpreter lacks from ``wheels``; returns (installed, where).

    Into the running environment when pip may write there (pip then takes from the folder only what is
    missing); else into ``target`` (default /tmp/cmtkd-gpu-site), which is put on sys.path and
    PYTHONPATH (the folder must then hold every dependency: a target install ignores installed ones)."""
    if not wheels.is_dir():
        raise SystemExit(f"gpu_check: error: --wheels {wheels}: no such folder (fill it with --download-wheels)")
    missing = [r for r in requirements if not requirement_met(r)]
    if not missing:
        return [], "nothing missing"
    done = subprocess.run(install_command(wheels, missing), capture_output=True, text=True) if into_env else None
    where = "this environment"
    if done is None or done.returncode != 0:
        target = target or Path(tempfile.gettempdir()) / "cmtkd-gpu-site"
        done = subprocess.run(install_command(wheels, missing, target), capture_output=True, text=True)
        where = str(target)
        if done.returncode == 0:
            sys.path.insert(0, str(target))
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
            bin_dir = target / "bin"
            os.environ["PATH"] = os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise SystemExit(f"gpu_check: error: installing {', '.join(missing)} from {wheels} failed: {' | '.join(tail)}")
    import importlib

    importlib.invalidate_caches()
    return missing, where


def child_env() -> dict[str, str]:
    """The environment of every child process: unbuffered output, the checkout first on PYTHONPATH."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def checkout_importable() -> bool:
    """Whether a child process run like the phases' (PYTHONPATH = the checkout) imports all of cmtkd,
    ``cmtkd.baselines`` included: that subpackage lives in the top-level folder baselines/ and exists
    only once the project is installed (pyproject's package-dir), not from a bare source tree."""
    probe = subprocess.run([sys.executable, "-c", "import cmtkd.baselines.qat"], cwd=tempfile.gettempdir(),
                           env=child_env(), capture_output=True, text=True)
    return probe.returncode == 0


def install_checkout(wheels: Path | None = None) -> str:
    """Make this checkout importable as the package (editable, no dependencies, no index): built by the
    image's own setuptools (no build isolation), else, given a wheel folder, in an isolated build from the
    setuptools and wheel carried there. Returns what was done; exits with one line if it cannot."""
    if checkout_importable():
        return "already importable"
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation",
               "--no-cache-dir", "--disable-pip-version-check", "--quiet", "-e", str(REPO_ROOT)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 and wheels is not None and wheels.is_dir():
        command = [arg for arg in command if arg != "--no-build-isolation"]
        command[command.index("--no-index") + 1:command.index("--no-index") + 1] = ["--find-links", str(wheels)]
        done = subprocess.run(command, capture_output=True, text=True)
    import importlib

    importlib.invalidate_caches()
    if done.returncode != 0 or not checkout_importable():
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise SystemExit(f"gpu_check: error: cannot make this checkout importable ({shlex.join(command)}): "
                         f"{tail or 'cmtkd.baselines still not importable'}")
    return "installed the checkout (pip install -e, no deps)"


def download_commands(folder: Path, python_version: str = "3.12") -> list[list[str]]:
    """Two pip runs that fill ``folder`` for a CPython ``python_version`` x86-64 Linux machine: ``pip wheel``
    builds the dependencies published only as source (pure Python) here; ``pip download`` then fetches the
    binary wheels of the target Python for the rest (it finds the built ones in the folder)."""
    native = [sys.executable, "-m", "pip", "wheel", "--quiet", "-w", str(folder), *REQUIREMENTS]
    target = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--python-version",
              python_version, "--implementation", "cp", "--find-links", str(folder), "-d", str(folder)]
    for plat in WHEEL_PLATFORMS:
        target += ["--platform", plat]
    return [native, target + ["--platform", "any", *REQUIREMENTS, *BUILD_REQUIREMENTS]]


def drop_foreign_wheels(folder: Path, python_version: str = "3.12") -> list[str]:
    """Delete the wheels no CPython ``python_version`` x86-64 Linux can install (left by ``pip wheel``)."""
    from packaging import tags
    from packaging.utils import parse_wheel_filename

    version = tuple(int(v) for v in python_version.split("."))
    platforms = [*WHEEL_PLATFORMS, "manylinux_2_5_x86_64", "manylinux_2_12_x86_64", "manylinux2010_x86_64",
                 "manylinux_2_24_x86_64", "linux_x86_64"]
    wanted = set(tags.cpython_tags(version, platforms=platforms)) | set(
        tags.compatible_tags(version, "cp" + "".join(map(str, version)), platforms=platforms))
    dropped = []
    for wheel in sorted(folder.glob("*.whl")):
        if not set(parse_wheel_filename(wheel.name)[3]) & wanted:
            wheel.unlink()
            dropped.append(wheel.name)
    return dropped


def download_wheels(folder: Path, python_version: str = "3.12") -> int:
    folder.mkdir(parents=True, exist_ok=True)
    for command in download_commands(folder, python_version):
        print(shlex.join(command), flush=True)
        if subprocess.run(command).returncode != 0:
            print(f"gpu_check: error: {command[3]} failed; is a package index reachable from here?", file=sys.stderr)
            return 1
    dropped = drop_foreign_wheels(folder, python_version)
    wheels = sorted(folder.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{len(wheels)} wheels for CPython {python_version} x86-64 in {folder} ({size:.0f} MiB; "
          f"dropped {len(dropped)} for this machine's Python). On the GPU machine: make gpu-check WHEELS={folder}")
    return 0


def modified_files() -> list[str]:
    done = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    return [line[3:] for line in done.stdout.splitlines()] if done.returncode == 0 else []


# ------------------------------------------------------------------------------------- running
class Clock:
    def __init__(self, budget_s: float):
        self.start = time.monotonic()
        self.budget = budget_s

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def limit(self, phase_budget: float, reserve: float = 10.0) -> float:
        return max(1.0, min(phase_budget, self.left() - reserve))


def run(command: list[str], timeout: float, cwd: Path = REPO_ROOT, log: Path | None = None) -> tuple[int | None, str]:
    """(exit status or None on timeout, output tail); the whole output goes to ``log`` if given."""
    try:
        done = subprocess.run(command, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=timeout,
                              start_new_session=True)
        output, status = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        output += (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        status = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(output)
    return status, output[-4000:]


# -------------------------------------------------------------------------------------- phases
def phase_env(rec: Record, args, sizes: Sizes) -> dict:
    import torch

    tflops = matmul_peak_tflops(args.device, sizes.matmul_n, "bfloat16")
    rec.add("env", "matmul_peak_bf16", tflops, "TFLOP/s", note=f"{sizes.matmul_n}^3 bf16 torch.mm, median of 10")
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        rec.add("env", "gpu_memory", props.total_memory / 2**30, "GiB", note=f"{props.multi_processor_count} SMs")
        # fp32 work (the quantized layers under autocast, ASSUMPTIONS Q13) runs on TF32 tensor cores only where
        # these allow it: torch's defaults here; each training run sets them from train.tf32 (W18).
        rec.add("env", "tf32_allowed", f"cudnn {torch.backends.cudnn.allow_tf32}, "
                f"matmul {torch.backends.cuda.matmul.allow_tf32}",
                note="torch defaults; a run sets cuDNN's from train.tf32 (default true) and matmul off")
    return {"peak_tflops": tflops}


def phase_tests(rec: Record, args, sizes: Sizes, clock: Clock) -> bool:
    limit = clock.limit(sizes.budgets["tests"])
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py", "-p", "no:cacheprovider",
               "-rfEs", "--durations=12"]
    status, tail = run(command, limit, log=args.work / "logs" / "tests.log")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)\b", tail)}
    note = ", ".join(f"{v} {k}" for k, v in counts.items()) or tail.strip().splitlines()[-1:] and tail.strip().splitlines()[-1]
    if status is None:
        rec.add("tests", "cuda_tests", "timeout", verdict="failed", note=f"over {limit:.0f} s; {note}")
        return False
    ok = status == 0
    rec.add("tests", "cuda_tests", counts.get("passed", 0), "passed", verdict="passed" if ok else "failed",
            note=note)
    for line in tail.splitlines():
        if line.startswith(("FAILED", "ERROR")):
            rec.add("tests", "failure", line[:300], verdict="failed")
    return ok


def grid_config(root: Path, sizes: Sizes, gpu: bool) -> dict:
    return {
        "description": "gpu-check: 2-epoch grid on a synthetic CIFAR-100 (real file format)",
        "dataset": {"name": "cifar100", "root": str(root), "batch_size": 128},
        "gpu": gpu,
        "report": False,
        "recipe": {"epochs": sizes.grid_epochs, "model": {"width": sizes.grid_width},
                   "train": {"amp": "bf16" if gpu else "none", "channels_last": gpu}},
        "experiments": {"check": {"methods": sizes.grid_methods, "archs": ["resnet18"], "bits": ["W2A2"],
                                  "teacher_sets": [[8, 4]], "seeds": [0]}},
    }


def phase_grid(rec: Record, args, sizes: Sizes, clock: Clock) -> bool:
    import yaml

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from synthetic_cifar import write_synthetic_cifar100

    work = args.work / "grid"
    root = write_synthetic_cifar100(work / "data", sizes.grid_train, sizes.grid_test, seed=0)
    config = work / "config.yaml"
    gpu = args.device == "cuda"
    config.write_text(yaml.safe_dump(grid_config(root, sizes, gpu), sort_keys=False))
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO_ROOT / "Snakefile"), "--directory", str(work),
               "--configfile", str(config), "--cores", str(min(16, os.cpu_count() or 1))]
    if gpu:
        command += ["--profile", str(REPO_ROOT / "profiles" / "local-gpu"), "--resources", "gpu=1"]
    limit = clock.limit(sizes.budgets["grid"])
    t0 = time.monotonic()
    status, tail = run(command, limit, log=args.work / "logs" / "grid.log")
    seconds = time.monotonic() - t0
    runs = sorted((work / "results" / "runs").glob("method~*/**/eval.json"))
    expected = len(sizes.grid_methods) + (1 if "kd" in sizes.grid_methods else 0)  # kd's fp teacher
    devices = set()
    for path in (work / "results" / "runs").glob("method~*/**/metrics.json"):
        devices.add(json.loads(path.read_text()).get("env", {}).get("device"))
    ok = status == 0 and (work / "results" / "tables" / "main.csv").exists()
    note = (f"{len(runs)} evaluated runs (of >= {expected}), devices {sorted(d for d in devices if d)}; "
            f"{'timeout' if status is None else f'exit {status}'}")
    if gpu and devices != {"cuda"}:
        ok = False
        note += "; a run did not train on CUDA"
    if not ok:
        note += " | " + " ".join(tail.strip().splitlines()[-3:])[:400]
    rec.add("grid", "snakemake_grid", seconds, "s", verdict="passed" if ok else "failed", note=note)
    return ok


SUITE_CONFIG = REPO_ROOT / "config" / "cifar100.yaml"
SUITE_TRAIN_KEYS = ("amp", "channels_last", "compile", "deterministic", "tf32")


def suite_train_settings(arch: str, config: Path = SUITE_CONFIG) -> dict:
    """How the CIFAR-100 grid trains ``arch``: its recipe's (and arch_recipe's) train.amp, channels_last,
    compile, deterministic and tf32 over the engine's defaults. The projection is timed in exactly this mode."""
    sys.path.insert(0, str(REPO_ROOT / "workflow" / "scripts"))
    import grid

    from cmtkd.config import TrainConfig

    recipe, defaults = grid.recipe_for(grid.load_config(config), arch), TrainConfig()
    return {key: recipe.get(f"train.{key}", getattr(defaults, key)) for key in SUITE_TRAIN_KEYS}


def throughput_cases(sizes: Sizes, device: str, only: str | None = None) -> list[dict]:
    """The timed cases, most needed first (a phase cut short keeps those):

    1. fp, qat, cmtkd on ResNet-18 and AlexNet as the CIFAR-100 suite trains them (``suite``: its amp,
       channels_last, compile and deterministic; the toy sizes keep their own amp and memory format):
       the projection's numbers;
    2. ResNet-18 CMT-KD without determinism (cuDNN autotuning instead): what determinism costs;
    3. the suite's ResNet-18 QAT case with plain autocast in its quantized layers (``exact: False``,
       rounding the low-bit codes as ASSUMPTIONS Q13 describes): what exact low-bit arithmetic costs
       (only when amp is on); then the same case without TF32 convolutions (``tf32: False``, ``+notf32``:
       exact on CUDA too, ASSUMPTIONS W18): what exactness on the GPU would cost;
    4. fp, qat, cmtkd on ResNet-18 compiled, without determinism (compilation takes the longest).
    """
    fast = {"amp": sizes.amp, "channels_last": sizes.channels_last}
    cases = []
    for arch in ("resnet18", "alexnet"):
        suite = suite_train_settings(arch)
        if sizes.toy:  # toy sizes: their own precision and layout, the suite's other settings
            suite.update(fast)
        cases += [{"arch": arch, "label": label, **suite, "exact": True, "suite": True}
                  for label in ("fp", "qat", "cmtkd")]
    plain = {**fast, "compile": False, "deterministic": False, "exact": True, "suite": False}
    cases.append({"arch": "resnet18", "label": "cmtkd", **plain})
    suite_qat = next(c for c in cases if c["arch"] == "resnet18" and c["label"] == "qat")
    if suite_qat["amp"] != "none":  # the suite's ResNet-18 QAT case with one change: lossy quantized layers
        cases.append({**suite_qat, "exact": False, "suite": False})
    if device != "cpu" and suite_qat.get("tf32", True):  # ... or one other change: no TF32 (exact on CUDA; a CPU has none)
        cases.append({**suite_qat, "tf32": False, "suite": False})
    if device != "cpu":  # the CPU self-test skips compilation (minutes on a small CPU)
        cases += [{"arch": "resnet18", "label": label, **plain, "compile": True} for label in ("fp", "qat", "cmtkd")]
    unique: dict[str, dict] = {}
    for case in cases:  # a suite that trains as a diagnostic case does: timed once, as the suite's case
        unique.setdefault(case_name(case), case)
    cases = list(unique.values())
    if only:
        cases = [c for c in cases if any(part in case_name(c) for part in only.split(","))]
    return cases


def case_name(case: dict) -> str:
    precision = {"bf16": "bf16", "fp16": "fp16"}.get(case["amp"], "fp32")
    return (f"{case['arch']}/{case['label']}/{precision}" + ("+cl" if case["channels_last"] else "")
            + ("+det" if case.get("deterministic") else "") + ("" if case.get("exact", True) else "+lossy")
            + ("" if case.get("tf32", True) else "+notf32")
            + ("+compile" if case["compile"] else ""))


def measure_case(case: dict, sizes: Sizes, device: str, profile: bool = True) -> dict:
    """Child process: img/s and FLOPs per step of one method's training step (the engine's train_step)."""
    import statistics

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cmtkd.config import build_config
    from cmtkd.data import DataInfo
    from cmtkd.engine.trainer import build_optimizer, setup_runtime, train_step
    from cmtkd.registry import get_method

    bits = 32 if case["label"] == "fp" else 2
    method_args = {"teacher_bits": TEACHER_BITS} if case["label"] == "cmtkd" else {}
    cfg = build_config([{"method": case["label"], "arch": case["arch"], "w_bits": bits, "a_bits": bits,
                         "model": {"width": sizes.width}, "method_args": method_args,
                         "train": {"device": device, "amp": case["amp"], "channels_last": case["channels_last"],
                                   "deterministic": case.get("deterministic", False), "compile": case["compile"],
                                   "tf32": case.get("tf32", True)}}])
    dev = setup_runtime(cfg)  # deterministic algorithms or cuDNN autotuning, and TF32, as a training run sets them
    from cmtkd.quant.layers import QConv2d, QLinear

    # Exact low-bit arithmetic under autocast unless the case says otherwise (set for every case: the
    # prewarm process measures several cases in turn).
    QConv2d.exact_under_autocast = QLinear.exact_under_autocast = case.get("exact", True)
    info = DataInfo("cifar100", 100, 3, 32, "cifar", 50000, 0, 0)
    torch.manual_seed(0)
    method = get_method(cfg.method)(cfg, info).to(dev)
    if cfg.train.channels_last:
        method = method.to(memory_format=torch.channels_last)
    method.train()
    optimizer = build_optimizer(method, cfg)
    scaler = torch.amp.GradScaler(dev.type, enabled=False)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(sizes.batch, 3, 32, 32, generator=g).to(dev)
    targets = torch.randint(0, 100, (sizes.batch,), generator=g).to(dev)
    with FlopCounterMode(display=False) as counter:  # eager, before compiling: the same arithmetic
        train_step(method, optimizer, scaler, images, targets, cfg, dev)
    flops = counter.get_total_flops()
    t_compile = 0.0
    if case["compile"]:
        method.forward_train = torch.compile(method.forward_train)
        t0 = time.perf_counter()
        train_step(method, optimizer, scaler, images, targets, cfg, dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t_compile = time.perf_counter() - t0
    for _ in range(sizes.warmup):
        train_step(method, optimizer, scaler, images, targets, cfg, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(sizes.repeats):  # timings of `steps` steps each; the median
        t0 = time.perf_counter()
        for _ in range(sizes.steps):
            train_step(method, optimizer, scaler, images, targets, cfg, dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / sizes.steps)
    step_s = statistics.median(times)
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else 0.0
    kernels = kernel_breakdown(lambda: train_step(method, optimizer, scaler, images, targets, cfg, dev), dev) \
        if profile and profiled(case) else []
    return {"step_ms": 1000 * step_s, "img_s": sizes.batch / step_s, "flops_per_step": flops,
            "compile_s": t_compile, "mem_gib": mem, "kernels": kernels}


def profiled(case: dict) -> bool:
    """The cases whose step time is broken down by kernel: where the time goes in a quantized step (ResNet-18
    QAT and CMT-KD as the suite trains them), and why compiling FP did not help (ResNet-18 FP, compiled)."""
    return case["arch"] == "resnet18" and ((case["label"] in ("qat", "cmtkd") and case.get("suite"))
                                           or (case["label"] == "fp" and case["compile"]))


KERNEL_GROUPS = (("conv/matmul", ("conv", "gemm", "sm90", "sm80", "cutlass", "wgmma", "xmma", "matmul", "mm_")),
                 ("batch norm", ("batch_norm", "bn_", "welford")),
                 ("triton (compiled)", ("triton",)),
                 ("copy/layout", ("copy", "nchw", "nhwc", "transpose", "cat")))


def kernel_breakdown(step, dev, steps: int = 3, top: int = 8) -> list[dict]:
    """Device time per kernel over ``steps`` training steps (torch.profiler): the ``top`` kernels and the
    share of coarse groups (convolution/matmul, batch norm, compiled Triton kernels, copies; the rest is
    element-wise work, the quantizers' among it). On CPU, the CPU time of the top-level ops instead."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if dev.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        if dev.type == "cuda":  # the kernels themselves (an op's own row would count its kernels twice)
            if getattr(event, "device_type", None) != DeviceType.CUDA:
                continue
            us = getattr(event, "self_device_time_total", None)
            us = getattr(event, "self_cuda_time_total", 0) if us is None else us
        else:
            us = event.self_cpu_time_total
        if us > 0:
            rows.append((event.key, us / steps / 1000))
    total = sum(ms for _, ms in rows) or 1.0
    groups: dict[str, float] = {}
    for key, ms in rows:
        name = next((g for g, marks in KERNEL_GROUPS if any(m in key.lower() for m in marks)), "element-wise/other")
        groups[name] = groups.get(name, 0.0) + ms
    out = [{"name": f"group: {g}", "ms": ms, "share": ms / total} for g, ms in sorted(groups.items(), key=lambda x: -x[1])]
    out += [{"name": key[:90], "ms": ms, "share": ms / total} for key, ms in sorted(rows, key=lambda x: -x[1])[:top]]
    return out


def data_batch_ms(sizes: Sizes, device: str) -> float:
    """Child process: one augmented, normalized CIFAR batch from the in-memory pipeline (GPU-resident on CUDA)."""
    import torch

    from cmtkd.data import DataConfig, DataInfo
    from cmtkd.data.in_memory import Augmentation, TensorBundle, TensorSplit

    n = 40 * sizes.batch
    g = torch.Generator().manual_seed(0)
    split = TensorSplit(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                        torch.randint(0, 100, (n,), generator=g))
    info = DataInfo("cifar100", 100, 3, 32, "cifar", n, 0, 0)
    cfg = DataConfig(name="cifar100", batch_size=sizes.batch, val_fraction=0.0)
    bundle = TensorBundle(info, split, split, split, (0.5,) * 3, (0.25,) * 3, Augmentation(4, True), cfg, device)
    for _ in bundle.train_batches(0, 0):
        pass
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    steps = sum(1 for _ in bundle.train_batches(1, 0))
    if device == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0) / steps


def prewarm_compile(cases: list[dict], sizes: Sizes, device: str) -> dict:
    """Child process: compile each case once (one step, no timing), which fills torch.compile's on-disk caches
    (Inductor's FX-graph and AOTAutograd caches, Triton's kernels) so that the timed case later compiles from
    them. Returns each case's cold compile time."""
    quick = dataclasses.replace(sizes, steps=1, warmup=0, repeats=1)
    return {case_name(case): measure_case(case, quick, device, profile=False)["compile_s"] for case in cases}


def _child(kind: str, payload: dict, sizes: Sizes, device: str) -> dict:
    if kind == "case":
        return measure_case(payload, sizes, device)
    if kind == "prewarm":
        return prewarm_compile(payload["cases"], sizes, device)
    return {"data_ms": data_batch_ms(sizes, device)}


def child_command(kind: str, payload: dict, args) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(
        {"kind": kind, "payload": payload, "tiny": args.tiny, "device": args.device})]


def parse_child(status: int | None, tail: str) -> tuple[dict | None, str]:
    for line in reversed(tail.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:]), ""
    return None, f"exit {status}: " + " ".join(tail.strip().splitlines()[-2:])[:300]


def start_prewarm(args, sizes: Sizes):
    """A background process that compiles the throughput phase's compiled cases while the checks run
    (None when there are none, e.g. on CPU): (process, its log file, start time)."""
    compiled = [c for c in throughput_cases(sizes, args.device, args.cases) if c["compile"]]
    if "throughput" not in args.phases or not compiled:
        return None
    log = args.work / "logs" / "prewarm.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = open(log, "w")
    # Background work must not slow the tests and grid it runs beside (their phases have time limits):
    # lowest CPU priority, and a quarter of the cores for Inductor's parallel compile workers.
    env = dict(child_env(), TORCHINDUCTOR_COMPILE_THREADS=str(max(1, (os.cpu_count() or 4) // 4)))
    nice = ["nice", "-n", "19"] if shutil.which("nice") else []
    process = subprocess.Popen(nice + child_command("prewarm", {"cases": compiled}, args), cwd=REPO_ROOT, env=env,
                               stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    return process, handle, log, time.monotonic()


def finish_prewarm(rec: Record, prewarm, clock: Clock) -> None:
    """Record the background compilation's cold compile times, waiting for it briefly (at most 30 s or a tenth
    of the time left), and stop it if it is still running: the timed phase needs the machine to itself, and
    its suite-mode cases come first; a compiled case then compiles itself if time is left."""
    if prewarm is None:
        return
    process, handle, log, started = prewarm
    try:
        status = process.wait(timeout=max(1.0, min(30.0, clock.left() / 10)))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):  # it may end between the timeout and the kill
            os.killpg(process.pid, 9)
        process.wait()
        status = None
    handle.close()
    got, note = parse_child(status, log.read_text()[-4000:])
    seconds = time.monotonic() - started
    if got is None:
        rec.add("throughput", "compile_prewarm", "n/a", "s", verdict="failed" if status is not None else "",
                note=("stopped, unfinished, after " if status is None else "") + f"{seconds:.0f} s; {note}")
        return
    for name, compile_s in got.items():
        rec.add("throughput", f"{name} cold compile", compile_s, "s",
                note="first compilation, empty caches (in the background, beside the tests and grid)")


def run_child(kind: str, payload: dict, args, timeout: float) -> tuple[dict | None, str]:
    status, tail = run(child_command(kind, payload, args), timeout)
    if status is None:
        return None, f"timeout after {timeout:.0f} s"
    return parse_child(status, tail)


def phase_throughput(rec: Record, args, sizes: Sizes, clock: Clock, peak_tflops: float | None) -> dict:
    phase_end = time.monotonic() + clock.limit(sizes.budgets["throughput"])
    results: dict[str, dict] = {}
    got, note = run_child("data", {}, args, max(1.0, min(60.0, phase_end - time.monotonic())))
    data_ms = got["data_ms"] if got else None
    rec.add("throughput", "data_batch", data_ms if got else "n/a", "ms", note=note or f"batch {sizes.batch}")
    for case in throughput_cases(sizes, args.device, args.cases):
        name = case_name(case)
        left = phase_end - time.monotonic()
        if left < 5:
            rec.add("throughput", name, "not run", verdict="skipped", note="throughput phase out of time")
            continue
        got, note = run_child("case", case, args, left)
        if got is None:
            rec.add("throughput", name, "n/a", "img/s", verdict="failed", note=note)
            continue
        results[name] = {**got, **case}
        tflops = got["flops_per_step"] / (got["step_ms"] / 1000) / 1e12
        frac = tflops / peak_tflops if peak_tflops else float("nan")
        rec.add("throughput", name, got["img_s"], "img/s",
                note=f"{got['step_ms']:.1f} ms/step, {got['flops_per_step'] / sizes.batch / 1e9:.2f} GFLOP/img, "
                     f"{tflops:.1f} TFLOP/s = {100 * frac:.1f} % of peak, {got['mem_gib']:.1f} GiB"
                     + (f", compiled in {got['compile_s']:.0f} s (warm caches if the prewarm finished)"
                        if case["compile"] else ""))
        for kernel in got.get("kernels", []):
            rec.add("profile", f"{name}: {kernel['name']}", kernel["ms"], "ms/step",
                    note=f"{100 * kernel['share']:.1f} % of the step's {'device' if args.device == 'cuda' else 'CPU'} time")
    # The targets are judged on ResNet-18 CMT-KD as the suite trains it (the fastest other variant where that
    # case is missing, as the projection does); the fastest variant's fraction is a row of its own.
    case, suite = projection_case(results, "resnet18", "cmtkd")
    mode = "" if suite else " (NOT the suite settings)"

    def peak_fraction(row: dict) -> float:
        return row["flops_per_step"] / (row["step_ms"] / 1000) / 1e12 / peak_tflops

    if case and peak_tflops:
        verdict, how = verdict_at_least(peak_fraction(case), TARGET_PEAK_FRACTION)
        rec.add("throughput", "target_cmtkd_peak_fraction", peak_fraction(case), "of bf16 peak",
                f">= {TARGET_PEAK_FRACTION}", verdict, f"{case_name(case)}{mode}; {how}".strip("; "))
        best = max((r for r in results.values() if r["arch"] == "resnet18" and r["label"] == "cmtkd"),
                   key=lambda r: r["img_s"])
        if best is not case:
            rec.add("throughput", "cmtkd_peak_fraction_fastest_variant", peak_fraction(best), "of bf16 peak",
                    note=f"{case_name(best)} (not how the suite trains)")
    if data_ms is not None and case:
        share = data_ms / (data_ms + case["step_ms"])
        verdict, how = verdict_at_most(share, TARGET_DATA_SHARE)
        rec.add("throughput", "target_data_share", share, "of the step", f"< {TARGET_DATA_SHARE}", verdict,
                f"vs {case_name(case)}{mode}; {how}".strip("; "))
    return results


def projection_case(results: dict, arch: str, label: str) -> tuple[dict | None, bool]:
    """The measured case the projection uses for (arch, label): the one timed as the CIFAR-100 suite trains
    (``suite``), else the fastest other one; and whether it is the suite's."""
    rows = [r for r in results.values() if r["arch"] == arch and r["label"] == label]
    suite = [r for r in rows if r.get("suite")]
    chosen = suite or rows
    return (max(chosen, key=lambda r: r["img_s"]) if chosen else None), bool(suite)


def project(results: dict, config: Path = SUITE_CONFIG) -> tuple[float | None, float | None, str]:
    """(hours of one 200-epoch CMT-KD run, GPU-hours of the whole CIFAR-100 grid, note) from measured img/s,
    each taken from the case timed in the suite's own train settings where there is one (the note says
    which cases were not)."""
    import pandas as pd

    sys.path.insert(0, str(REPO_ROOT / "workflow" / "scripts"))
    import estimate_cost

    picked = {(arch, label): projection_case(results, arch, label)
              for arch in ("resnet18", "alexnet") for label in ("qat", "cmtkd")}
    cmtkd = picked["resnet18", "cmtkd"][0]
    run_hours = 200 * CIFAR100_TRAIN / cmtkd["img_s"] / 3600 if cmtkd else None
    throughput = {arch: picked[arch, "qat"][0]["img_s"] for arch in ("resnet18", "alexnet") if picked[arch, "qat"][0]}
    measured_rows = [{"method": "cmtkd", "dataset": "cifar100", "arch": arch, "images_per_s": row["img_s"]}
                     for (arch, label), (row, _) in picked.items() if label == "cmtkd" and row]
    measured = pd.DataFrame(measured_rows, columns=["method", "dataset", "arch", "images_per_s"])
    runs, config_throughput = estimate_cost.load_grid(str(config), None)
    costs = estimate_cost.estimate(runs, {**config_throughput, **throughput}, measured)
    known = costs["gpu_hours"].notna().all()
    grid_hours = float(costs["gpu_hours"].sum()) if known else None
    not_suite = [case_name(row) for row, suite in picked.values() if row and not suite]
    note = (f"{len(costs)} runs; qat img/s {', '.join(f'{k}={v:.0f}' for k, v in throughput.items())}; "
            f"cmtkd measured directly; other methods: qat x networks per step; "
            + (f"NOT in the suite's train settings: {', '.join(not_suite)}" if not_suite
               else "every case in the suite's train settings"))
    return run_hours, grid_hours, note


def phase_projection(rec: Record, results: dict) -> bool:
    run_hours, grid_hours, note = project(results)
    if run_hours is None:
        rec.add("projection", "cmtkd_200_epochs", "n/a", "h", verdict="failed", note="no ResNet-18 CMT-KD throughput")
        return False
    verdict, how = verdict_at_most(run_hours, TARGET_RUN_HOURS)
    case, suite = projection_case(results, "resnet18", "cmtkd")
    rec.add("projection", "cmtkd_200_epochs", run_hours, "h", f"<= {TARGET_RUN_HOURS}", verdict,
            f"ResNet-18 CIFAR-100 CMT-KD (3 teachers), {CIFAR100_TRAIN} images x 200 epochs at {case_name(case)}"
            f"{'' if suite else ' (NOT the suite settings)'}; {how}".strip("; "))
    if grid_hours is None:
        rec.add("projection", "cifar100_grid", "n/a", "GPU-h", verdict="failed", note="a throughput is missing; " + note)
        return False
    rec.add("projection", "cifar100_grid", grid_hours, "GPU-h", note=note + f"; {grid_hours / 24:.1f} GPU-days")
    return True


# ------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--wheels", type=Path, metavar="DIR",
                   help="install what this Python lacks (" + ", ".join(REQUIREMENTS) + ") from this folder of "
                        "wheels, with no package index (pip --no-index --find-links DIR)")
    p.add_argument("--download-wheels", type=Path, metavar="DIR",
                   help="only download the wheels --wheels needs (Python 3.12, manylinux x86-64) into DIR, then exit")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python, for --download-wheels")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="toy sizes (with --device cpu: a self-test of this script)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument("--cases", help="throughput: only the cases whose name contains one of these (comma-separated)")
    p.add_argument("--budget-s", type=float, default=470, help="total time limit in seconds (default 470)")
    p.add_argument("--csv", type=Path, help="output CSV (default benchmarks/results/gpu-<device>-<date>.csv)")
    p.add_argument("--work", type=Path, help="scratch folder (default: a new temporary folder)")
    p.add_argument("--side-by-side", action=argparse.BooleanOptionalAction, default=None,
                   help="run the tests and grid phases at the same time (default: on CUDA only)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        p.error(f"unknown phase(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    args.phases = phases
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))
    if args.child:
        spec = json.loads(args.child)
        sizes = Sizes.tiny() if spec["tiny"] else Sizes()
        print("RESULT " + json.dumps(_child(spec["kind"], spec["payload"], sizes, spec["device"])), flush=True)
        return 0
    if args.download_wheels:
        return download_wheels(args.download_wheels, args.python_version)
    sizes = Sizes.tiny() if args.tiny else Sizes()
    if args.dry_run:
        print(f"gpu_check plan: device {args.device}, budget {args.budget_s:.0f} s, phases {', '.join(args.phases)}")
        if args.wheels:
            print(f"  install missing of {', '.join(REQUIREMENTS)}: {shlex.join(install_command(args.wheels, list(REQUIREMENTS)))}")
        for phase in args.phases:
            print(f"  {phase}: at most {sizes.budgets[phase]:.0f} s")
        for case in throughput_cases(sizes, args.device, args.cases):
            print(f"    throughput case {case_name(case)}, batch {sizes.batch}, width {sizes.width}")
        return 0
    clock = Clock(args.budget_s)
    installed, where = install_missing(args.wheels) if args.wheels else ([], "")
    checkout = install_checkout(args.wheels)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device visible (torch.cuda.is_available() is False); "
              "run on a GPU machine, or --device cpu --tiny for a self-test", file=sys.stderr)
        return 2
    args.work = args.work or Path(tempfile.mkdtemp(prefix="cmtkd-gpu-check-"))
    fp = fingerprint(args.device)
    rec = Record(args.csv or default_csv_path(fp), fp)
    print(f"gpu_check: {fp['device_name']}, torch {fp['torch']} (CUDA {fp['cuda'] or '-'}), Python {fp['python']}, "
          f"commit {fp['git_commit']}; CSV {rec.path}; scratch {args.work}", flush=True)
    if args.wheels:
        rec.add("env", "installed_from_wheels", ", ".join(installed) or "nothing missing", note=where)
    rec.add("env", "checkout", checkout, note=str(REPO_ROOT))
    if fp["git_commit"].endswith("-dirty"):  # which tracked files differ from that commit (the CSV names it)
        rec.add("env", "modified_files", " ".join(modified_files()) or "?", note="git status: differ from git_commit")
    ok, results, peak = True, {}, None
    try:
        if "env" in args.phases:
            peak = phase_env(rec, args, sizes)["peak_tflops"]
        prewarm = start_prewarm(args, sizes)
        checks = [phase for name, phase in (("tests", phase_tests), ("grid", phase_grid)) if name in args.phases]
        side_by_side = args.device == "cuda" if args.side_by_side is None else args.side_by_side
        # On a GPU machine the tests and the grid (correctness, not timings) share the GPU side by side,
        # while the compile caches fill in the background: the timed phase then has the GPU to itself.
        with ThreadPoolExecutor(max_workers=len(checks) if side_by_side and checks else 1) as pool:
            ok &= all(list(pool.map(lambda check: check(rec, args, sizes, clock), checks)))
        finish_prewarm(rec, prewarm, clock)
        if "throughput" in args.phases:
            if peak is None:
                peak = matmul_peak_tflops(args.device, sizes.matmul_n)
            results = phase_throughput(rec, args, sizes, clock, peak)
            ok &= bool(results)
        if "projection" in args.phases:
            ok &= phase_projection(rec, results)
    finally:
        rec.add("env", "wall_time", time.monotonic() - clock.start, "s", f"<= {args.budget_s:.0f}")
        rec.close()
    print("\n# gpu-check summary: " + f"{fp['device_name']}, torch {fp['torch']}, {fp['date']}")
    for row in rec.rows:
        if row["verdict"] or row["phase"] in ("projection",) or row["name"] == "matmul_peak_bf16":
            print(f"  {row['phase']:10s} {row['name']:34s} {row['value']:>10} {row['unit']:14s} "
                  f"{row['verdict']:8s} {row['note'][:90]}")
    targets = [r for r in rec.rows if r["name"].startswith("target_") or r["target"] and r["verdict"]]
    missed = [r["name"] for r in targets if r["verdict"] == "missed"]
    print(f"  checks: {'all passed' if ok else 'SOME FAILED'}; targets missed: {', '.join(missed) or 'none'}")
    print(f"  CSV: {rec.path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
