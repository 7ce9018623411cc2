"""Compare a rerun of the reference suite with the committed reference results, cell by cell.

    reference_check.py targets [--reference results/reference] [--cells alexnet:W2A2:qat,alexnet:W2A2:cmtkd]
                               [--seeds 0,1]
    reference_check.py compare RERUN [--reference results/reference] [--out-dir DIR] [--per-cell]
                               [--tolerance 0.5]
    make reference-check [CELLS=...|all] [SEEDS=...]      (targets, the rerun, compare: README)

``targets`` prints the run directories' ``eval.json`` of the chosen cells of the committed
``runs.csv`` (its ``run_dir`` column), one per line: the Snakemake targets that rerun exactly those
runs (and the teachers they load) of ``config/reference.yaml`` in a fresh working directory. A cell
is ``ARCH:BITS:METHOD`` (``*`` matches anything; fp is ``W32A32``); ``all`` is every cell.

``compare`` reads RERUN (a suite's working directory, a folder holding ``runs.csv``, or a
``runs.csv``; only some cells and fewer seeds are fine) and, for every cell (method, dataset, arch,
W/A, teacher set) of RERUN that the reference has, reports both means ± 95 % t intervals with their
seed counts, how many seeds both have gave the identical top-1, whether both ran the same training
config (``config_hash`` per seed), and whether they agree:

1. every rerun seed is a reference seed with the identical top-1 -> agree (``identical``): on the
   same CPU and torch, the same seed must give the same number;
2. otherwise, both cells with >= 2 seeds: the interval of mean(rerun) − mean(reference) by Welch's t
   (unequal variances) contains 0;
3. one rerun seed against >= 2 reference seeds: the rerun value lies in the reference cell's
   prediction interval mean ± t(n − 1) · s · √(1 + 1/n) (where one new run of the cell should fall);
4. one reference seed: |Δ| <= --tolerance points (default TOLERANCE_PP; no spread to judge by).

The intervals' confidence is 95 % for the whole check (Bonferroni: 1 − 0.05 / m per cell for m
compared cells), so a rerun that differs from the reference only by seed-to-seed noise passes with
probability >= 95 % however many cells it has; ``--per-cell`` uses 95 % per cell instead. A cell
whose runs were trained with another config than the reference's (different ``config_hash`` for the
same seed) does not agree: it is not a rerun. Rerun cells the reference lacks are listed, not failed.

Exit status: 0 every compared cell agrees, 1 some do not, 2 nothing to compare (one line:
``cmtkd: error: ...``; missing files, wrong columns, no overlap).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_suites  # noqa: E402
import seed_stats  # noqa: E402
from script_io import UserError, error, write_text  # noqa: E402

try:
    from cmtkd.files import sha256_file
except ImportError:  # a Python without cmtkd installed: this checkout's (standard library only)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from cmtkd.files import sha256_file

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "results" / "reference"
CELL = compare_suites.CELL
TOLERANCE_PP = 0.5  # rule 4: a committed cell with one seed; 0.5 points = 5 of the 1,000 digits test images
FAMILY_CONFIDENCE = seed_stats.CONFIDENCE
OUT_NAMES = tuple(f"reference_check.{ext}" for ext in ("csv", "md"))
CELL_SPEC = re.compile(r"^([^:\s]+):([^:\s]+):([^:\s]+)$")


class CheckError(ValueError):
    """Nothing to compare; the message names the file or argument and the fix."""


# ------------------------------------------------------------------------------------- reading
def runs_file(path: str | Path) -> Path:
    """A runs.csv, a folder holding one (results/reference/), or a suite's working directory."""
    path = Path(path)
    if path.is_dir() and (path / "runs.csv").is_file():
        return path / "runs.csv"
    return path if path.suffix == ".csv" else path / "results" / "runs.csv"


def load_runs(path: str | Path) -> pd.DataFrame:
    """The grid runs (role grid) of a runs.csv; one row per (cell, seed)."""
    try:
        runs = compare_suites.read_runs(str(runs_file(path)))
    except (OSError, UserError) as exc:  # a file that is missing or not a runs.csv (script_io.InputError)
        raise CheckError(str(exc)) from None
    if "role" in runs:  # read_runs keeps every row (teachers, variants); the reference compares grid runs
        runs = runs[runs["role"] == "grid"]
    duplicated = runs[runs.duplicated([*CELL, "seed"], keep=False)]
    if not duplicated.empty:
        first = duplicated.iloc[0]
        raise CheckError(f"{runs_file(path)} has {len(duplicated)} rows for the same run, e.g. "
                         f"{cell_name(first)} seed {first['seed']}; keep one row per cell and seed")
    return runs


def cell_name(row) -> str:
    return f"{row['arch']}:W{row['w_bits']}A{row['a_bits']}:{row['method']}"


# ------------------------------------------------------------------------------------- targets
def parse_cells(spec: str) -> list[tuple[str, str, str]] | None:
    """``'alexnet:W2A2:qat, resnet18:*:cmtkd'`` -> [(arch, BITS, method), ...]; ``all`` -> None."""
    items = [item for item in re.split(r"[,\s]+", spec.strip()) if item]
    if items in ([], ["all"]):
        return None
    cells = []
    for item in items:
        match = CELL_SPEC.match(item)
        if not match:
            raise CheckError(f"cell {item!r}: write ARCH:BITS:METHOD, e.g. alexnet:W2A2:qat ('*' matches "
                             f"anything, fp is W32A32), several separated by commas, or 'all'")
        arch, bits, method = match.groups()
        cells.append((arch, bits.upper(), method))
    return cells


def select(runs: pd.DataFrame, cells: list[tuple[str, str, str]] | None, seeds: list[int] | None) -> pd.DataFrame:
    """The runs of the chosen cells and seeds; each cell pattern must match a run."""
    chosen = pd.Series(cells is None, index=runs.index)
    names = runs.apply(cell_name, axis=1)
    for arch, bits, method in cells or []:
        pattern = f"{arch}:{bits}:{method}"
        hit = names.map(lambda name: all(p in ("*", n) for p, n in zip(pattern.split(":"), name.split(":"))))
        if not hit.any():
            raise CheckError(f"cell {pattern} is not in the reference; its cells: {', '.join(sorted(set(names)))}")
        chosen |= hit
    if seeds is not None:
        missing = sorted(set(seeds) - set(runs["seed"]))
        if missing:
            raise CheckError(f"seed(s) {missing} are not in the reference; its seeds: {sorted(set(runs['seed']))}")
        chosen &= runs["seed"].isin(seeds)
    return runs[chosen]


def targets(reference: pd.DataFrame, cells: str, seeds: str | None) -> list[str]:
    if "run_dir" not in reference:
        raise CheckError("the reference runs.csv has no run_dir column; republish it (publish_results.py)")
    chosen = select(reference, parse_cells(cells), parse_seeds(seeds))
    return [f"{run_dir}/eval.json" for run_dir in chosen["run_dir"]]


def parse_seeds(text: str | None) -> list[int] | None:
    if text is None or not text.strip() or text.strip() == "all":
        return None
    try:
        return [int(s) for s in re.split(r"[,\s]+", text.strip()) if s]
    except ValueError:
        raise CheckError(f"--seeds {text!r}: give seed numbers separated by commas, e.g. 0,1") from None


# ------------------------------------------------------------------------------------- compare
def judge(reference: dict[int, float], rerun: dict[int, float], confidence: float,
          tolerance: float) -> tuple[bool, str, float]:
    """(agree, rule, half-width of the interval the rule used) for one cell's {seed: top1} values."""
    same = [s for s in rerun if s in reference and round(rerun[s] - reference[s], seed_stats.DECIMALS) == 0]
    if len(same) == len(rerun):
        return True, "identical", math.nan
    ref, new = seed_stats.spread(list(reference.values())), seed_stats.spread(list(rerun.values()))
    diff = round(new.mean - ref.mean, seed_stats.DECIMALS)
    if ref.n == 1:
        return abs(diff) <= tolerance, f"|Δ| ≤ {tolerance:g} (one reference seed)", tolerance
    if new.n == 1:
        half = seed_stats.prediction_half_width(ref.std, ref.n, confidence)
        return abs(diff) <= round(half, seed_stats.DECIMALS), "prediction interval", half
    half = seed_stats.welch_half_width(ref, new, confidence)
    return abs(diff) <= round(half, seed_stats.DECIMALS), "Welch interval of Δ", half


def config_match(ref_rows: pd.DataFrame, new_rows: pd.DataFrame) -> str:
    """'same' / 'differs' (config_hash of the seeds both have), '–' where unknown."""
    if "config_hash" not in ref_rows or "config_hash" not in new_rows:
        return "–"
    a = dict(zip(ref_rows["seed"], ref_rows["config_hash"]))
    b = dict(zip(new_rows["seed"], new_rows["config_hash"]))
    pairs = [(a[s], b[s]) for s in set(a) & set(b) if not (pd.isna(a[s]) or pd.isna(b[s]))]
    if not pairs:
        return "–"
    return "same" if all(x == y for x, y in pairs) else "differs"


def compare(reference: pd.DataFrame, rerun: pd.DataFrame, per_cell: bool = False,
            tolerance: float = TOLERANCE_PP) -> pd.DataFrame:
    """One row per rerun cell: both sides, identical seeds, config, the rule, and the verdict."""
    groups = list(rerun.groupby(CELL, sort=True))
    known = reference.set_index(CELL).index
    m = sum(1 for cell, _ in groups if cell in known)
    if m == 0:
        raise CheckError(f"no cell of the rerun is in the reference (rerun: "
                         f"{', '.join(sorted({cell_name(r) for _, r in rerun.iterrows()})) or 'no runs'}); "
                         f"rerun cells of config/reference.yaml (make reference-check CELLS=...)")
    confidence = FAMILY_CONFIDENCE if per_cell else 1 - (1 - FAMILY_CONFIDENCE) / m
    rows = []
    for cell, new_rows in groups:
        ref_rows = reference.merge(pd.DataFrame([cell], columns=CELL), on=CELL)
        rows.append(cell_row(dict(zip(CELL, cell)), ref_rows, new_rows, confidence, tolerance))
    return pd.DataFrame(rows)


def cell_row(cell: dict, ref_rows: pd.DataFrame, new_rows: pd.DataFrame, confidence: float,
             tolerance: float) -> dict:
    new = dict(zip(new_rows["seed"], new_rows["top1"]))
    new_spread = seed_stats.spread(list(new.values()))
    row = {**cell, "rerun": compare_suites.fmt(new_spread.mean, new_spread.ci95), "n rerun": new_spread.n}
    if ref_rows.empty:
        return {**row, "reference": "–", "n reference": 0, "agree": "not in reference"}
    ref = dict(zip(ref_rows["seed"], ref_rows["top1"]))
    ref_spread = seed_stats.spread(list(ref.values()))
    shared = sorted(set(ref) & set(new))
    identical = sum(round(new[s] - ref[s], seed_stats.DECIMALS) == 0 for s in shared)
    agree, rule, half = judge(ref, new, confidence, tolerance)
    config = config_match(ref_rows, new_rows)
    verdict = "no (config differs)" if config == "differs" else ("yes" if agree else "no")
    statistical = rule != "identical" and "one reference" not in rule
    return {**row, "reference": compare_suites.fmt(ref_spread.mean, ref_spread.ci95), "n reference": ref_spread.n,
            "Δ": f"{new_spread.mean - ref_spread.mean:+.2f}",
            "allowed |Δ|": "–" if math.isnan(half) else f"{half:.2f}", "rule": rule,
            "confidence": f"{confidence:.4g}" if statistical else "–",
            "identical seeds": f"{identical} of {len(shared)}", "config": config, "agree": verdict}


COLUMNS = ["method", "dataset", "arch", "w_bits", "a_bits", "teacher_bits", "reference", "n reference", "rerun",
           "n rerun", "Δ", "allowed |Δ|", "rule", "confidence", "identical seeds", "config", "agree"]


def summary(table: pd.DataFrame) -> tuple[str, int]:
    compared = table[table["agree"] != "not in reference"]
    failed = compared[compared["agree"] != "yes"]
    extra = len(table) - len(compared)
    identical = int((compared["rule"] == "identical").sum())
    text = (f"{len(compared)} cell(s) compared: {len(compared) - len(failed)} agree ({identical} identical seed for "
            f"seed), {len(failed)} do not" + (f"; {extra} rerun cell(s) not in the reference (not compared)"
                                              if extra else ""))
    return text, 0 if failed.empty else 1


def fingerprint_notes(reference: str | Path) -> list[str]:
    """Config layers of the reference's FINGERPRINT.json (publish_results.py) that differ from this checkout's."""
    path = runs_file(reference).parent / "FINGERPRINT.json"
    try:
        layers = json.loads(path.read_text())["suite"]["config_layers"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"note: no readable {path}; cannot tell which config made the reference"]
    notes = []
    for layer in layers:
        file = ROOT / layer["file"]
        if not file.is_file() or sha256_file(file) != layer["sha256"]:
            notes.append(f"note: {layer['file']} is not the one the reference was made with (FINGERPRINT.json); "
                         f"runs it changes are trained with another config and cannot agree")
    return notes


def write_outputs(table: pd.DataFrame, text: str, out_dir: Path) -> None:
    write_text(out_dir / OUT_NAMES[0], table.to_csv(index=False))
    write_text(out_dir / OUT_NAMES[1], text)


def tolerance(text: str) -> float:
    """--tolerance: points, a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected points, a finite number >= 0 (e.g. 0.5); got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    plan = commands.add_parser("targets", help="Snakemake targets that rerun some cells of the reference")
    plan.add_argument("--cells", default="all", help="ARCH:BITS:METHOD,... ('*' wildcards) or all")
    plan.add_argument("--seeds", help="seeds to rerun, e.g. 0,1 (default: all the reference has)")
    check = commands.add_parser("compare", help="compare a rerun with the reference, cell by cell")
    check.add_argument("rerun", help="the rerun: a suite's working directory, or a runs.csv")
    check.add_argument("--out-dir", help=f"also write {' and '.join(OUT_NAMES)} here")
    check.add_argument("--per-cell", action="store_true", help="95 %% intervals per cell (default: 95 %% for "
                                                                "all cells together, Bonferroni)")
    check.add_argument("--tolerance", type=tolerance, default=TOLERANCE_PP,
                       help="allowed |Δ| in points where the reference cell has one seed (default %(default)s)")
    for sub in (plan, check):
        sub.add_argument("--reference", default=str(REFERENCE),
                         help="the committed results: a folder holding runs.csv, or a runs.csv (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        if not runs_file(args.reference).is_file():
            raise CheckError(f"no reference results at {args.reference} (no runs.csv there): make them with "
                             f"`make reference reference-publish`, or pass --reference FOLDER_OR_RUNS_CSV")
        reference = load_runs(args.reference)
        if args.command == "targets":
            print("\n".join(targets(reference, args.cells, args.seeds)))
            return 0
        table = compare(reference, load_runs(args.rerun), args.per_cell, args.tolerance)
        table = table.reindex(columns=COLUMNS).fillna("–")
        text, status = summary(table)
        report = f"{table.to_markdown(index=False, disable_numparse=True)}\n\n{text}\n"
        if args.out_dir:
            write_outputs(table, report, Path(args.out_dir))
    except (CheckError, UserError, ValueError) as exc:
        return error(exc)
    for note in fingerprint_notes(args.reference):
        print(note, file=sys.stderr)
    print(report, end="")
    return status


if __name__ == "__main__":
    sys.exit(main())
