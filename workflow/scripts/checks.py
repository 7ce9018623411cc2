"""Checks of the workflow's inputs, made before any job starts.

    checks.py [--configfile FILE ...] [--config KEY=VALUE ...] [--external CSV ...] [--no-data-check]

runs every check of a suite (what ``snakemake`` checks when the workflow is parsed and before its
first job) and prints the problems, one per line. Used by workflow/rules/common.smk:

- imported results (``results/external/*.csv``), when the workflow is parsed: every row against
  workflow/schemas/runs.schema.yaml, and no two rows for the same run (method, dataset, arch,
  w_bits, a_bits, seed, source), within a file or across files: the tables would average them as
  if they were different seeds;
- before the first job (never on a dry run): the dataset is where ``dataset.root`` says, and every
  training job's ``cmtkd train`` command line is accepted by ``cmtkd train`` itself: the same
  argument parsing and config resolution (``--print-config``), teachers wired in. Resolving a
  config reads no teacher file, so the frozen teachers need not be trained yet.

Importing this module does not import torch (cmtkd is imported by the pre-start check only).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grid  # noqa: E402

RUNS_SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "runs.schema.yaml"
# One run of an imported result; two rows with the same key would be averaged as two seeds.
RUN_KEY = ("method", "dataset", "arch", "w_bits", "a_bits", "seed", "source")
EXTERNAL_HELP = ("imported result files use the columns of results/runs.csv (workflow/schemas/runs.schema.yaml): "
                 "method, dataset, arch, w_bits, a_bits and top1 are required, seed and source recommended")


class InputError(ValueError):
    """An input file the workflow cannot use; the message names the file, the rows and the fix."""


# ---------------------------------------------------------------------------- imported results
def validate_rows(frame: pd.DataFrame, path: str, schema_path: str | Path = RUNS_SCHEMA) -> None:
    """Each row against the runs.csv JSON schema; the first problem names file, line and column."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(yaml.safe_load(Path(schema_path).read_text()))
    for i, record in enumerate(frame.to_dict("records")):
        record = {k: v for k, v in record.items() if not (isinstance(v, float) and math.isnan(v))}
        error = jsonschema.exceptions.best_match(validator.iter_errors(record))
        if error is not None:
            column = ".".join(str(p) for p in error.absolute_path) or "(row)"
            raise InputError(f"{path}: data row {i + 1} (line {i + 2}), column {column}: {error.message}; "
                             f"{EXTERNAL_HELP}")


def check_row_lengths(path: str) -> None:
    """Every row of an imported CSV has as many fields as its header (blank lines aside, as pandas skips them).
    pandas would fill a short row's last columns with NaN, take the first column of a long first row as the
    index (shifting every value one column left), and fail on a later long row in two lines."""
    import csv

    ragged = None
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader, line, header = csv.reader(fh), 1, None
            for row in reader:
                if row and header is None:
                    header = row
                elif row and len(row) != len(header):
                    ragged = (line, len(row), len(header))
                    break
                line = reader.line_num + 1  # where the next row starts (a quoted value may span lines)
    except (ValueError, OSError, csv.Error) as exc:  # (UnicodeDecodeError is a ValueError)
        raise InputError(f"{path}: not a readable CSV ({' '.join(str(exc).split())}); {EXTERNAL_HELP}") from None
    if ragged:
        raise InputError(f"{path}: line {ragged[0]} has {ragged[1]} fields, the header {ragged[2]} (a missing or extra "
                         f"comma, or a value with a comma not in double quotes); {EXTERNAL_HELP}")


def read_external_file(path: str, schema_path: str | Path = RUNS_SCHEMA) -> pd.DataFrame:
    """One imported CSV, validated; ``source`` defaults to the file name, ``teacher_bits`` to none."""
    check_row_lengths(path)
    try:
        frame = pd.read_csv(path, dtype={"teacher_bits": str})
    except (ValueError, OSError) as exc:
        raise InputError(f"{path}: not a readable CSV ({' '.join(str(exc).split())}); {EXTERNAL_HELP}") from None
    validate_rows(frame, path, schema_path)
    for column, default in (("source", Path(path).name), ("teacher_bits", grid.NO_TEACHERS)):
        frame[column] = frame[column] if column in frame else pd.Series(index=frame.index, dtype=object)
        frame[column] = frame[column].fillna(default).astype(str)
    return frame


def show(value) -> str:
    """A key value as written in the CSV (a seed column with gaps is read as floats)."""
    if pd.isna(value):
        return "(none)"
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def duplicate_problems(frame: pd.DataFrame) -> list[str]:
    """Rows of ``frame`` (columns ``_file``, ``_line``) that are the same run by RUN_KEY."""
    keyed = frame.assign(**{c: frame[c] if c in frame else math.nan for c in RUN_KEY})
    problems = []
    for key, group in keyed.groupby(list(RUN_KEY), dropna=False, sort=False):
        if len(group) < 2:
            continue
        files = list(dict.fromkeys(group["_file"]))
        where = "; ".join(f"{f} line{'s' if (group['_file'] == f).sum() > 1 else ''} "
                          + ", ".join(str(n) for n in group[group["_file"] == f]["_line"]) for f in files)
        values = ", ".join(f"{c}={show(v)}" for c, v in zip(RUN_KEY, key))
        top1 = sorted(set(group["top1"]))
        conflict = f" with different top1 ({', '.join(f'{t:g}' for t in top1)})" if len(top1) > 1 else ""
        problems.append(f"{where}: {len(group)} rows for the same run ({values}){conflict}; the tables would "
                        f"average them as separate seeds. Keep one row per run: delete the duplicate, or give "
                        f"each row its own seed (or source)")
    return problems


def read_external(paths: Iterable[str], schema_path: str | Path = RUNS_SCHEMA) -> pd.DataFrame:
    """Every imported CSV, validated and without two rows for one run (InputError otherwise)."""
    frames = []
    for path in paths:
        frame = read_external_file(path, schema_path)
        frames.append(frame.assign(_file=str(path), _line=range(2, len(frame) + 2)))
    if not frames:
        return pd.DataFrame(columns=[*grid.CELL, "top1", "source"])
    external = pd.concat(frames, ignore_index=True)
    problems = duplicate_problems(external)
    if problems:
        raise InputError("imported results (results/external/*.csv):\n  " + "\n  ".join(problems))
    return external.drop(columns=["_file", "_line"])


# ------------------------------------------------------------------------------ before any job
def dataset_problem(config: dict, config_name: str) -> str | None:
    """The dataset is not where ``dataset.root`` says (a dry run never needs it)."""
    data = config["dataset"]
    name, root = data["name"], Path(data.get("root", "data")).expanduser()
    if name not in grid.DATASET_ROOT_FILES or os.environ.get("CMTKD_SKIP_DATA_CHECK"):
        return None
    missing = [root / f for f in grid.DATASET_ROOT_FILES[name] if not (root / f).exists()]
    if not missing or (name == "cifar100" and data.get("download")):
        return None
    layout = {"cifar100": "cifar-100-python/{train,test} (the python version of CIFAR-100)",
              "imagenet": "train/<class>/*.JPEG and val/<class>/*.JPEG (ImageFolder layout)"}[name]
    return (f"config key 'dataset.root' = '{data.get('root', 'data')}': the {name} dataset is not there "
            f"(missing {missing[0]}). Fix: set dataset.root in {config_name} to the folder holding {layout}"
            + (", or set dataset.download: true" if name == "cifar100" else "")
            + ". (Data visible only on the compute nodes? export CMTKD_SKIP_DATA_CHECK=1.)")


def cmtkd_train_error(argv: list[str]) -> str | None:
    """What ``cmtkd train ARGV`` says about its config (None: accepted), from its own code path."""
    from cmtkd.cli import main as cmtkd_main

    printed, said = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(said):
            rc = cmtkd_main(["train", *argv, "--print-config"])
    except SystemExit as exc:  # argparse rejected a flag
        rc = exc.code
    except Exception as exc:  # noqa: BLE001  (a method's check that is not a UserError: still a bad config)
        return f"{type(exc).__name__}: {exc}"
    if rc in (0, None):
        return None
    lines = [line.strip() for line in said.getvalue().splitlines() if line.strip()]
    return (lines[-1] if lines else f"exit status {rc}").removeprefix("cmtkd: error: ")


def expected_hashes(runs: list[dict], train_argv: Callable[[dict], list[str]]) -> list[str]:
    """The config hash each run (grid key) gets from its ``cmtkd train`` arguments, as the trainer records
    it in metrics.json; "" where cmtkd is not importable here (``--sdm conda``) or rejects the run (the
    pre-start check reports that)."""
    try:
        from cmtkd.cli import train_config
        from cmtkd.config import config_hash
        from cmtkd.errors import UserError
    except ImportError:
        return [""] * len(runs)
    hashes = []
    for key in runs:
        try:
            hashes.append(config_hash(train_config(train_argv(key))))
        except (UserError, SystemExit):
            hashes.append("")
    return hashes


def write_grid(runs: list[dict], train_argv: Callable[[dict], list[str]], grid_csv: str, suite_yaml: str,
               config: dict, config_name: str) -> None:
    """results/runs/grid.csv (one row per run, with the config hash it is trained with) and, beside it,
    the resolved suite config the grid was made from."""
    table = pd.DataFrame(runs)
    table["config_hash"] = expected_hashes(runs, train_argv)
    table.to_csv(grid_csv, index=False)
    Path(suite_yaml).write_text(f"# {config_name}\n{yaml.safe_dump(config, sort_keys=False)}")


def run_label(key: dict) -> str:
    variant = key.get(grid.VARIANT)
    return (f"{key['method']} {key['dataset']} {key['arch']} "
            f"{grid.bits_label(int(key['w_bits']), int(key['a_bits']))} teachers {key['teacher_bits']} "
            f"seed {key['seed']}" + (f" variant {variant}" if variant else ""))


def uses_conda(workflow) -> bool:
    """`--sdm conda`: jobs run in workflow/envs/cmtkd.yaml, and Snakemake's own environment needs neither
    torch nor cmtkd (pandas, pyyaml and jsonschema suffice)."""
    try:
        from snakemake.settings.types import DeploymentMethod

        return DeploymentMethod.CONDA in (workflow.deployment_settings.deployment_method or ())
    except (ImportError, AttributeError):  # another Snakemake API: assume no conda
        return False


def cmtkd_problems(config: dict, runs: list[dict], train_argv: Callable[[dict], list[str]],
                   conda: bool = False) -> list[str]:
    """Every distinct rejection by the installed cmtkd of the training jobs ``runs`` (grid keys):
    unregistered methods, and the ``cmtkd train`` arguments (``train_argv(key)``) of each cell
    (a run's setting across seeds) resolved as ``cmtkd train`` resolves them. With ``conda`` (jobs in
    their own environment) a Snakemake without cmtkd skips these checks: each job checks its own config."""
    try:
        from cmtkd.registry import method_names
    except ImportError as exc:
        if conda:
            return []
        return [f"cannot import cmtkd with {sys.executable} ({exc}); install the project (`make install`) and "
                f"run the Snakemake of that environment (.venv/bin/snakemake), or use --sdm conda"]
    registered = set(method_names())
    problems = [f"method '{method}' (config key 'experiments.*.methods') is not registered in the installed cmtkd "
                f"(`cmtkd list`: {', '.join(sorted(registered))}); update cmtkd or remove the method from the config"
                for method in sorted({r["method"] for r in runs} - registered)]
    cells: dict[tuple, list[dict]] = {}  # runs that differ only in their seed resolve alike: one per cell
    for key in runs:
        if key["method"] in registered:
            cells.setdefault(tuple(str(key.get(c, "")) for c in [*grid.CELL, grid.VARIANT]), []).append(key)
    rejected: dict[str, list[dict]] = {}
    for keys in cells.values():
        error = cmtkd_train_error(train_argv(keys[0]))
        if error is not None:
            rejected.setdefault(error, []).extend(keys)
    for error, keys in rejected.items():
        methods = sorted({k["method"] for k in keys})
        archs = sorted({k["arch"] for k in keys})
        more = f" and {len(keys) - 1} more run(s)" if len(keys) > 1 else ""
        varied = ["experiments.*.vary"] if any(k.get(grid.VARIANT) for k in keys) else []
        sections = " / ".join([*(f"method_args.{m}" for m in methods), *(f"arch_method_args.{a}" for a in archs),
                               *varied, "recipe", *(f"arch_recipe.{a}" for a in archs), "dataset"])
        problems.append(f"cmtkd train rejects the run {run_label(keys[0])}{more}: {error} "
                        f"(set from config keys {sections})")
    return problems


def needed_runs(workflow, run_table: pd.DataFrame) -> list[dict]:
    """Grid keys of the runs this invocation will train or evaluate (every run of the grid if unknown)."""
    try:
        jobs = [job for job in workflow.dag.needrun_jobs() if job.rule.name in ("train", "evaluate")]
        keys = {tuple(grid.run_key(job.wildcards_dict).items()) for job in jobs}  # a variant's label too
        return [dict(key) for key in sorted(keys)]
    except Exception:  # noqa: BLE001  (internal API; fall back to checking every run)
        return run_table[key_columns(run_table)].astype(str).to_dict("records")


def key_columns(run_table: pd.DataFrame) -> list[str]:
    """The columns that name a run: the grid's, and the variant in a suite with ``vary``."""
    return [*grid.COLUMNS, *([grid.VARIANT] if grid.VARIANT in run_table else [])]


def preflight(workflow, config: dict, config_name: str, run_table: pd.DataFrame,
              train_argv: Callable[[dict], list[str]]) -> None:
    """Snakemake's onstart: stop before the first job with every problem listed (exit 1)."""
    if workflow.touch:
        return
    runs = needed_runs(workflow, run_table)
    if not runs:
        return
    problems = [p for p in [dataset_problem(config, config_name)] if p] + cmtkd_problems(
        config, runs, train_argv, conda=uses_conda(workflow))
    if problems:
        print(f"cmtkd workflow: cannot start ({config_name}):\n  - " + "\n  - ".join(problems), file=sys.stderr)
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> int:
    from suite_config import SuiteConfigError, load_suite

    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n")[0])
    parser.add_argument("--configfile", nargs="+", default=[], help="config files layered over the default suite")
    parser.add_argument("--config", nargs="+", default=[], metavar="KEY=VALUE", help="overrides on top")
    parser.add_argument("--external", nargs="*", default=None,
                        help="imported results (default: results/external/*.csv)")
    parser.add_argument("--no-data-check", action="store_true", help="do not look for the dataset")
    args = parser.parse_args(argv)
    external = args.external if args.external is not None else sorted(map(str, Path("results/external").glob("*.csv")))
    try:
        config, name = load_suite(args.configfile, args.config)
        read_external(external)
    except (SuiteConfigError, InputError) as exc:
        print(f"cmtkd workflow: error: {exc}", file=sys.stderr)
        return 1
    table = grid.expand(config)
    runs = table[key_columns(table)].to_dict("records")
    run_dir = lambda key: "results/runs/" + "/".join(f"{c}~{key[c]}" for c in grid.COLUMNS)  # noqa: E731
    # (a teacher or fp start: never a variant)
    argv_of = lambda key: grid.train_argv(config, key, [run_dir(k) for k in grid.loaded_runs(  # noqa: E731
        key["method"], key["dataset"], key["arch"], key["teacher_bits"], key["seed"])],
        [run_dir(k) for k in grid.init_runs(config, key)])
    problems = [] if args.no_data_check else [p for p in [dataset_problem(config, name)] if p]
    problems += cmtkd_problems(config, runs, argv_of)
    for problem in problems:
        print(problem)
    print(f"{len(runs)} runs checked: " + ("ok" if not problems else f"{len(problems)} problem(s)"), file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
