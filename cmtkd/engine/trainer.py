"""The one training loop every method runs through.

Exactness: all randomness of epoch ``e`` (batch order, augmentation, dropout) is seeded from
``(seed, e)``, and a full-state checkpoint is written atomically after every epoch. A run directory
that already holds a checkpoint is resumed from it, so a killed run rerun with the same command
finishes with bit-identical weights and metrics (CPU).

Reading order: :func:`train` -> :func:`train_epoch` -> :func:`train_iter` (-> :func:`train_step`). A run
is one :class:`Run` object; what changes from epoch to epoch is its :class:`TrainState`, and
:meth:`Run.checkpoint_content` / :meth:`Run.restore` are the one place it meets ``checkpoint.pt``.

Data-parallel training on several GPUs: ``torchrun --nproc_per_node=N -m cmtkd.cli train ...``; see
:mod:`cmtkd.engine.distributed` for what differs from one process with the same global batch.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import os
import random
import stat
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from torch import nn

from cmtkd import checkpoint
from cmtkd.checkpoint import CHECKPOINT_FILE as CHECKPOINT, MODEL_FILE as MODEL
from cmtkd.config import RunConfig, check_threads, config_diff, config_hash, load_run_config, load_yaml
from cmtkd.data import build_data
from cmtkd.data.common import check_data_parallel
from cmtkd.engine import distributed
from cmtkd.engine.env import fingerprint, peak_memory_mib
from cmtkd.engine.footprint import check_network_size
from cmtkd.files import (LOCK_FILE, RunBusy, RunLock, atomic_write_text, ensure_writable_dir, read_regular_file,
                         read_sealed_json, remove_stale_temp_files, write_sealed_json)
from cmtkd.engine.loggers import Trackers, check_logger_packages
from cmtkd.initialization import check_init_source
from cmtkd.errors import UserError
from cmtkd.registry import get_method

# What rebuilds a run's model.pt: the trainer rewrites it from the final checkpoint.
REBUILD_MODEL = "rerun the same `cmtkd train` command (same --out) to rebuild it from checkpoint.pt"
REBUILD_METRICS = REBUILD_MODEL.replace("rebuild it from checkpoint.pt", "rebuild it")


# --------------------------------------------------------------------------------------- runtime
def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is available; use train.device=cpu")
    return torch.device(name)


def device_label(device: torch.device) -> str:
    """What a run says it trained on: ``cuda:0 (NVIDIA H100 80GB HBM3)`` or ``cpu (2 threads)``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return f"{device.type} ({torch.get_num_threads()} threads)"


def enable_deterministic_algorithms(compiled: bool) -> None:
    """torch.use_deterministic_algorithms(True, warn_only=True), without its import of torch._inductor
    (about 2 s per process on a 2-core CPU, paid by every run of a suite) when nothing is compiled: the
    public call imports inductor only to set inductor's own flag, which only torch.compile reads."""
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if compiled or setter is None:
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        setter(True, warn_only=True)


def setup_runtime(cfg: RunConfig) -> torch.device:
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.deterministic:
        # cuBLAS is deterministic only with a fixed workspace; read when its first handle is made,
        # so this must precede any CUDA matrix product (a value the user set is kept).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        enable_deterministic_algorithms(cfg.train.compile)
    device = select_device(cfg.train.device)
    # cuDNN autotuning picks the fastest convolution algorithm per shape (a run's shapes repeat every
    # step), but timing-dependent picks are not reproducible: only without deterministic.
    torch.backends.cudnn.benchmark = device.type == "cuda" and not cfg.train.deterministic
    # TF32 (CUDA only; ledger W18): cuDNN convolutions as train.tf32 says; matmuls never (PyTorch's default,
    # also enforced where the environment turned it on, e.g. TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1).
    torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    if cfg.train.amp == "fp16" and device.type != "cuda":
        raise UserError("train.amp=fp16 needs a CUDA device; on CPU use train.amp=bf16 or none")
    return device


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def autocast(cfg: RunConfig, device: torch.device):
    if cfg.train.amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.train.amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def prepare_images(images: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    if cfg.train.channels_last:
        return images.contiguous(memory_format=torch.channels_last)
    return images


# ----------------------------------------------------------------------------------- optimizer
def check_param_groups(method: nn.Module, groups: list[dict]) -> None:
    """Every trainable parameter in exactly one group (cheap insurance that e.g. the importance
    logits are not silently left out of the optimizer)."""
    names = {id(p): n for n, p in method.named_parameters()}
    seen: dict[int, str] = {}
    for g in groups:
        for p in g["params"]:
            if id(p) not in names:
                raise RuntimeError(f"group '{g['name']}' holds a parameter that is not part of the method")
            if id(p) in seen:
                raise RuntimeError(f"parameter {names[id(p)]} is in groups '{seen[id(p)]}' and '{g['name']}'")
            seen[id(p)] = g["name"]
    missing = [n for n, p in method.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise RuntimeError(f"trainable parameters in no optimizer group: {', '.join(missing[:5])}")


def build_optimizer(method, cfg: RunConfig) -> torch.optim.Optimizer:
    groups = method.param_groups()
    check_param_groups(method, groups)
    torch_groups = [
        {"params": g["params"], "lr": cfg.optim.lr * g.get("lr_mult", 1.0), "weight_decay": g["weight_decay"],
         "name": g["name"]}
        for g in groups if g["params"]
    ]
    return torch.optim.SGD(torch_groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov)


def lr_factor(cfg: RunConfig, step: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (updated every step)."""
    epoch_float = step / steps_per_epoch
    warm = cfg.optim.warmup_epochs
    if warm > 0 and epoch_float < warm:
        return (step + 1) / (warm * steps_per_epoch)
    if cfg.optim.schedule == "constant":
        return 1.0
    if cfg.optim.schedule == "step":
        return cfg.optim.gamma ** sum(1 for m in cfg.optim.milestones if epoch_float >= m)
    total = max(1, cfg.epochs * steps_per_epoch - warm * steps_per_epoch)
    t = min(1.0, (step - warm * steps_per_epoch) / total)
    return 0.5 * (1.0 + math.cos(math.pi * t))


def train_step(method, optimizer, scaler, images, targets, cfg: RunConfig, device: torch.device, forward=None):
    """One optimizer step of any method (also what the benchmarks time). ``forward`` stands in for
    ``method.forward_train``: the DistributedDataParallel wrapper in a multi-process run."""
    forward = forward if forward is not None else method.forward_train
    with autocast(cfg, device):
        logits, losses = forward(prepare_images(images, cfg), targets)
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return logits, losses, loss


# ---------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_model(model: nn.Module, batches, cfg: RunConfig, device: torch.device) -> dict:
    was_training = model.training
    model.eval()
    correct1 = torch.zeros((), dtype=torch.long, device=device)
    correct5 = torch.zeros((), dtype=torch.long, device=device)
    n = 0
    for images, targets in batches:
        with autocast(cfg, device):
            logits = model(prepare_images(images, cfg))
        k = min(5, logits.shape[1])
        topk = logits.float().topk(k, dim=1).indices
        hits = topk.eq(targets[:, None])
        correct1 += hits[:, 0].sum()
        correct5 += hits.any(dim=1).sum()
        n += targets.shape[0]
    model.train(was_training)
    if n == 0:
        return {"top1": float("nan"), "top5": float("nan"), "n": 0}
    return {"top1": 100.0 * correct1.item() / n, "top5": 100.0 * correct5.item() / n, "n": n}


def load_student(run_dir: Path, device: torch.device) -> tuple[nn.Module, dict]:
    """The run's selected student from its verified ``model.pt`` (see :mod:`cmtkd.checkpoint`); for a
    teachers-only run, its fused teachers (rebuilt by the method that saved them)."""
    blob = checkpoint.load_model(run_dir / MODEL, REBUILD_MODEL)
    if checkpoint.is_network_set(blob["arch_config"]):
        model = get_method(str(blob["method"])).network_from_model_file(blob, run_dir / MODEL, REBUILD_MODEL)
    else:
        model = checkpoint.build_network(blob, run_dir / MODEL, REBUILD_MODEL)
    return model.to(device), blob


def finished_outputs_problem(run_dir: Path, chash: str, epochs: int) -> str | None:
    """Why a run whose checkpoint reached the last epoch is not complete yet (None if it is):
    ``model.pt`` must load, verify and be of this configuration; ``metrics.json`` must verify;
    ``history.csv`` (not sealed) must hold one well-formed row per epoch."""
    try:
        blob = checkpoint.load_model(run_dir / MODEL, REBUILD_MODEL)
        read_sealed_json(run_dir / "metrics.json", REBUILD_METRICS)
    except UserError as exc:
        return str(exc).split(";")[0]
    if blob["config_hash"] != chash:
        return f"model file {run_dir / MODEL} was written for another configuration"
    try:  # evaluate checks model.pt against config.yaml: an edited config.yaml is rewritten by the rebuild
        if config_hash(load_run_config(run_dir)) != chash:
            return f"{run_dir / 'config.yaml'} is not this run's configuration (edited)"
    except UserError as exc:
        return str(exc).split(";")[0]
    return history_problem(run_dir / "history.csv", epochs)


# The history columns _epoch_row writes in every row, always finite (it refuses a diverged epoch); other
# columns (validation, a method's scalars) may be absent or empty in some rows.
HISTORY_NUMBERS = ("lr", "time_s", "images_per_s", "train_top1", "loss")


def history_problem(path: Path, epochs: int) -> str | None:
    """Why ``history.csv`` is not the log of ``epochs`` finished epochs (None if it is): as the trainer
    writes it, a header with ``epoch`` and one row per epoch, every row as long as the header, epochs
    1..``epochs`` in order, and the columns of HISTORY_NUMBERS finite numbers. One line, naming the file."""
    import csv

    try:
        rows = list(csv.reader(read_regular_file(path).decode().splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return f"{path} is missing or unreadable ({getattr(exc, 'strerror', None) or type(exc).__name__})"
    edited = f"is not the log of {epochs} epochs (truncated or edited)"
    if not rows or "epoch" not in rows[0]:
        return f"{path} {edited}: no 'epoch' column in its header"
    header = rows[0]
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            return f"{path} {edited}: line {line} has {len(row)} fields, the header {len(header)}"
        if row[header.index("epoch")] != str(line - 1):
            return f"{path} {edited}: line {line} has epoch {row[header.index('epoch')]!r}, not {line - 1}"
        for column in (c for c in HISTORY_NUMBERS if c in header):
            try:
                finite = math.isfinite(float(row[header.index(column)]))
            except ValueError:
                finite = False
            if not finite:
                return f"{path} {edited}: line {line} has {column} {row[header.index(column)]!r}, not a number"
    if len(rows) != epochs + 1:
        return f"{path} {edited}: it holds {len(rows) - 1} rows"
    return None


def check_model_of_run(run_dir: Path, blob: dict, chash: str) -> None:
    """Refuse a ``model.pt`` written for another configuration than the run's ``config.yaml`` (e.g. copied
    in from another run): its numbers would be reported as this run's. ``chash`` is the hash of config.yaml
    resolved with today's defaults; a run written before some keys existed hashed config.yaml as written,
    so that counts too."""
    saved = blob.get("config_hash")
    if saved != chash and saved != config_hash(load_yaml(Path(run_dir) / "config.yaml")):
        raise UserError(f"{run_dir / MODEL} was written for another configuration than {run_dir / 'config.yaml'} "
                        f"(copied from another run, or the config edited); {REBUILD_MODEL}")


def refuse_run_in_use(run_dir: str | Path) -> None:
    """A one-line :class:`RunBusy` if another process holds ``run_dir``'s :class:`RunLock` (a ``cmtkd train``
    still writing it: its model.pt and metrics.json do not exist yet, and what does exist is not final).

    Only looks: a shared, non-blocking ``flock`` on the lock file if there is one, dropped at once. Nothing
    is created or written (a read-only or finished run directory is fine), and no training that starts
    afterwards is blocked. Problems opening the file are left to the command's own checks."""
    path = Path(run_dir) / LOCK_FILE
    try:
        # O_NOFOLLOW: a planted link is not followed; O_NONBLOCK: a FIFO there does not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return  # no lock file: nobody writes the run (a holder deletes it when it releases the lock)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                return
            text = os.pread(fd, 64, 0).decode(errors="replace").strip()
            holder = text.splitlines()[0] if text else "cmtkd process"
            training = ", which is still training it" if holder.startswith("cmtkd train") else ""
            raise RunBusy(f"{Path(run_dir)} is in use by another {holder}{training}; wait for it to finish, "
                          f"then rerun the command") from None
    finally:
        os.close(fd)  # drops our shared lock, if taken


def evaluate_run(run_dir: str | Path, split: str = "test", threads: int = 0, write: bool = True,
                 data=None, device: str | None = None) -> dict:
    """Standalone evaluation of a finished run's saved student: the number tables use. ``device``
    (cpu | cuda | auto) overrides the run's own ``train.device``, e.g. to evaluate a GPU run on a CPU."""
    run_dir = Path(run_dir)
    check_threads(threads, "threads (--threads)")
    if write:  # (the trainer evaluates its own run, under its own lock, with write=False)
        refuse_run_in_use(run_dir)
    cfg = load_run_config(run_dir)
    trained = config_hash(cfg)  # before this evaluation's own settings: model.pt must match it
    if threads:
        cfg.train.threads = threads
    if device:
        cfg.train.device = device
    elif cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{run_dir} was trained with train.device=cuda and no CUDA device is available here; "
                        f"evaluate it on the CPU with: cmtkd evaluate {run_dir} --device cpu")
    if cfg.train.amp == "fp16" and select_device(cfg.train.device).type != "cuda":
        cfg.train.amp = "none"  # fp16 autocast is CUDA-only: fp32 on the CPU (may differ in the last digits)
    device = setup_runtime(cfg)
    if data is None:
        data = build_data(cfg.data, device)
    model, blob = load_student(run_dir, device)
    check_model_of_run(run_dir, blob, trained)
    if blob["arch_config"]["num_classes"] != data.info.num_classes:
        raise UserError(f"{run_dir / MODEL} has {blob['arch_config']['num_classes']} classes but dataset "
                        f"{cfg.data.name} has {data.info.num_classes}")
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    result = evaluate_model(model, data.eval_batches(split), cfg, device)
    result.update(split=split, run_dir=str(run_dir), selected_epoch=blob.get("selected_epoch"))
    if write:
        target = run_dir / ("eval.json" if split == "test" else f"eval_{split}.json")
        lock = RunLock(run_dir, "cmtkd evaluate")
        try:
            lock.acquire()  # refuses while a `cmtkd train` writes this directory
        except RunBusy:
            raise
        except UserError:
            lock = None  # a directory we cannot even lock in: the write below names the problem
        else:
            remove_stale_temp_files(run_dir)  # e.g. of an evaluation killed mid-write
        try:
            result = write_sealed_json(target, result)
        finally:
            if lock is not None:
                lock.release()
    return result


# ------------------------------------------------------------------------------------ training
def _rng_state() -> dict:
    # numpy's key array as a tensor: checkpoints load with torch.load(weights_only=True), which refuses ndarrays.
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, cuda: bool = True) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if cuda and "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _history_csv(rows: list[dict]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    lines = [",".join(cols)]
    for r in rows:
        lines.append(",".join("" if r.get(c) is None else (f"{r[c]:.6g}" if isinstance(r[c], float) else str(r[c]))
                              for c in cols))
    return "\n".join(lines) + "\n"


class Progress:
    def __init__(self, cfg: RunConfig, total: int, desc: str, enabled: bool = True):
        show = enabled and (cfg.train.progress == "bar" or (cfg.train.progress == "auto" and sys.stderr.isatty()))
        self.bar = None
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self):
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _silent(*args, **kwargs) -> None:
    pass


@dataclass
class TrainState:
    """What a run has accumulated after ``epoch`` finished epochs. With the method, optimizer,
    scheduler, scaler and RNG states it is the content of ``checkpoint.pt`` (:meth:`Run.checkpoint_content`)."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)  # one row per epoch, as in history.csv
    best: dict = field(default_factory=lambda: {"epoch": None, "val_top1": -1.0, "student_state": None})
    train_seconds: float = 0.0
    train_images: int = 0  # over all ranks
    peak_mem: float = 0.0  # MiB, the peak over all ranks


@dataclass
class Run:
    """One training run: its configuration and directory, what trains, and its :class:`TrainState`."""

    cfg: RunConfig
    cfg_dict: dict  # the configuration as it was when the run started (config.yaml, checkpoint)
    chash: str  # its hash
    out: Path
    device: torch.device
    log: Callable[[str], None]
    data: Any  # a cmtkd.data dataset (train/eval batches and info)
    steps: int  # optimizer steps per epoch
    method: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    state: TrainState = field(default_factory=TrainState)
    forward: nn.Module | None = None  # the DistributedDataParallel wrapper; None in a single process
    trackers: Trackers | None = None  # rank 0 only
    replica_tensors: int = 0  # tensors the last cross-rank check compared (0: one process)
    world: int = field(default_factory=distributed.world_size)
    rank: int = field(default_factory=distributed.rank)
    main: bool = field(default_factory=distributed.is_main)

    def checkpoint_content(self) -> dict:
        """The full state after ``state.epoch`` epochs: what resuming needs to continue bit-identically."""
        s = self.state
        return {"epoch": s.epoch, "config": self.cfg_dict, "config_hash": self.chash,
                "method": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": _rng_state(),
                "history": s.history, "best": s.best, "train_seconds": s.train_seconds,
                "train_images": s.train_images, "peak_mem_mib": s.peak_mem, "world_size": self.world,
                "threads": torch.get_num_threads()}

    def restore(self, content: dict) -> None:
        """Load :meth:`checkpoint_content` of an earlier process back into this run."""
        self.method.load_state_dict(content["method"])
        self.optimizer.load_state_dict(content["optimizer"])
        self.scheduler.load_state_dict(content["scheduler"])
        self.scaler.load_state_dict(content["scaler"])
        # Every epoch reseeds, so the ranks need no CUDA generator states (restoring them would touch
        # every GPU of the node from every rank).
        _set_rng_state(content["rng"], cuda=self.world == 1)
        self.state = TrainState(epoch=content["epoch"], history=content["history"], best=content["best"],
                                train_seconds=content["train_seconds"], train_images=content["train_images"],
                                peak_mem=content["peak_mem_mib"])


@dataclass
class EpochTotals:
    """Sums over this rank's steps of one epoch, kept on the device: no host synchronisation per step."""

    correct: torch.Tensor
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # loss terms, then the total "loss"
    seen: int = 0


def train(cfg: RunConfig, out_dir: str | Path, log=print) -> dict:
    """Train ``cfg`` into ``out_dir`` (resuming if it holds a checkpoint); returns metrics.json.

    Started by torchrun with several processes, every process calls this: each trains on its slice of
    every global batch, and rank 0 alone logs and writes ``out_dir``."""
    check_network_size(cfg)  # before anything is allocated or written
    device = setup_runtime(cfg)
    # Checked before any process group or file exists, so a bad setting costs no rendezvous.
    check_logger_packages(cfg.train.loggers)
    check_init_source(cfg)
    check_data_parallel(cfg.data, distributed.launched_world_size())
    if cfg.train.sync_bn:
        distributed.check_sync_bn(device)
    device = distributed.local_device(device)
    with distributed.process_group(device):
        return _train(cfg, Path(out_dir), device, log if distributed.is_main() else _silent)


def _prepare_run_dir(out: Path, lock: RunLock) -> bool:
    """Create (or check) the run directory and lock it; returns whether it was created."""
    created = not out.exists()
    ensure_writable_dir(out)
    lock.acquire()  # one writer per run directory (rank 0 stands for all ranks)
    remove_stale_temp_files(out)  # left by a run killed mid-write; ours only, and no other writer now
    return created


def _train(cfg: RunConfig, out: Path, device: torch.device, log) -> dict:
    lock = RunLock(out, "cmtkd train")
    try:
        return _train_locked(cfg, out, device, log, lock)
    finally:
        lock.release()


def _train_locked(cfg: RunConfig, out: Path, device: torch.device, log, lock: RunLock) -> dict:
    """Train, resume, or (from a final checkpoint) only rebuild the results of the run in ``out``."""
    created = distributed.on_main(lambda: _prepare_run_dir(out, lock))
    ckpt_path = out / CHECKPOINT
    cfg_dict, chash = asdict(cfg), config_hash(cfg)
    # Every rank reads the checkpoint itself: files are written atomically, so none sees half of one.
    ckpt = (checkpoint.load_checkpoint(ckpt_path, lambda saved: config_diff(saved, cfg_dict))
            if ckpt_path.exists() else None)
    if ckpt is not None and ckpt["epoch"] >= cfg.epochs:
        problem = finished_outputs_problem(out, chash, cfg.epochs)
        if problem is None:
            log(f"{out}: already complete (delete the directory to retrain)")
            return read_sealed_json(out / "metrics.json", REBUILD_METRICS)
        log(f"{out}: {problem}; rebuilding the results from the final checkpoint")

    new_config = distributed.is_main() and not (out / "config.yaml").exists()  # this run will write it
    try:
        data = _load_data(cfg, cfg_dict, out, device)
        run = _build_run(cfg, out, device, data, log=log, cfg_dict=cfg_dict, chash=chash)
        if ckpt is not None:
            _resume(run, ckpt)
        else:
            _log_start(run)
        run.forward = distributed.wrap_for_training(run.method, device)
        if run.main:
            run.trackers = Trackers(cfg.train.loggers, out, config=run.cfg_dict, config_hash=run.chash,
                                    start_epoch=run.state.epoch)
        for epoch in range(run.state.epoch, cfg.epochs):
            train_epoch(run, epoch)
        return _finish(run)
    except BaseException:  # e.g. a missing teacher, no space for the first checkpoint, Ctrl-C
        _discard_unstarted_run(out, lock, created, new_config)
        raise


def _discard_unstarted_run(out: Path, lock: RunLock, created: bool, new_config: bool) -> None:
    """Leave the directory of a run that stopped before its first checkpoint as the run found it: the
    config.yaml it wrote is removed (not one that was there before), and so is the directory, if the run
    created it and nothing else is in it now (a user's file or a logger's output keeps it). A run with a
    checkpoint is resumable: it keeps everything."""
    if not distributed.is_main() or (out / CHECKPOINT).exists():
        return
    with contextlib.suppress(OSError):  # a cleanup that cannot be done must not hide the run's own error
        if new_config:
            (out / "config.yaml").unlink(missing_ok=True)
        if created and all(p == lock.path for p in out.iterdir()):
            lock.release()  # deletes the lock file
            out.rmdir()


def _load_data(cfg: RunConfig, cfg_dict: dict, out: Path, device: torch.device):
    """The run's dataset, checked against the process count; then ``config.yaml`` is written."""
    main = distributed.is_main()
    data = build_data(cfg.data, device)
    check_data_parallel(cfg.data, distributed.world_size(), data.info.num_train)
    if main:
        atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg_dict, sort_keys=False))
    if data.steps_per_epoch() < 1:
        raise UserError(f"the training split has fewer images than one batch ({cfg.data.batch_size}); "
                        f"lower data.batch_size")
    return data


def _build_run(cfg: RunConfig, out: Path, device: torch.device, data, **run_fields) -> Run:
    """The method with its optimizer, scheduler and gradient scaler, initialised from ``cfg.seed``."""
    steps = data.steps_per_epoch()
    seed_everything(cfg.seed)  # the same on every rank: identical initial replicas
    method = get_method(cfg.method)(cfg, data.info).to(device)
    if cfg.train.sync_bn:
        method = distributed.convert_sync_batchnorm(method)
    if cfg.train.channels_last:
        method = method.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        # The quantizers are tensor identities, so the whole training forward compiles into fused kernels.
        method.forward_train = torch.compile(method.forward_train)
    optimizer = build_optimizer(method, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step, steps))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
    return Run(cfg=cfg, out=out, device=device, data=data, steps=steps, method=method,
               optimizer=optimizer, scheduler=scheduler, scaler=scaler, **run_fields)


def _log_start(run: Run) -> None:
    cfg, info = run.cfg, run.data.info
    processes = f" x {run.world} processes" if run.world > 1 else ""
    run.log(f"{run.out}: training {cfg.method} {cfg.arch} W{cfg.w_bits}A{cfg.a_bits} on {cfg.data.name} "
            f"({info.num_train} train / {info.num_val} val images, {run.steps} steps/epoch) on "
            f"{device_label(run.device)}{processes}")


def _resume(run: Run, ckpt: dict) -> None:
    try:
        run.restore(ckpt)
    except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as exc:  # e.g. a state dict of another model
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"checkpoint {run.out / CHECKPOINT} does not fit this run ({type(exc).__name__}: "
                        f"{first[:200]}); delete it to train the run from scratch") from None
    if run.main:
        # A kill between the checkpoint and the history write leaves history.csv one epoch behind.
        atomic_write_text(run.out / "history.csv", _history_csv(run.state.history))
    run.log(f"{run.out}: resuming after epoch {run.state.epoch}/{run.cfg.epochs} on {device_label(run.device)}")
    threads = torch.get_num_threads()
    if run.device.type == "cpu" and ckpt.get("threads", threads) != threads:  # (checkpoints before the key: no check)
        run.log(f"{run.out}: the checkpoint was written with {ckpt['threads']} torch thread(s), this process has "
                f"{threads}: CPU kernels split their sums by thread, so the result will differ slightly from an "
                f"uninterrupted run (resume with --threads {ckpt['threads']} to reproduce it bit for bit)")
    if ckpt.get("world_size", 1) != run.world:
        run.log(f"{run.out}: the checkpoint was written by {ckpt.get('world_size', 1)} process(es), this run has "
                f"{run.world}: the result will differ slightly from an uninterrupted run")


def train_epoch(run: Run, epoch: int) -> dict:
    """Train epoch ``epoch`` (0-based), validate, checkpoint; returns the epoch's history row."""
    cfg = run.cfg
    torch.manual_seed(epoch_seed(cfg.seed, epoch))  # dropout & any method-side randomness
    run.method.train()
    totals = EpochTotals(correct=torch.zeros((), dtype=torch.long, device=run.device))
    epoch_lr = run.optimizer.param_groups[0]["lr"]  # the rate the epoch starts with
    bar = Progress(cfg, run.steps, f"epoch {epoch + 1}/{cfg.epochs}", enabled=run.main)
    t0 = time.perf_counter()
    for images, targets in run.data.train_batches(epoch, cfg.seed, rank=run.rank, world_size=run.world):
        train_iter(run, images, targets, totals)
        bar.update()
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    epoch_time = distributed.max_over_ranks(time.perf_counter() - t0)
    bar.close()
    row = _epoch_row(run, epoch, totals, epoch_lr, epoch_time)
    if run.world > 1:
        # Rank 0's BatchNorm running statistics everywhere, then a checksum that nothing else drifted:
        # validation below, and the state rank 0 saves, are then those of every rank.
        distributed.broadcast_buffers(run.method)
        run.replica_tensors = distributed.check_replicas_identical(run.method)
    if run.data.info.num_val > 0:
        for name, model in run.method.eval_models().items():
            row[f"val_top1_{name}"] = evaluate_model(model, run.data.eval_batches("val"), cfg, run.device)["top1"]
    row.update(run.method.log_scalars())
    _record_epoch(run, row)
    shown = "  ".join(f"{k[5:] if k.startswith('loss_') else k} {v:.4g}" for k, v in row.items()
                      if k.startswith("loss") or k.startswith("val_top1"))
    run.log(f"epoch {epoch + 1}/{cfg.epochs}  {shown}  {epoch_time:.1f}s  {row['images_per_s']:.0f} img/s")
    return row


def train_iter(run: Run, images: torch.Tensor, targets: torch.Tensor, totals: EpochTotals) -> None:
    """One optimizer step and learning-rate step; adds its losses and hits to ``totals``."""
    logits, losses, loss = train_step(run.method, run.optimizer, run.scaler, images, targets, run.cfg, run.device,
                                      forward=run.forward)
    run.scheduler.step()
    for k, v in losses.items():
        totals.sums[k] = totals.sums.get(k, 0) + v.detach().float()
    totals.sums["loss"] = totals.sums.get("loss", 0) + loss.detach().float()
    totals.correct += logits.detach().argmax(1).eq(targets).sum()
    totals.seen += targets.shape[0]


def _epoch_row(run: Run, epoch: int, totals: EpochTotals, epoch_lr: float, epoch_time: float) -> dict:
    """The epoch's training numbers over all ranks (adds them to the run's totals); refuses a diverged run.

    Losses are means of the per-rank means (the global mean with equal slices), counts are sums, so
    images_per_s counts global images."""
    names = list(totals.sums)
    means = distributed.all_reduce_mean(torch.stack([totals.sums[k] for k in names]) / run.steps)
    counts = torch.stack([totals.correct, torch.tensor(totals.seen, device=run.device)])
    correct, seen = distributed.all_reduce_sum(counts).tolist()
    run.state.train_seconds += epoch_time
    run.state.train_images += seen
    row = {"epoch": epoch + 1, "lr": epoch_lr, "time_s": epoch_time,
           "images_per_s": seen / epoch_time, "train_top1": 100.0 * correct / max(seen, 1)}
    mean_of = dict(zip(names, means.tolist()))
    row["loss"] = mean_of.pop("loss")
    row.update({f"loss_{k}": v for k, v in mean_of.items()})
    nonfinite = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    if nonfinite:
        raise UserError(f"training diverged at epoch {epoch + 1} ({', '.join(nonfinite)} not finite); "
                        f"lower optim.lr")
    return row


def _record_epoch(run: Run, row: dict) -> None:
    """Add the finished epoch ``row`` to the run's state and (rank 0) to its checkpoint, history and trackers."""
    state = run.state
    state.epoch = row["epoch"]
    state.history.append(row)
    val = row.get("val_top1_student", float("nan"))
    if run.cfg.train.select == "last" or val > state.best["val_top1"]:
        student = run.method.student.state_dict()
        state.best = {"epoch": state.epoch, "val_top1": val,
                      "student_state": {k: v.detach().cpu().clone() for k, v in student.items()}}
    state.peak_mem = max(state.peak_mem, distributed.max_over_ranks(peak_memory_mib(run.device)))
    if run.main:
        checkpoint.save_checkpoint(run.out / CHECKPOINT, run.checkpoint_content())
        atomic_write_text(run.out / "history.csv", _history_csv(state.history))
        run.trackers.log_epoch(row)


def _write_results(run: Run) -> dict:
    """Rank 0: keep only the selected student; evaluate it exactly as `cmtkd evaluate` will."""
    cfg, state = run.cfg, run.state
    checkpoint.save_model(run.out / MODEL, arch_config=run.method.student_arch_config(),
                          state_dict=state.best["student_state"], method=cfg.method,
                          selected_epoch=state.best["epoch"], config_hash=run.chash)
    test = evaluate_run(run.out, "test", write=False, data=run.data)
    metrics = {
        "method": cfg.method, "arch": cfg.arch, "dataset": cfg.data.name, "w_bits": cfg.w_bits,
        "a_bits": cfg.a_bits, "seed": cfg.seed, "epochs": cfg.epochs,
        "top1": test["top1"], "top5": test["top5"], "test_images": test["n"],
        "best_val_epoch": state.best["epoch"], "best_val_top1": state.best["val_top1"], "selection": cfg.train.select,
        "train_seconds": state.train_seconds, "images_per_s": state.train_images / max(state.train_seconds, 1e-9),
        "peak_mem_mib": state.peak_mem, "world_size": run.world, "env": fingerprint(run.device, run.chash),
        **run.method.metadata(), **run.method.init_metadata,
    }
    return write_sealed_json(run.out / "metrics.json", metrics)


def _finish(run: Run) -> dict:
    metrics = distributed.on_main(lambda: _write_results(run))  # the other ranks wait for rank 0's files
    if run.trackers is not None:
        run.trackers.log_final(metrics, run.cfg.epochs)
        run.trackers.close()
    if run.replica_tensors:
        run.log(f"{run.world} processes: all {run.replica_tensors} parameter and buffer tensors identical "
                f"on every rank")
    run.log(f"{run.out}: test top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  "
            f"(epoch {run.state.best['epoch']} selected by {run.cfg.train.select})")
    return metrics
