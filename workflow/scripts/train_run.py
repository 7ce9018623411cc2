"""Run ``cmtkd train`` for one run of the workflow: ``train_run.py train --out DIR [cmtkd train flags]``.

The run directory may hold a checkpoint from before. A checkpoint of the *same* configuration is
kept, so an interrupted run resumes from its last finished epoch. A checkpoint of a *different*
configuration (the suite config changed, so Snakemake reruns the job) is removed first: cmtkd would
otherwise refuse to resume it.
"""
from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import yaml

from cmtkd.cli import main as cmtkd_main
from cmtkd.config import config_diff


def discard_stale_checkpoint(argv: list[str]) -> int:
    run = Path(argv[argv.index("--out") + 1])
    checkpoint, saved = run / "checkpoint.pt", run / "config.yaml"
    if not (checkpoint.exists() and saved.exists()):
        return 0
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = cmtkd_main([*argv, "--print-config"])
    if rc:
        return rc
    changed = config_diff(yaml.safe_load(saved.read_text()), yaml.safe_load(printed.getvalue()))
    if changed:
        print(f"{run}: the config changed ({', '.join(changed[:6])}); discarding the old checkpoint", file=sys.stderr)
        checkpoint.unlink()
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "train" or "--out" not in argv:
        print("usage: train_run.py train --out RUN_DIR [cmtkd train flags]", file=sys.stderr)
        return 2
    return discard_stale_checkpoint(argv) or cmtkd_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
