"""Run ``cmtkd train`` for one run of the workflow, then ``cmtkd evaluate`` of it:
``train_run.py train --out DIR [cmtkd train flags] [--nproc_per_node N] [--evaluate]``.

With ``--evaluate`` the finished run's saved student is evaluated on the test split right after the
training, in the same process (``cmtkd evaluate DIR`` -> DIR/eval.json, the number the tables use):
the same standalone evaluation from model.pt as a separate job, without starting Python and torch a
second time (about 3 s a run on a 2-core CPU, a tenth of the default suite's time).

The run directory may hold a checkpoint from before. A checkpoint of the *same* configuration is
kept, so an interrupted run resumes from its last finished epoch. A checkpoint of a *different*
configuration (the suite config changed, so Snakemake reruns the job) is removed first: cmtkd would
otherwise refuse to resume it.

With ``--nproc_per_node N`` (N > 1; config ``gpus_per_job``) the check above runs once, in this
process, and the training itself is then run through torchrun (``python -m torch.distributed.run
--standalone --nproc_per_node N -m cmtkd.cli train ...``) as a child process: one process per GPU,
``data.batch_size`` stays the global batch (cmtkd/engine/distributed.py). ``--threads T`` (the job's
threads) is split between the N processes. This process keeps the job's GPU locks (gpu_slot.py's
inherited descriptors) open until the training and the evaluation have finished.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from cmtkd.checkpoint import CHECKPOINT_FILE
from cmtkd.cli import main as cmtkd_main
from cmtkd.cli import train_config
from cmtkd.config import config_diff, load_yaml
from cmtkd.errors import UserError

USAGE = "usage: train_run.py train --out RUN_DIR [cmtkd train flags] [--nproc_per_node N] [--evaluate]"


def discard_stale_checkpoint(argv: list[str]) -> int:
    run = Path(argv[argv.index("--out") + 1])
    checkpoint, saved = run / CHECKPOINT_FILE, run / "config.yaml"
    if not (checkpoint.exists() and saved.exists()):
        return 0
    try:
        cfg = train_config(argv[1:])  # argv[0] is "train"
        changed = config_diff(load_yaml(saved), asdict(cfg))
    except UserError as exc:
        print(f"cmtkd: error: {exc}", file=sys.stderr)
        return 2
    if changed:
        print(f"{run}: the config changed ({', '.join(changed[:6])}); discarding the old checkpoint", file=sys.stderr)
        checkpoint.unlink()
    return 0


def torchrun_command(argv: list[str], nproc: int) -> list[str]:
    """The torchrun command line of a multi-process run of ``cmtkd train`` (argv starts with 'train')."""
    argv = list(argv)
    if "--threads" in argv:  # the job's threads, shared by its processes
        i = argv.index("--threads") + 1
        argv[i] = str(max(1, int(argv[i]) // nproc))
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "cmtkd.cli", *argv]


def split_nproc(argv: list[str]) -> tuple[int, list[str]]:
    """Take ``--nproc_per_node N`` (anywhere in argv) off the ``cmtkd train`` flags."""
    if "--nproc_per_node" not in argv:
        return 1, argv
    i = argv.index("--nproc_per_node")
    value = argv[i + 1] if i + 1 < len(argv) else ""
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"--nproc_per_node takes a positive integer, not {value!r}")
    return int(value), argv[:i] + argv[i + 2:]


def evaluate_argv(argv: list[str]) -> list[str]:
    """``cmtkd evaluate`` of the run that ``cmtkd train`` argv (starting with 'train') writes."""
    command = ["evaluate", argv[argv.index("--out") + 1]]
    if "--threads" in argv:
        command += ["--threads", argv[argv.index("--threads") + 1]]
    return command


def main(argv: list[str]) -> int:
    evaluate = "--evaluate" in argv
    argv = [a for a in argv if a != "--evaluate"]
    try:
        nproc, argv = split_nproc(argv)
    except ValueError as exc:
        print(f"{USAGE}\n{exc}", file=sys.stderr)
        return 2
    if not argv or argv[0] != "train" or "--out" not in argv:
        print(USAGE, file=sys.stderr)
        return 2
    rc = discard_stale_checkpoint(argv)
    if rc:
        return rc
    if nproc == 1:
        rc = cmtkd_main(argv)
    else:
        command = torchrun_command(argv, nproc)
        print("train_run: " + " ".join(command), file=sys.stderr, flush=True)
        sys.stdout.flush()
        rc = subprocess.run(command, check=False).returncode
    if rc or not evaluate:
        return rc
    sys.stdout.flush()
    return cmtkd_main(evaluate_argv(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
