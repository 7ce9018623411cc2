"""Compare two finished suites run on the same grid with one setting changed (e.g. the layout study,
config/layout.yaml): for every cell (method, dataset, arch, W/A, teacher set, sensitivity variant) the
test top-1 of each suite (mean ± 95 % t interval over seeds) and the difference B − A paired by seed,
with its interval and a Holm-corrected paired t-test (workflow/scripts/seed_stats.py).

    python workflow/scripts/compare_suites.py studies/layout/conv-inputs studies/layout/block-outputs \\
        --labels conv-inputs block-outputs --out layout-comparison.csv

Each argument is a suite's working directory (the folder holding results/runs.csv) or a runs.csv.

Which runs are compared: the runs an experiment asked for, i.e. role ``grid`` and, in a suite with
sensitivity variants (``experiments.<name>.vary``), role ``variant`` (a level of a varied factor other
than the default). Role ``teacher`` rows are left out: they are the pre-trained teachers, teachers-only
stages and fp starting points that the grid adds for other runs to load (teachers at derived seeds,
1000 x bits + seed), not cells of any experiment; comparing them would only add tests to the Holm family.

A cell is (method, dataset, arch, W/A, teacher set, variant). ``variant`` is the option override of a
variant run (``gamma=10``); empty, NaN or a runs.csv without the column is the default point (no
override). When either suite has the column the table has it too, the default point shown as "–". A
teacher-set level has no variant label: its teacher set tells it apart. The table has every cell of
either suite (a cell only one suite ran shows "–" and n 0 on the other side, verdict "only in <label>").
Two rows of one suite with the same cell and seed are an error: they would be paired as one run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

import seed_stats
from script_io import error, read_csv, write_text

CELL = ["method", "dataset", "arch", "w_bits", "a_bits", "teacher_bits"]
VARIANT = "variant"  # option override of a sensitivity variant run; "" = the default point
COMPARED_ROLES = ("grid", "variant")  # not "teacher": runs the grid adds for others to load
NO_VARIANT = "–"  # how the table shows the default point


def runs_csv(path: str | Path) -> Path:
    """A suite's runs.csv: ``path`` itself, or ``path/results/runs.csv`` for a working directory."""
    file = Path(path)
    return file if file.suffix == ".csv" else file / "results" / "runs.csv"


def read_runs(path: str | Path) -> pd.DataFrame:
    """A suite's runs.csv, every row and column as they are (:func:`comparable` picks the compared rows)."""
    file = runs_csv(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist; give a suite's working directory (or its runs.csv) "
                                f"after the suite has finished")
    return read_csv(file, columns=[*CELL, "seed", "top1"], numbers=["seed", "top1"], fix="is it a cmtkd runs.csv?",
                    dtype={"teacher_bits": str, VARIANT: str})


def comparable(runs: pd.DataFrame, name: str = "runs") -> pd.DataFrame:
    """The rows of a runs table that are compared (roles grid and variant) with a ``variant`` column
    ("" for the default point); ValueError names a (cell, seed) that has more than one row."""
    if "role" in runs:
        runs = runs[runs["role"].isin(COMPARED_ROLES)]
    variant = runs[VARIANT] if VARIANT in runs else pd.Series("", index=runs.index)
    runs = runs.assign(**{VARIANT: variant.fillna("").astype(str)})
    twice = runs[runs.duplicated([*CELL, VARIANT, "seed"], keep=False)]
    if not twice.empty:
        first = twice.iloc[0]
        where = ", ".join(f"{c}={first[c]}" for c in [*CELL, VARIANT, "seed"] if str(first[c]) != "")
        raise ValueError(f"{name} has {len(twice)} rows for one run ({where}); give one suite's runs.csv")
    return runs


def fmt(value: float, ci: float, digits: int = 2) -> str:
    if pd.isna(value):
        return "–"
    return f"{value:.{digits}f}" if pd.isna(ci) else f"{value:.{digits}f} ± {ci:.{digits}f}"


def compare(a: pd.DataFrame, b: pd.DataFrame, labels: tuple[str, str],
            names: tuple[str, str] | None = None) -> pd.DataFrame:
    """The comparison table, one row per cell of either suite (see the module docstring); ``names`` (default
    ``labels``) name the suites in errors, e.g. their runs.csv files."""
    shows_variant = VARIANT in a or VARIANT in b
    names = names or labels
    a, b = comparable(a, names[0]), comparable(b, names[1])
    key = [*CELL, VARIANT]
    cells = pd.concat([a[key], b[key]]).drop_duplicates().sort_values(key, kind="stable")
    by_cell_a, by_cell_b = dict(list(a.groupby(key))), dict(list(b.groupby(key)))
    empty = a.iloc[:0]
    rows = []
    for cell in cells.itertuples(index=False, name=None):
        group_a, group_b = by_cell_a.get(cell, empty), by_cell_b.get(cell, empty)
        top_a = dict(zip(group_a["seed"], group_a["top1"]))
        top_b = dict(zip(group_b["seed"], group_b["top1"]))
        sa, sb = seed_stats.spread(list(top_a.values())), seed_stats.spread(list(top_b.values()))
        diff = seed_stats.paired_difference(top_b, top_a)
        where = dict(zip(key, cell))
        if shows_variant:
            where[VARIANT] = where[VARIANT] or NO_VARIANT
        else:
            del where[VARIANT]
        rows.append({**where, labels[0]: fmt(sa.mean, sa.ci95), f"n {labels[0]}": sa.n,
                     labels[1]: fmt(sb.mean, sb.ci95), f"n {labels[1]}": sb.n,
                     f"{labels[1]} − {labels[0]}": fmt(diff.mean, diff.ci95), "pairs": diff.n_pairs,
                     "p": diff.p_value, "diff_mean": diff.mean})
    if not rows:
        raise ValueError(f"neither {labels[0]} nor {labels[1]} has a grid or variant run to compare")
    table = pd.DataFrame(rows)
    table["p (Holm)"] = seed_stats.holm(table["p"])
    table["verdict"] = [seed_stats.verdict(d, n, p).replace("better", f"{labels[1]} higher")
                        .replace("worse", f"{labels[1]} lower")
                        for d, n, p in zip(table["diff_mean"], table["pairs"], table["p (Holm)"])]
    for side, other in (labels, labels[::-1]):
        table.loc[table[f"n {other}"] == 0, "verdict"] = f"only in {side}"
    table["p"] = table["p"].map(lambda p: "–" if pd.isna(p) else f"{p:.3g}")
    table["p (Holm)"] = table["p (Holm)"].map(lambda p: "–" if pd.isna(p) else f"{p:.3g}")
    return table.drop(columns=["diff_mean"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("suite_a", help="suite A: its working directory or its runs.csv")
    parser.add_argument("suite_b", help="suite B (the changed setting)")
    parser.add_argument("--labels", nargs=2, default=("A", "B"), metavar=("LABEL_A", "LABEL_B"))
    parser.add_argument("--out", help="also write the table to this file: Markdown, or CSV for a .csv name")
    args = parser.parse_args(argv)
    try:
        files = (runs_csv(args.suite_a), runs_csv(args.suite_b))
        table = compare(read_runs(files[0]), read_runs(files[1]), tuple(args.labels), tuple(map(str, files)))
        text = table.to_markdown(index=False)
        if args.out:
            write_text(args.out, table.to_csv(index=False) if Path(args.out).suffix == ".csv" else text + "\n")
    except (OSError, ValueError) as exc:  # script_io.InputError is a ValueError: one line naming the file
        return error(exc)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
