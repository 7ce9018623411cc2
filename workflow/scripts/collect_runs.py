"""Collect evaluated runs into ``results/runs.csv`` (one row per run) and ``results/histories.csv``.

    collect_runs.py --grid results/grid.csv --out results/runs.csv --histories results/histories.csv
                    [--finished-only]

Both JSON files must pass their embedded SHA-256 seal (``cmtkd.files``, standard library only): an
edited or damaged result stops the collection with one line naming the file and the fix, as does a
grid.csv or history.csv that is not a CSV with the columns it needs, an accuracy that is not a number,
or an output that cannot be written (``cmtkd: error: ...``, exit status 2; script_io.py).

For every run of the grid: accuracy from its standalone ``eval.json`` (not the training log),
timing, memory and environment from ``metrics.json`` (including the hashes of the teachers it used),
and its ``history.csv`` (one row per epoch) into the long histories table. From the history, each
run also gets ``val_gain_last20`` (points the best validation top-1 rose over the last 20 % of the
epochs) and ``converged`` (that gain below 1 point; empty when unknown): ``seed_stats.convergence``.
With ``--finished-only`` runs without ``eval.json`` are skipped (tables from a partly finished
grid); otherwise a missing run is an error.
"""

import argparse
import math
import re
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grid import COLUMNS as GRID_COLUMNS
from grid import VARIANT
from script_io import error, read_csv, write_text
from seed_stats import VAL_COLUMN, convergence

from cmtkd.errors import UserError
from cmtkd.files import read_sealed_json

KEY = list(GRID_COLUMNS)
COLUMNS = [*KEY, "role", "top1", "top5", "best_val_epoch", "epochs", "val_gain_last20", "converged",
           "train_seconds", "images_per_s", "peak_mem_mib", "torch", "device", "device_name", "git_commit",
           "config_hash", "teacher_hashes", "source", "run_dir"]
_HASH = re.compile(r"^[0-9a-f]{8,64}$")
# Methods renamed after runs were made: method -> (a metrics.json key only the old method wrote, its
# new name). A run of the old method under the old name must not enter the tables as the new method.
RENAMED = {"dml": ("teacher_reduction", "kdcl")}


def teacher_hashes(metrics: dict) -> str:
    """Hashes recorded for the teachers a run used, ';'-joined. Methods record them under keys with
    'teacher' in the name (a string, a list, or a mapping of teacher -> hash/metadata)."""
    found: list[str] = []

    def walk(value):
        if isinstance(value, str) and _HASH.match(value):
            found.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    for key, value in metrics.items():
        if "teacher" in key.lower():
            walk(value)
    return ";".join(found)


def accuracy(result: dict, key: str, path: Path, fix: str, required: bool = True) -> float | None:
    """``result[key]`` as a finite number (None where absent and not ``required``); UserError otherwise."""
    value = result.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{path}: {key} is {value!r}, not a number; {fix}")
    return float(value)


def read_run(row: dict) -> tuple[dict, pd.DataFrame | None]:
    run = Path(row["run_dir"])
    reevaluate = f"re-evaluate the run: cmtkd evaluate {run}"
    retrain = (f"rerun its training (same --out) to rebuild it: snakemake {run}/metrics.json, or cmtkd train ... "
               f"--out {run}")
    evaluation = read_sealed_json(run / "eval.json", reevaluate)
    metrics = read_sealed_json(run / "metrics.json", retrain)
    top1, top5 = (accuracy(evaluation, key, run / "eval.json", reevaluate, key == "top1") for key in ("top1", "top5"))
    logged = accuracy(metrics, "top1", run / "metrics.json", retrain, required=False)
    renamed = RENAMED.get(str(row["method"]))
    if renamed and renamed[0] in metrics:
        raise UserError(f"{run} was trained by the method called {row['method']} before it was renamed "
                        f"{renamed[1]} ({row['method']} is now another method); delete the run directory so that "
                        f"the workflow retrains it (runs of the old method belong under method~{renamed[1]})")
    env = metrics.get("env", {})
    if logged is not None and abs(top1 - logged) > 1e-6:
        print(f"warning: {run}: standalone top-1 {top1:g} differs from the training log's "
              f"{logged:g}; the table uses the standalone number", file=sys.stderr)
    key = run_columns(row)
    record = {k: row[k] for k in key}
    record.update(
        role=row.get("role", "grid"), top1=top1, top5=top5,
        best_val_epoch=metrics.get("best_val_epoch"), epochs=metrics.get("epochs"),
        train_seconds=metrics.get("train_seconds"), images_per_s=metrics.get("images_per_s"),
        peak_mem_mib=metrics.get("peak_mem_mib"), torch=env.get("torch"), device=env.get("device"),
        device_name=env.get("device_name"), git_commit=env.get("git_commit"),
        config_hash=env.get("config_hash"), teacher_hashes=teacher_hashes(metrics), source="ours",
        run_dir=str(run),
    )
    history = None
    if (run / "history.csv").exists():
        history = read_csv(run / "history.csv", columns=["epoch"], numbers=["epoch", VAL_COLUMN], fix=retrain)
        record["val_gain_last20"], record["converged"] = convergence(history)
        for k in reversed(key):
            history.insert(0, k, row[k])
    return record, history


def run_columns(row) -> list[str]:
    """A run's key columns: the grid's, and its variant in a sensitivity study (a grid with ``variant``)."""
    return [*KEY, VARIANT] if VARIANT in row else KEY


def collect(grid: pd.DataFrame, finished_only: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    records, histories, missing = [], [], []
    for row in grid.to_dict("records"):
        if not (Path(row["run_dir"]) / "eval.json").exists():
            missing.append(row["run_dir"])
            continue
        record, history = read_run(row)
        expected = str(row.get("config_hash") or "")  # this suite's hash of the run (grid_table); "" unknown
        if expected and record["config_hash"] != expected:
            print(f"left out {row['run_dir']}: it was trained with another configuration (config hash "
                  f"{record['config_hash']}, {record['epochs']} epochs) than this suite asks for ({expected}); "
                  f"tabulate it with the suite it was run with (its --configfile), or delete it to retrain",
                  file=sys.stderr)
            continue
        records.append(record)
        if history is not None:
            histories.append(history)
    if missing and not finished_only:
        raise SystemExit(f"{len(missing)} run(s) are not evaluated yet, e.g. {missing[0]}; run the workflow "
                         f"(snakemake) or collect only finished runs (--finished-only / `snakemake tables`)")
    if missing:
        print(f"{len(missing)} of {len(grid)} runs not finished yet; collected {len(records)}", file=sys.stderr)
    key = run_columns(grid)
    columns = [*key, *COLUMNS[len(KEY):]]  # the variant (if any) after the seed
    runs = pd.DataFrame(records, columns=columns)
    history = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame(columns=[*key, "epoch"])
    return runs, history


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n")[0])
    parser.add_argument("--grid", required=True, help="results/grid.csv (runs with run_dir and role)")
    parser.add_argument("--out", required=True, help="runs.csv to write")
    parser.add_argument("--histories", required=True, help="histories.csv to write")
    parser.add_argument("--finished-only", action="store_true", help="skip runs without eval.json")
    args = parser.parse_args(argv)
    try:
        grid = read_csv(args.grid, columns=[*GRID_COLUMNS, "run_dir"], fix="write it with the workflow "
                        "(snakemake results/runs/grid.csv)", dtype={"teacher_bits": str, "config_hash": str},
                        keep_default_na=False)
        runs, histories = collect(grid, args.finished_only)
        write_text(args.out, runs.to_csv(index=False))
        write_text(args.histories, histories.to_csv(index=False))
    except UserError as exc:
        return error(exc)
    print(f"{args.out}: {len(runs)} runs; {args.histories}: {len(histories)} epoch rows")
    return 0


if __name__ == "__main__":
    if "snakemake" in globals():  # rule collect_runs (script: directive)
        from script_io import run_rule

        sm = snakemake  # noqa: F821
        status = run_rule(main, ["--grid", sm.input.grid, "--out", sm.output.runs,
                                 "--histories", sm.output.histories], sm.log[0])
        for line in Path(sm.log[0]).read_text().splitlines():  # shown, not only logged: a table lost runs
            if line.startswith("left out "):
                print(line, file=sys.stderr)
        sys.exit(status)
    sys.exit(main())
