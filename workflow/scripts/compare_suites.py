"""Compare two finished suites run on the same grid with one setting changed (e.g. the layout study,
config/layout.yaml): for every cell (method, dataset, arch, W/A, teacher set) the test top-1 of each
suite (mean ± 95 % t interval over seeds) and the difference B − A paired by seed, with its interval
and a Holm-corrected paired t-test (workflow/scripts/seed_stats.py).

    python workflow/scripts/compare_suites.py studies/layout/conv-inputs studies/layout/block-outputs \\
        --labels conv-inputs block-outputs --out layout-comparison.csv

Each argument is a suite's working directory (the folder holding results/runs.csv) or a runs.csv.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

import seed_stats

CELL = ["method", "dataset", "arch", "w_bits", "a_bits", "teacher_bits"]


def read_runs(path: str) -> pd.DataFrame:
    file = Path(path)
    if file.suffix != ".csv":
        file = file / "results" / "runs.csv"
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist; give a suite's working directory (or its runs.csv) "
                                f"after the suite has finished")
    runs = pd.read_csv(file, dtype={"teacher_bits": str})
    missing = [c for c in [*CELL, "seed", "top1"] if c not in runs]
    if missing:
        raise ValueError(f"{file} lacks the columns {missing}; is it a cmtkd runs.csv?")
    if "role" in runs:
        runs = runs[runs["role"] == "grid"]
    return runs


def fmt(value: float, ci: float, digits: int = 2) -> str:
    if pd.isna(value):
        return "–"
    return f"{value:.{digits}f}" if pd.isna(ci) else f"{value:.{digits}f} ± {ci:.{digits}f}"


def compare(a: pd.DataFrame, b: pd.DataFrame, labels: tuple[str, str]) -> pd.DataFrame:
    rows = []
    for cell, group_a in a.groupby(CELL, sort=True):
        group_b = b.merge(pd.DataFrame([cell], columns=CELL), on=CELL)
        top_a = dict(zip(group_a["seed"], group_a["top1"]))
        top_b = dict(zip(group_b["seed"], group_b["top1"]))
        sa, sb = seed_stats.spread(list(top_a.values())), seed_stats.spread(list(top_b.values()))
        diff = seed_stats.paired_difference(top_b, top_a)
        rows.append({**dict(zip(CELL, cell)), labels[0]: fmt(sa.mean, sa.ci95), f"n {labels[0]}": sa.n,
                     labels[1]: fmt(sb.mean, sb.ci95), f"n {labels[1]}": sb.n,
                     f"{labels[1]} − {labels[0]}": fmt(diff.mean, diff.ci95), "pairs": diff.n_pairs,
                     "p": diff.p_value, "diff_mean": diff.mean})
    table = pd.DataFrame(rows)
    table["p (Holm)"] = seed_stats.holm(table["p"])
    table["verdict"] = [seed_stats.verdict(d, n, p).replace("better", f"{labels[1]} higher")
                        .replace("worse", f"{labels[1]} lower")
                        for d, n, p in zip(table["diff_mean"], table["pairs"], table["p (Holm)"])]
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
        table = compare(read_runs(args.suite_a), read_runs(args.suite_b), tuple(args.labels))
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        print(f"compare_suites: error: {exc}", file=sys.stderr)
        return 2
    text = table.to_markdown(index=False)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        (table.to_csv(out, index=False) if out.suffix == ".csv" else out.write_text(text + "\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
