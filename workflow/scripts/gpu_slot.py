"""Run a command on GPUs of its own: ``gpu_slot.py [--count N] [--pool 0,1,2,3] -- COMMAND [ARGS...]``.

Snakemake counts GPUs (``resources: gpu=1`` with ``--resources gpu=N``) but does not say which GPU a
job may use. This wrapper claims ``--count`` (default 1) free GPU ids from the pool by taking an
exclusive ``fcntl.flock`` on ``<lock dir>/gpu<id>.lock`` of each, sets
``CUDA_VISIBLE_DEVICES=<id>[,<id>...]`` and replaces itself with the command. The locks belong to the
open files, which the command inherits, so they are held exactly as long as the command runs and are
released by the kernel however the command ends (even when killed).

Several GPUs are claimed all or nothing: a claimer holds ``<lock dir>/claim.lock`` while it tries
the ids of the pool (in sorted order, without blocking); when fewer than N are free it releases the
ones it got and waits. No job ever holds part of its GPUs while waiting for the rest, so two jobs
that each want N GPUs cannot deadlock.

Pool: ``--pool``, else ``$CMTKD_GPU_POOL``, else the ids in ``$CUDA_VISIBLE_DEVICES``, else every GPU
``nvidia-smi -L`` lists. Lock dir: ``$CMTKD_GPU_LOCK_DIR`` or ``<tmp>/cmtkd-gpu-locks-<uid>``, shared
by every workflow of this user on this machine. Inside a SLURM job the scheduler has already
isolated the job's GPUs, so the command runs unchanged.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def default_pool() -> list[str]:
    for name in ("CMTKD_GPU_POOL", "CUDA_VISIBLE_DEVICES"):
        value = os.environ.get(name, "").strip()
        if value:
            return [v.strip() for v in value.split(",") if v.strip()]
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


def lock_dir() -> Path:
    path = Path(os.environ.get("CMTKD_GPU_LOCK_DIR") or Path(tempfile.gettempdir()) / f"cmtkd-gpu-locks-{os.getuid()}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _gpu_order(gpu: str) -> tuple:
    return (0, int(gpu), "") if gpu.isdigit() else (1, 0, gpu)


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def claim(pool: list[str], count: int = 1, poll_s: float = 2.0) -> tuple[list[str], list[int]]:
    """Block until ``count`` GPUs of the pool are free at once; return their ids and the fds holding
    their locks. All or nothing: partial claims are released before waiting."""
    folder, waiting = lock_dir(), False
    ordered = sorted(dict.fromkeys(pool), key=_gpu_order)
    while True:
        gate = os.open(folder / "claim.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(gate, fcntl.LOCK_EX)  # one claimer at a time looks at the pool (held briefly)
            gpus, fds = [], []
            for gpu in ordered:
                fd = _try_lock(folder / f"gpu{gpu}.lock")
                if fd is not None:
                    gpus.append(gpu)
                    fds.append(fd)
                    if len(gpus) == count:
                        break
            if len(gpus) == count:
                for fd in fds:
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                return gpus, fds
            for fd in fds:  # not enough: hold nothing while waiting
                os.close(fd)
        finally:
            os.close(gate)  # releases the gate (it is never inherited by the command)
        if not waiting:
            print(f"gpu_slot: fewer than {count} of the GPUs {','.join(ordered)} are free; waiting", file=sys.stderr)
            waiting = True
        time.sleep(poll_s * random.uniform(0.75, 1.25))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n")[0])
    parser.add_argument("--count", type=int, default=1, help="number of GPUs to claim at once (default 1)")
    parser.add_argument("--pool", help="comma-separated GPU ids to choose from (default: see module doc)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (gpu_slot.py -- COMMAND ...)")
    if args.count < 1:
        parser.error(f"--count {args.count}: claim at least one GPU")
    if os.environ.get("SLURM_JOB_ID") and os.environ.get("CUDA_VISIBLE_DEVICES") and not args.pool:
        os.execvp(command[0], command)  # the scheduler already gave this job its own GPU(s)
    pool = args.pool.split(",") if args.pool else default_pool()
    if not pool:
        print("gpu_slot: no GPU found (nvidia-smi -L lists none); set CMTKD_GPU_POOL=0,1,... or "
              "run the workflow with gpu: false", file=sys.stderr)
        return 1
    if args.count > len(set(pool)):
        print(f"gpu_slot: {args.count} GPUs wanted but the pool {','.join(pool)} has only {len(set(pool))}; "
              f"lower gpus_per_job or set CMTKD_GPU_POOL", file=sys.stderr)
        return 1
    gpus, fds = claim(pool, args.count)
    for fd in fds:
        os.set_inheritable(fd, True)  # the command keeps the locks until it exits
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    print(f"gpu_slot: CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}", file=sys.stderr)
    os.execvp(command[0], command)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
