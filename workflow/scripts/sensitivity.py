"""Sensitivity table and plots of a suite whose experiments have ``vary`` (config/sensitivity.yaml).

    sensitivity.py --runs results/runs.csv --histories results/runs/histories.csv
                   --levels results/runs/sensitivity_levels.csv --tables results/tables --plots results/plots

One factor at a time: each level of a factor differs from the default point (the suite's
``method_args``, the experiment's teacher set) in that factor only, and is compared with the
factor's default level, whose runs every factor shares. Writes

- ``sensitivity.{csv,md,tex}`` (tables): one row per factor and level: top-1 mean ± half-width of
  the 95 % Student-t interval over seeds (n); level − default paired by seed with its 95 % t
  interval, the paired t-test's p-value, Holm-adjusted within each factor, and the verdict
  (workflow/scripts/seed_stats.py); a dagger on a level that has not converged (the make_tables rule,
  seed_stats.cell_convergence); and
  ``max |π − 1/n|``: how far CMT-KD's importance weights moved from uniform by the last epoch
  (largest over fusion points and teachers, mean over seeds; 0 = θ did not move);
- ``sensitivity.png`` (plots): one panel per factor, top-1 against the level (mean, bars = 95 % t
  interval, dots = seeds), the default level marked; a log x-axis where the levels are log-spaced
  (symlog when one level is 0);
- ``sensitivity_pi.png`` (plots): π per fusion point and teacher against the epoch (mean over seeds,
  band = min-max) for each level of ``theta_lr_mult`` (the default point alone if it is not varied):
  whether θ learns anything, and how that depends on its learning rate.

Levels (``results/runs/sensitivity_levels.csv``) come from ``grid.sensitivity_levels``.
"""

import argparse
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator, NullLocator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grid import COLUMNS, NO_TEACHERS, TEACHER_SETS, VARIANT, bits_label, teacher_list
from make_tables import Fmt, write_latex, write_markdown, write_tidy_csv
from plots import importance_columns, panel_grid, save_figure
from script_io import UserError, error, read_csv
from seed_stats import ALPHA, cell_convergence, holm, paired_difference, spread, verdict

CELL = list(COLUMNS[:-1])  # a run without its seed
GROUP = ["experiment", "factor", "method", "dataset", "arch", "w_bits", "a_bits"]  # + teacher set, see groups()
PI_FACTOR = "theta_lr_mult"  # sensitivity_pi.png shows the levels of this factor
TITLE = "Sensitivity, one factor at a time: top-1 accuracy (%) per level against the default level"
NOTES = [
    ("Top-1 accuracy (%) on the test split from each run's standalone evaluation (eval.json), mean ± half-width "
     "of the 95 % Student-t interval over seeds; n = seeds finished (n=k/m: k of the m configured seeds)."),
    ("One factor at a time: a level differs from the default point (the suite's method_args and the experiment's "
     "teacher set) in that factor only; the default level's runs are shared by every factor."),
    ("Δ = level − default level in points over the seeds both have (paired by seed), mean ± half-width of the 95 % "
     "Student-t interval of the differences; p: two-sided paired t-test (scipy.stats.ttest_rel); p (Holm): "
     f"Holm-adjusted within each factor; verdict at α = {ALPHA:g}: better / worse than the default level, no "
     "significant difference, or too few seeds (fewer than 2 pairs); all differences zero (a tie) give p = 1."),
    ("max abs(π − 1/n): CMT-KD's importance weights at the last epoch, the largest distance from uniform (1/n for "
     "n teachers) over fusion points and teachers, mean over seeds; 0 = θ did not move (always 0 with one "
     "teacher); — = no weights logged."),
]
DISPLAY = ["Factor", "Level", "Top-1 (95 % CI)", "Δ vs default (95 % CI)", "p", "p (Holm)", "Verdict",
           "max abs(π − 1/n)"]


# ------------------------------------------------------------------------------------- inputs
def read_levels(path: str | Path) -> pd.DataFrame:
    levels = read_csv(path, columns=[*GROUP, "level", "value", "default"],
                      fix="it is written by the workflow's sensitivity_levels step: rerun the suite",
                      dtype={"teacher_bits": str, VARIANT: str, "level": str, "value": str},
                      keep_default_na=False)  # value: JSON text, also where every level is a number
    levels["default"] = levels["default"].map(lambda v: str(v).strip().lower() == "true")
    return levels


def read_results(path: str | Path) -> pd.DataFrame:
    frame = read_csv(path, columns=["method", "dataset", "arch", "w_bits", "a_bits", "seed"],
                     fix="rebuild it with the suite's collect step", numbers=["top1"],
                     dtype={"teacher_bits": str, VARIANT: str}, keep_default_na=False, na_values=[""])
    if "teacher_bits" in frame:
        frame["teacher_bits"] = frame["teacher_bits"].fillna(NO_TEACHERS)
    frame[VARIANT] = frame[VARIANT].fillna("") if VARIANT in frame else ""
    return frame


def groups(levels: pd.DataFrame) -> Iterator[pd.DataFrame]:
    """The levels of one factor at one setting (method, data, arch, W/A and, except for the teacher-set
    factor, the teacher set), in the config's order."""
    for _, part in levels.groupby(GROUP, sort=False):
        if part["factor"].iloc[0] == TEACHER_SETS:
            yield part
        else:
            yield from (sub for _, sub in part.groupby("teacher_bits", sort=False))


def matching(frame: pd.DataFrame, level: dict) -> pd.DataFrame:
    """Rows of runs.csv / histories.csv that belong to the run cell of ``level``."""
    mask = frame[VARIANT] == level[VARIANT]
    for column in CELL:
        mask &= frame[column].astype(str) == str(level[column])
    return frame[mask]


def pi_deviation(history: pd.DataFrame) -> float:
    """max |π − 1/n| at the last epoch of one run's history (NaN without π columns)."""
    points = importance_columns(history.dropna(axis=1, how="all"))
    if history.empty or not points:
        return math.nan
    last = history.sort_values("epoch").iloc[-1]
    return max(abs(float(last[c]) - 1.0 / len(cols)) for cols in points.values() for _, c in cols)


# --------------------------------------------------------------------------------- statistics
def level_rows(part: pd.DataFrame, runs: pd.DataFrame, histories: pd.DataFrame) -> list[dict]:
    """The tidy rows of one factor: each level's spread, its paired difference to the default, Holm."""
    records = part.to_dict("records")
    default = next(r for r in records if r["default"])
    by_seed = lambda rows: dict(zip(rows["seed"].astype(int), rows["top1"].astype(float)))  # noqa: E731
    reference = by_seed(matching(runs, default))
    out = []
    for level in records:
        mine = matching(runs, level)
        s = spread(mine["top1"])
        d = paired_difference(by_seed(mine), reference) if not level["default"] else None
        hist = matching(histories, level)
        devs = [pi_deviation(h) for _, h in hist.groupby("seed")] if len(hist) else []
        devs = [v for v in devs if not math.isnan(v)]
        out.append({**{k: level[k] for k in ["experiment", "factor", "level", "default", *CELL, VARIANT]},
                    "mean": s.mean, "ci95": s.ci95, "std": s.std, "n": s.n, "n_expected": level["n_seeds"],
                    **cell_convergence(mine)._asdict(),
                    "diff_mean": d.mean if d else math.nan, "diff_ci95": d.ci95 if d else math.nan,
                    "n_pairs": d.n_pairs if d else 0, "p_value": d.p_value if d else math.nan,
                    "pi_deviation": float(np.mean(devs)) if devs else math.nan})
    adjusted = holm([r["p_value"] for r in out])
    for row, p in zip(out, adjusted):
        row["p_holm"] = p
        row["verdict"] = "default" if row["default"] else verdict(row["diff_mean"], row["n_pairs"], p)
    return out


def sensitivity_table(runs: pd.DataFrame, histories: pd.DataFrame, levels: pd.DataFrame) -> pd.DataFrame:
    """One tidy row per factor and level (see the module docstring)."""
    rows = [row for part in groups(levels) for row in level_rows(part, runs, histories)]
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------- formatting
def setting_label(row: dict) -> str:
    teachers = "" if row["factor"] == TEACHER_SETS else f", teachers {row['teacher_bits']}"
    return (f"{row['method']} {row['dataset']}/{row['arch']} {bits_label(int(row['w_bits']), int(row['a_bits']))}"
            f"{teachers}")


def level_label(row: dict) -> str:
    text = row["level"]
    if row["factor"] == TEACHER_SETS:
        text += f" ({len(teacher_list(row['level']))} teacher{'s' if len(teacher_list(row['level'])) > 1 else ''})"
    return text + (" (default)" if row["default"] else "")


def display_table(tidy: pd.DataFrame, fmt: Fmt) -> pd.DataFrame:
    rows = [{
        "Setting": setting_label(r), "Factor": r["factor"], "Level": level_label(r),
        "Top-1 (95 % CI)": fmt.ours(r["mean"], r["ci95"], r["n"], r["n_expected"], r["not_converged"]),
        "Δ vs default (95 % CI)": "—" if r["default"] else fmt.difference(r["diff_mean"], r["diff_ci95"], r["n_pairs"]),
        "p": fmt.p_value(r["p_value"]), "p (Holm)": fmt.p_value(r["p_holm"]), "Verdict": r["verdict"],
        "max abs(π − 1/n)": "—" if pd.isna(r["pi_deviation"]) else f"{r['pi_deviation']:.4f}",
    } for r in tidy.to_dict("records")]
    options = tidy[tidy["factor"] != TEACHER_SETS] if len(tidy) else tidy
    several = tidy.empty or len(tidy.drop_duplicates(GROUP[2:])) > 1 or options["teacher_bits"].nunique() > 1
    return pd.DataFrame(rows, columns=(["Setting"] if several else []) + DISPLAY)


def write_tables(tidy: pd.DataFrame, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_tidy_csv(tidy, out / "sensitivity.csv")
    for kind in ("md", "tex"):
        fmt = Fmt(kind)
        display = display_table(tidy, fmt)
        # the dagger's footnote (Fmt.notes) once a cell carries it
        if kind == "md":
            write_markdown(out / "sensitivity.md", TITLE, display, fmt.notes(), NOTES)
        else:
            write_latex(out / "sensitivity.tex", "sensitivity", TITLE, display, fmt.notes(), NOTES)


# ------------------------------------------------------------------------------------- plots
def axis_scale(values: list[float]) -> str:
    """'linear' for evenly spaced levels, 'log' for levels in a constant ratio (``symlog`` when one of
    them is 0, the others then in constant ratio), 'linear' otherwise."""
    v = sorted(values)
    if len(v) < 3 or np.allclose(np.diff(v), np.diff(v)[0]):
        return "linear"
    positive = [x for x in v if x > 0]
    if len(positive) < 2 or len(positive) < len(v) - (1 if v[0] == 0 else 0):
        return "linear"
    ratios = np.array(positive[1:]) / np.array(positive[:-1])
    if not np.allclose(ratios, ratios[0]) or ratios[0] <= 1:
        return "linear"
    return "symlog" if v[0] == 0 else "log"


def x_positions(part: pd.DataFrame) -> tuple[list[float], str]:
    """Where each level sits on the x-axis, and the axis scale: numbers as themselves, teacher sets as
    their number of teachers, anything else as categories 0, 1, 2, ..."""
    if part["factor"].iloc[0] == TEACHER_SETS:
        xs = [float(len(teacher_list(level))) for level in part["level"]]
        return xs, "linear"
    values = [json.loads(v) for v in part["value"]]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        xs = [float(v) for v in values]
        return xs, axis_scale(xs)
    return [float(i) for i in range(len(values))], "category"


def factor_panel(ax, part: pd.DataFrame, runs: pd.DataFrame) -> None:
    xs, scale = x_positions(part)
    for x, level in zip(xs, part.to_dict("records")):
        top1 = matching(runs, level)["top1"].dropna()
        s = spread(top1)
        if s.n == 0:
            continue
        color = "black" if level["default"] else "#1f77b4"
        ax.scatter([x] * len(top1), top1, s=10, color=color, alpha=0.35, zorder=2)
        ax.errorbar([x], [s.mean], yerr=[0 if math.isnan(s.ci95) else s.ci95], marker="D" if level["default"] else "o",
                    markersize=7 if level["default"] else 5, capsize=4, color=color, zorder=3,
                    label="default level" if level["default"] else "other levels")
    if scale == "symlog":
        ax.set_xscale("symlog", linthresh=min(x for x in xs if x > 0), linscale=0.5)
    elif scale == "log":
        ax.set_xscale("log")
    ax.set_xticks(xs, [level_label({**r, "default": False}).replace(" (", "\n(") for r in part.to_dict("records")],
                  rotation=30 if scale == "category" else 0, fontsize=8)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_title(f"{part['factor'].iloc[0]}" + (" (number of teachers)" if part["factor"].iloc[0] == TEACHER_SETS
                                                else ""), fontsize=10)
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)


def plot_factors(levels: pd.DataFrame, runs: pd.DataFrame, path: Path) -> None:
    parts = list(groups(levels))
    fig, axes = panel_grid(max(len(parts), 1))
    for ax, part in zip(axes, parts):
        factor_panel(ax, part, runs)
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=8, frameon=False)
    fig.suptitle("Top-1 per level (mean, bars: 95 % t interval over seeds; dots: seeds)", fontsize=10)
    save_figure(fig, path)


def pi_levels(levels: pd.DataFrame) -> pd.DataFrame:
    """The levels sensitivity_pi.png shows: those of PI_FACTOR (first setting), else the default point."""
    for part in groups(levels):
        if part["factor"].iloc[0] == PI_FACTOR:
            return part
    return levels[levels["default"]].drop_duplicates(CELL).head(1)


def plot_pi(levels: pd.DataFrame, histories: pd.DataFrame, path: Path) -> None:
    shown = [(level, matching(histories, level)) for level in pi_levels(levels).to_dict("records")]
    shown = [(level, hist.dropna(axis=1, how="all")) for level, hist in shown if len(hist)]
    shown = [(level, hist) for level, hist in shown if importance_columns(hist)]
    if not shown:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no importance weights logged yet", ha="center", va="center")
        return save_figure(fig, path)
    points = list(dict.fromkeys(p for _, hist in shown for p in importance_columns(hist)))
    fig, axes = plt.subplots(len(shown), len(points), figsize=(3.6 * len(points), 2.6 * len(shown)), squeeze=False,
                             sharey=True, layout="constrained")
    for r, (level, hist) in enumerate(shown):
        columns = importance_columns(hist)
        bits = teacher_list(level["teacher_bits"])
        for c, point in enumerate(points):
            ax = axes[r][c]
            for index, column in columns.get(point, []):
                by_epoch = hist.groupby("epoch")[column]
                mean = by_epoch.mean()
                ax.plot(mean.index, mean.values, marker=".",
                        label=f"teacher {index}" + (f" ({bits[index]}-bit)" if index < len(bits) else ""))
                ax.fill_between(mean.index, by_epoch.min().values, by_epoch.max().values, alpha=0.2)
            if point in columns:
                ax.axhline(1.0 / len(columns[point]), color="grey", linestyle=":", linewidth=1, label="uniform 1/n")
            which = (f"{PI_FACTOR} = {level['level']}" + (" (default)" if level["default"] else "")
                     if level["factor"] == PI_FACTOR else "the default point")
            ax.set_title(f"{point}, {which}", fontsize=8)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("importance weight π")
            ax.grid(alpha=0.3)
    handles = {label: h for ax in axes.flat for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=8, frameon=False)
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------- main
def build(runs_csv: str, histories_csv: str, levels_csv: str, tables_dir: str, plots_dir: str) -> pd.DataFrame:
    runs, histories, levels = read_results(runs_csv), read_results(histories_csv), read_levels(levels_csv)
    tidy = sensitivity_table(runs, histories, levels)
    write_tables(tidy, Path(tables_dir))
    plots = Path(plots_dir)
    plots.mkdir(parents=True, exist_ok=True)
    plot_factors(levels, runs, plots / "sensitivity.png")
    plot_pi(levels, histories, plots / "sensitivity_pi.png")
    return tidy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n")[0])
    parser.add_argument("--runs", required=True, help="results/runs.csv of a suite with `vary`")
    parser.add_argument("--histories", required=True, help="results/runs/histories.csv")
    parser.add_argument("--levels", required=True, help="results/runs/sensitivity_levels.csv")
    parser.add_argument("--tables", required=True, help="folder for sensitivity.{csv,md,tex}")
    parser.add_argument("--plots", required=True, help="folder for sensitivity.png and sensitivity_pi.png")
    args = parser.parse_args(argv)
    try:
        tidy = build(args.runs, args.histories, args.levels, args.tables, args.plots)
    except UserError as exc:  # an input file it cannot use: one line naming it
        return error(exc)
    print(f"{args.tables}/sensitivity.{{csv,md,tex}}: {len(tidy)} levels; "
          f"{args.plots}/sensitivity.png, sensitivity_pi.png (.pdf too)")
    return 0


if __name__ == "__main__":
    if "snakemake" in globals():  # rule sensitivity (script: directive)
        from script_io import run_rule

        sm = snakemake  # noqa: F821
        sys.exit(run_rule(main, ["--runs", sm.input.runs, "--histories", sm.input.histories, "--levels",
                                 sm.input.levels, "--tables", str(Path(sm.output.table_csv).parent),
                                 "--plots", str(Path(sm.output.sensitivity).parent)], sm.log[0]))
    sys.exit(main())
