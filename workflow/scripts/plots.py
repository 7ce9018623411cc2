"""Plots from ``results/runs.csv`` and ``results/histories.csv`` into ``results/plots/``.

    plots.py --runs results/runs.csv --histories results/histories.csv --out-dir results/plots

Every figure is written twice: ``NAME.pdf`` (vector, for papers) and ``NAME.png`` (200 dpi, for the
report). Legends sit outside the axes (one per figure, right of the panels); each method has the same
colour in every figure (:func:`method_color`), full precision is always black and dashed.

- ``accuracy_vs_bits.png``: top-1 vs student bit-width, one line per method (mean, error bar = half-width
  of the 95 % Student-t interval over seeds, as in the tables; none for one seed), one panel per
  dataset x architecture; full precision as a dashed line;
- ``training_curves.png``: validation top-1 of the student per epoch (mean over seeds), one panel
  per dataset x architecture x W/A;
- ``importance_weights.png``: CMT-KD's importance weights pi (history.csv columns
  ``pi_<fusion point>_<teacher index>``) per epoch, one panel per fusion point, one line per teacher.
"""

import argparse
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.ticker import MaxNLocator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grid import CELL as KEY
from script_io import UserError, error, read_csv
from seed_stats import spread
from grid import FULL_PRECISION, METHODS, NO_TEACHERS, VARIANT, bits_label, teacher_list

VAL_COLUMN = "val_top1_student"
PNG_DPI = 200
# tab20 minus its light halves' clashes: one fixed colour per method of the grid, in METHODS order.
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
            "#bcbd22", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5"]


def method_color(method: str) -> str:
    """The colour of ``method`` in every plot (methods outside the grid, e.g. imported ones: grey)."""
    if method == "fp":
        return "black"
    names = [m for m in METHODS if m != "fp"]
    return _PALETTE[names.index(method) % len(_PALETTE)] if method in names else "#7f7f7f"


# Teachers in the importance-weight plot: one colour per bit-width (tab10 without its grey, which
# marks the uniform line), so a 4-bit and a 5-bit teacher at the same index never share a colour.
_TEACHER_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
                    "#17becf"]


def teacher_color(bits: int | None, index: int) -> str:
    """The colour of a teacher of ``bits`` bits (by its index when its bit-width is unknown)."""
    key = bits if bits is not None else index
    return _TEACHER_PALETTE[key % len(_TEACHER_PALETTE)]


def save_figure(fig, png_path: Path) -> None:
    """``NAME.png`` at PNG_DPI and ``NAME.pdf`` (vector) next to it."""
    fig.savefig(png_path, dpi=PNG_DPI, bbox_inches="tight")
    fig.savefig(png_path.with_suffix(".pdf"), bbox_inches="tight")
    plt.close(fig)


def legend_outside(fig, axes) -> None:
    """One legend for the whole figure, right of the panels (never over the data)."""
    entries: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(list(entries.values()), list(entries), loc="outside right upper", fontsize=8, frameon=False)


def method_label(method: str, teacher_bits: str) -> str:
    """``kd [8]``, ``mtkd [8-6-4]``; a full-precision teacher as ``kd [FP]`` (ledger B11)."""
    if teacher_bits in (NO_TEACHERS, ""):
        return method
    return f"{method} [{'-'.join('FP' if b == '32' else b for b in str(teacher_bits).split('-'))}]"


def method_rank(method: str) -> int:
    return list(METHODS).index(method) if method in METHODS else len(METHODS)


def panel_grid(n: int, width: float = 4.2, height: float = 3.2):
    cols = min(n, 3) or 1
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def empty_figure(path: Path, message: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    save_figure(fig, path)


def accuracy_vs_bits(runs: pd.DataFrame, path: Path) -> None:
    runs = runs[runs["role"] == "grid"]
    if runs.empty:
        return empty_figure(path, "no finished runs yet")
    stats = runs.groupby(KEY).top1.agg(["mean", ("ci95", lambda s: spread(s).ci95), "size"]).reset_index()
    panels = sorted(set(zip(stats["dataset"], stats["arch"])))
    fig, axes = panel_grid(len(panels), 5.0, 3.6)
    for ax, (dataset, arch) in zip(axes, panels):
        part = stats[(stats["dataset"] == dataset) & (stats["arch"] == arch)]
        quantized = part[part["w_bits"] != FULL_PRECISION]
        order = sorted({(w, a) for w, a in zip(quantized["w_bits"], quantized["a_bits"])})
        x_of = {wa: i for i, wa in enumerate(order)}
        lines = sorted({(m, t) for m, t in zip(part["method"], part["teacher_bits"])},
                       key=lambda mt: (method_rank(mt[0]), mt))
        quantized_lines = [line for line in lines
                           if not (part[(part["method"] == line[0]) & (part["teacher_bits"] == line[1])]["w_bits"]
                                   == FULL_PRECISION).all()]
        for method, tset in lines:
            rows = part[(part["method"] == method) & (part["teacher_bits"] == tset)]
            if (rows["w_bits"] == FULL_PRECISION).all():
                mean = rows["mean"].mean()
                ax.axhline(mean, linestyle="--", color=method_color(method), linewidth=1,
                           label=f"{method_label(method, tset)}")
                continue
            rows = rows[rows["w_bits"] != FULL_PRECISION].sort_values(["w_bits", "a_bits"])
            # Dodge the lines sideways a little so that error bars at one bit-width stay readable.
            offset = 0.3 * (quantized_lines.index((method, tset)) / max(len(quantized_lines) - 1, 1) - 0.5)
            xs = [x_of[(w, a)] + offset for w, a in zip(rows["w_bits"], rows["a_bits"])]
            ax.errorbar(xs, rows["mean"], yerr=rows["ci95"].fillna(0), marker="o", capsize=3,
                        color=method_color(method), label=method_label(method, tset))
        ax.set_xticks(range(len(order)), [bits_label(w, a) for w, a in order])
        ax.set_xlim(-0.5, max(len(order) - 0.5, 0.5))
        ax.set_title(f"{dataset} / {arch}")
        ax.set_xlabel("student bit-width")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
    legend_outside(fig, axes)
    save_figure(fig, path)


def training_curves(histories: pd.DataFrame, runs: pd.DataFrame, path: Path) -> None:
    key = [*KEY, VARIANT] if VARIANT in runs and VARIANT in histories else KEY  # a sensitivity study's variants
    grid_runs = runs[runs["role"] == "grid"][key].drop_duplicates()
    if histories.empty or VAL_COLUMN not in histories:
        return empty_figure(path, "no training histories yet")
    hist = histories.merge(grid_runs, on=key)
    panels = sorted(set(zip(hist["dataset"], hist["arch"], hist["w_bits"], hist["a_bits"])))
    if not panels:
        return empty_figure(path, "no training histories yet")
    fig, axes = panel_grid(len(panels))
    for ax, (dataset, arch, w, a) in zip(axes, panels):
        part = hist[(hist["dataset"] == dataset) & (hist["arch"] == arch) & (hist["w_bits"] == w) & (hist["a_bits"] == a)]
        for (method, tset), rows in sorted(part.groupby(["method", "teacher_bits"]),
                                           key=lambda item: (method_rank(item[0][0]), item[0])):
            curve = rows.groupby("epoch")[VAL_COLUMN].mean()
            ax.plot(curve.index, curve.values, marker=".", color=method_color(method),
                    linestyle="--" if method == "fp" else "-", label=method_label(method, tset))
        ax.set_title(f"{dataset} / {arch} / {bits_label(w, a)}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("val top-1 (%)")
        ax.grid(alpha=0.3)
    legend_outside(fig, axes)
    save_figure(fig, path)


def importance_columns(histories: pd.DataFrame) -> dict[str, list[tuple[int, str]]]:
    """``pi_<fusion point>_<teacher index>`` columns grouped by fusion point (in first-seen order)."""
    points: dict[str, list[tuple[int, str]]] = {}
    for column in histories.columns:
        if not column.startswith("pi_"):
            continue
        point, _, index = column[3:].rpartition("_")
        if point and index.isdigit():
            points.setdefault(point, []).append((int(index), column))
    return {p: sorted(cols) for p, cols in points.items()}


def importance_weights(histories: pd.DataFrame, path: Path) -> None:
    points = importance_columns(histories)
    if not points:
        return empty_figure(path, "no importance weights logged (history.csv has no pi_* columns: no CMT-KD run yet)")
    columns = [c for cols in points.values() for _, c in cols]
    if VARIANT in histories:  # a sensitivity study: its option variants are in sensitivity_pi.png
        histories = histories[histories[VARIANT].fillna("") == ""]
    hist = histories[histories["method"] == "cmtkd"]
    hist = hist if not hist.empty else histories  # plot the ablations' weights if full CMT-KD did not run
    hist = hist.dropna(subset=columns, how="all")
    if hist.empty:
        return empty_figure(path, "no importance weights logged yet")
    runs = sorted(set(zip(hist["method"], hist["dataset"], hist["arch"], hist["w_bits"], hist["a_bits"],
                          hist["teacher_bits"])))
    parts = [hist[(hist["method"] == method) & (hist["dataset"] == dataset) & (hist["arch"] == arch)
                  & (hist["w_bits"] == w) & (hist["a_bits"] == a) & (hist["teacher_bits"] == tset)] for
             method, dataset, arch, w, a, tset in runs]
    # Each row shows its own fusion points (AlexNet's conv2.. and ResNet-18's layer1.. differ).
    row_points = [[(p, cols) for p, cols in points.items() if part[[c for _, c in cols]].notna().any().any()]
                  for part in parts]
    width = max(len(rp) for rp in row_points)
    fig, axes = plt.subplots(len(runs), width, figsize=(3.6 * width, 2.8 * len(runs)), squeeze=False,
                             layout="constrained")
    for r, ((method, dataset, arch, w, a, tset), part) in enumerate(zip(runs, parts)):
        bits = teacher_list(tset)
        for c in range(len(row_points[r]), width):
            axes[r][c].set_visible(False)
        for c, (point, cols) in enumerate(row_points[r]):
            ax = axes[r][c]
            for index, column in cols:
                by_epoch = part.groupby("epoch")[column]
                mean, low, high = by_epoch.mean(), by_epoch.min(), by_epoch.max()
                known = bits[index] if index < len(bits) else None
                teacher = f"teacher {index}" + (f" ({known}-bit)" if known is not None else "")
                colour = teacher_color(known, index)
                ax.plot(mean.index, mean.values, marker=".", label=teacher, color=colour)
                ax.fill_between(mean.index, low.values, high.values, alpha=0.2, color=colour)
            # Zoom on the weights (they move slowly: theta learns at lr/10), around the uniform 1/n.
            uniform = 1.0 / len(cols)
            ax.axhline(uniform, color="grey", linestyle=":", linewidth=1, label=f"uniform 1/{len(cols)}")
            values = part[[c for _, c in cols]].to_numpy().ravel()
            low, high = min(values.min(), uniform), max(values.max(), uniform)
            pad = max(0.01, 0.15 * (high - low))
            ax.set_ylim(max(0.0, low - pad), min(1.0, high + pad))
            ax.set_title(f"{point}\n{method} {dataset}/{arch} {bits_label(w, a)}", fontsize=8)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("importance weight π")
            ax.grid(alpha=0.3)
    legend_outside(fig, list(axes.flat))
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n")[0])
    parser.add_argument("--runs", required=True)
    parser.add_argument("--histories", required=True)
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args(argv)
    options = dict(fix="rebuild it with `snakemake tables`", dtype={"teacher_bits": str}, keep_default_na=False,
                   na_values=[""])
    try:
        runs = read_csv(args.runs, columns=[*KEY, "role", "top1"], numbers=["w_bits", "a_bits", "top1"], **options)
        histories = read_csv(args.histories, columns=[*KEY, "epoch"],
                             numbers=["w_bits", "a_bits", "epoch", VAL_COLUMN], **options)
    except UserError as exc:
        return error(exc)
    for frame in (runs, histories):
        if "teacher_bits" in frame:
            frame["teacher_bits"] = frame["teacher_bits"].fillna(NO_TEACHERS)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    accuracy_vs_bits(runs, out / "accuracy_vs_bits.png")
    training_curves(histories, runs, out / "training_curves.png")
    importance_weights(histories, out / "importance_weights.png")
    print(f"{out}: accuracy_vs_bits, training_curves, importance_weights (.pdf and .png)")
    return 0


if __name__ == "__main__":
    if "snakemake" in globals():  # rule plots (script: directive)
        from script_io import run_rule

        sm = snakemake  # noqa: F821
        sys.exit(run_rule(main, ["--runs", sm.input.runs, "--histories", sm.input.histories,
                                 "--out-dir", str(Path(sm.output.accuracy_vs_bits).parent)], sm.log[0]))
    sys.exit(main())
