"""Hardening II: ``cmtkd.load_run`` checks history.csv as ``cmtkd train`` does (one well-formed row per
epoch, or a one-line error naming the file and the fix), and the workflow's importer of external results
refuses a ragged CSV row in one line naming the file and the line."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

import cmtkd
from cmtkd.engine.trainer import _history_csv, history_problem
from cmtkd.errors import UserError
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "workflow" / "scripts"))
import checks  # noqa: E402


# ------------------------------------------------------------------------- load_run: history.csv
def history_lines(run: Path) -> list[str]:
    return (run / "history.csv").read_text().splitlines()


def write_history(run: Path, lines: list[str]) -> None:
    (run / "history.csv").write_text("\n".join(lines) + "\n")


def refused(run: Path, *needles: str) -> str:
    with pytest.raises(UserError) as error:
        cmtkd.load_run(run)
    message = str(error.value)
    assert "\n" not in message and str(run / "history.csv") in message, message
    assert "rerun the same `cmtkd train` command (same --out)" in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_load_run_of_the_untouched_run_has_one_history_row_per_epoch(reference_run):
    run = cmtkd.load_run(reference_run)
    assert list(run.history["epoch"]) == [1, 2, 3] == list(range(1, run.config.epochs + 1))
    assert history_problem(reference_run / "history.csv", run.config.epochs) is None


def test_load_run_refuses_a_truncated_history(reference_run, copy_run):
    run = copy_run(reference_run)
    lines = history_lines(run)
    assert len(lines) == 4  # header + 3 epochs
    write_history(run, lines[:3])  # 2 of 3 epochs
    refused(run, "2 rows", "3 epochs")


@pytest.mark.parametrize("last", ["empty-epoch", "nan-epoch", "all-empty", "all-nan", "nan-loss"])
def test_load_run_refuses_a_history_whose_last_row_is_not_an_epoch(last, reference_run, copy_run):
    run = copy_run(reference_run)
    lines = history_lines(run)
    header, cells = lines[0].split(","), lines[-1].split(",")
    if last == "empty-epoch":
        cells[header.index("epoch")] = ""
    elif last == "nan-epoch":
        cells[header.index("epoch")] = "nan"
    elif last == "all-empty":
        cells = [""] * len(header)
    elif last == "all-nan":
        cells = ["nan"] * len(header)
    else:
        cells[header.index("loss")] = "nan"
    write_history(run, [*lines[:-1], ",".join(cells)])
    refused(run, "line 4")


@pytest.mark.parametrize("epochs", ["3,2,1", "0,1,2", "1,2,2", "1,x,3"])
def test_load_run_refuses_a_history_whose_epochs_are_not_1_to_n(epochs, reference_run, copy_run):
    run = copy_run(reference_run)
    lines = history_lines(run)
    column = lines[0].split(",").index("epoch")
    numbers = epochs.split(",")
    rows = []
    for line, number in zip(lines[1:], numbers):
        cells = line.split(",")
        cells[column] = number
        rows.append(",".join(cells))
    write_history(run, [lines[0], *rows])
    refused(run)


@pytest.mark.parametrize("where", ["longer", "shorter"])
def test_load_run_refuses_a_ragged_history_row(where, reference_run, copy_run):
    run = copy_run(reference_run)
    lines = history_lines(run)
    lines[2] = lines[2] + ",1.5" if where == "longer" else lines[2].rsplit(",", 1)[0]
    write_history(run, lines)
    refused(run)


def test_load_run_refuses_a_missing_history(reference_run, copy_run):
    run = copy_run(reference_run)
    (run / "history.csv").unlink()
    refused(run, "missing")


def test_histories_the_trainer_writes_pass_with_empty_cells_in_other_columns(tmp_path):
    """Columns that some epochs do not log (e.g. a method scalar from a later epoch on) are empty cells: fine."""
    base = {"lr": 0.1, "time_s": 1.0, "images_per_s": 100.0, "train_top1": 50.0, "loss": 1.5}
    rows = [{"epoch": 1, **base}, {"epoch": 2, **base, "pi_layer1": 0.5}, {"epoch": 3, **base, "val_top1_student": 9.0}]
    path = tmp_path / "history.csv"
    path.write_text(_history_csv(rows))
    assert ",," in path.read_text()
    assert history_problem(path, 3) is None
    assert history_problem(path, 4) is not None


def test_train_rebuilds_a_history_with_a_nan_epoch(reference_run, copy_run):
    """The same check decides whether `cmtkd train` calls the run complete: it rebuilds the history instead."""
    from test_faults import run_here

    from conftest import tiny_args

    run = copy_run(reference_run)
    before = (run / "history.csv").read_bytes()
    lines = history_lines(run)
    write_history(run, [*lines[:-1], ",".join(["nan"] * len(lines[0].split(",")))])
    proc = run_here("train", *tiny_args(), "--out", str(run))
    assert proc.returncode == 0 and "rebuilding the results from the final checkpoint" in proc.stdout, proc.stderr
    assert (run / "history.csv").read_bytes() == before
    assert list(cmtkd.load_run(run).history["epoch"]) == [1, 2, 3]


# --------------------------------------------------------------------- external results: ragged rows
HEADER = "method,dataset,arch,w_bits,a_bits,seed,top1,source\n"
GOOD = ("lq-nets,cifar100,alexnet,2,2,0,61.1,LQ\n"
        'lq-nets,cifar100,alexnet,2,2,1,61.7,"a paper, with a comma"\n')


def external(tmp_path: Path, rows: str, name: str = "theirs.csv") -> Path:
    path = tmp_path / "results" / "external" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + rows)
    return path


@pytest.mark.parametrize("rows,line,saw", [
    (GOOD + "lq-nets,cifar100,alexnet,2,2,2,61.9,LQ,extra\n", 4, 9),  # pandas: ParserError over two lines
    ("lq-nets,cifar100,alexnet,2,2,2,61.9,LQ,extra\n" + GOOD, 2, 9),  # pandas: silently an index column
    (GOOD + "lq-nets,cifar100,alexnet,2,2,2,61.9\n", 4, 7),           # pandas: silently NaN
    ("lq-nets,cifar100,alexnet,2,2,3,61.9,LQ\n\n" + GOOD.replace(",LQ\n", "\n", 1), 4, 7),  # after a blank line
])
def test_external_csv_with_a_ragged_row_is_one_line_naming_the_line(tmp_path, rows, line, saw):
    path = external(tmp_path, rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(checks.InputError) as error:
            checks.read_external([str(path)])
    message = str(error.value)
    assert "\n" not in message, message
    assert f"{path}: line {line} has {saw} fields, the header 8" in message, message
    assert checks.EXTERNAL_HELP in message, message


def test_a_valid_external_csv_still_reads_without_warnings(tmp_path):
    path = external(tmp_path, GOOD)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a pandas ParserWarning would fail here
        frame = checks.read_external([str(path)])
    assert list(frame["seed"]) == [0, 1] and list(frame["source"]) == ["LQ", "a paper, with a comma"]
    assert list(frame["method"]) == ["lq-nets", "lq-nets"] and list(frame["top1"]) == [61.1, 61.7]
