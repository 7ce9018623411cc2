"""Run a command on a GPU of its own: ``gpu_slot.py [--pool 0,1,2,3] -- COMMAND [ARGS...]``.

Snakemake counts GPUs (``resources: gpu=1`` with ``--resources gpu=N``) but does not say which GPU a
job may use. This wrapper claims a free GPU id from the pool by taking an exclusive ``fcntl.flock``
on ``<lock dir>/gpu<id>.lock``, sets ``CUDA_VISIBLE_DEVICES=<id>`` and replaces itself with the
command. The lock belongs to the open file, which the command inherits, so it is held exactly as
long as the command runs and is released by the kernel however the command ends (even when killed).

Pool: ``--pool``, else ``$CMTKD_GPU_POOL``, else the ids in ``$CUDA_VISIBLE_DEVICES``, else every GPU
``nvidia-smi -L`` lists. Lock dir: ``$CMTKD_GPU_LOCK_DIR`` or ``<tmp>/cmtkd-gpu-locks-<uid>``, shared
by every workflow of this user on this machine. Inside a SLURM job the scheduler has already
isolated the job's GPUs, so the command runs unchanged.
"""
from __future__ import annotations

import argparse
import fcntl
import os
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


def claim(pool: list[str], poll_s: float = 2.0) -> tuple[str, int]:
    """Block until one GPU of the pool is free; return its id and the fd holding its lock."""
    folder, waiting = lock_dir(), False
    while True:
        for gpu in pool:
            fd = os.open(folder / f"gpu{gpu}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return gpu, fd
        if not waiting:
            print(f"gpu_slot: all GPUs of the pool {','.join(pool)} are busy; waiting", file=sys.stderr)
            waiting = True
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n")[0])
    parser.add_argument("--pool", help="comma-separated GPU ids to choose from (default: see module doc)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (gpu_slot.py -- COMMAND ...)")
    if os.environ.get("SLURM_JOB_ID") and os.environ.get("CUDA_VISIBLE_DEVICES") and not args.pool:
        os.execvp(command[0], command)  # the scheduler already gave this job its own GPU(s)
    pool = args.pool.split(",") if args.pool else default_pool()
    if not pool:
        print("gpu_slot: no GPU found (nvidia-smi -L lists none); set CMTKD_GPU_POOL=0,1,... or "
              "run the workflow with gpu: false", file=sys.stderr)
        return 1
    gpu, fd = claim(pool)
    os.set_inheritable(fd, True)  # the command keeps the lock until it exits
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    print(f"gpu_slot: CUDA_VISIBLE_DEVICES={gpu}", file=sys.stderr)
    os.execvp(command[0], command)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
