"""Run a workflow script's ``main(argv)`` from a Snakemake ``script:`` directive.

Every script here is a command-line program first (``python workflow/scripts/X.py --help``); under
Snakemake the rule's input/output/log become the same flags, and output goes to the rule's log.
"""
from __future__ import annotations

import contextlib
import traceback
from collections.abc import Callable


def run_rule(main: Callable[[list[str]], int], argv: list[str], log: str) -> int:
    with open(log, "w") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        try:
            return main(argv)
        except SystemExit as exc:  # argparse errors and explicit exits: keep the message in the log
            if exc.code not in (None, 0) and not isinstance(exc.code, int):
                print(exc.code)
                return 1
            return exc.code or 0
        except Exception:  # noqa: BLE001  (the traceback belongs in the rule's log too)
            traceback.print_exc()
            return 1
