"""What the workflow scripts share: reading their CSV inputs, writing their outputs, one-line errors,
and running a script's ``main(argv)`` from a Snakemake ``script:`` directive.

Every script here is a command-line program first (``python workflow/scripts/X.py --help``); under
Snakemake the rule's input/output/log become the same flags, and output goes to the rule's log.

A missing, empty, garbled or malformed input file (or an output that cannot be written) is an
:class:`InputError` whose message names the file and what is wrong; a script prints it as one line,
``cmtkd: error: ...`` (:func:`error`), and exits with status 2 (never a traceback), having read its
inputs before writing anything.
"""
from __future__ import annotations

import contextlib
import math
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd

try:
    from cmtkd.errors import UserError
    from cmtkd.files import atomic_write_text, os_error
except ImportError:  # a Python without cmtkd installed: this checkout's (standard library only)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from cmtkd.errors import UserError
    from cmtkd.files import atomic_write_text, os_error


class InputError(UserError, ValueError):
    """A file a workflow script cannot use; the message (one line) names the file and what is wrong."""


def error(exc: Exception | str) -> int:
    """Print ``cmtkd: error: EXC`` (one line) to stderr; the exit status for it (2)."""
    print(f"cmtkd: error: {' '.join(str(exc).split())}", file=sys.stderr)
    return 2


def read_csv(path: str | Path, columns: Iterable[str] = (), numbers: Iterable[str] = (), fix: str = "",
             **options) -> pd.DataFrame:
    """``pd.read_csv(path, **options)`` with the file's problems as one-line :class:`InputError`\\ s: missing or
    unreadable, empty, not CSV text, without one of ``columns``, or a value of a ``numbers`` column (where the
    file has it) that is not a finite number. Empty cells, ``nan`` and ``NaN`` in a ``numbers`` column are
    missing values (NaN), as pandas writes and reads them; such a column comes back as numbers.
    ``fix`` ends the message of a file without a column (e.g. how to rebuild it)."""
    if Path(path).exists() and not Path(path).is_file():  # a FIFO would block, /dev/zero read for ever
        raise InputError(f"{path} is not a regular file")
    try:
        frame = pd.read_csv(path, **options)
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None
    except OSError as exc:
        raise InputError(f"{path} is unreadable ({exc.strerror or exc})") from None
    except pd.errors.EmptyDataError:
        raise InputError(f"{path} is empty (no header line); a CSV file with a header line is expected") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path} is not a readable CSV file ({reason})") from None
    missing = [column for column in columns if column not in frame]
    if missing:
        raise InputError(f"{path} lacks the columns {', '.join(missing)}" + (f"; {fix}" if fix else ""))
    for column in numbers:
        if column in frame:
            frame[column] = _numbers(frame[column], path, column)
    return frame


def _numbers(values: pd.Series, path, column: str) -> pd.Series:
    """``values`` as numbers; InputError names the first row whose value is not a finite number."""
    bad = [i for i, value in enumerate(values) if not _is_number(value)]
    if bad:
        more = f" ({len(bad) - 1} more row(s) like it)" if len(bad) > 1 else ""
        raise InputError(f"{path}: column {column}, data row {bad[0] + 1} (line {bad[0] + 2}): "
                         f"{values.tolist()[bad[0]]!r} is not a number{more}")
    return values if pd.api.types.is_numeric_dtype(values) else values.map(float).astype(float)


def _is_number(value) -> bool:
    """A finite number, or missing (NaN, or the text nan/NaN)."""
    if isinstance(value, bool):
        return False
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    return not math.isinf(number)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (the old file or the new one, never half of one), creating its
    folder; InputError names the file and the reason when it cannot be written."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(str(os_error(path.parent, exc, action="create the folder"))) from None
    try:
        atomic_write_text(path, text)
    except UserError as exc:
        raise InputError(str(exc)) from None


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
