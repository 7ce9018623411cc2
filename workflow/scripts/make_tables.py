"""Tables from ``results/runs.csv``, next to the paper's numbers and imported results.

    make_tables.py --runs results/runs.csv --grid results/grid.csv --paper results/paper/reported.csv
                   [--external results/external/*.csv] --out-dir results/tables

Writes five tables, each as ``.md`` and ``.tex`` (pandas ``Styler.to_latex``, booktabs rules) for
reading and as a tidy ``.csv`` (one row per cell, numbers unformatted: mean, ci95, std, n) for machines:

- ``main``: rows = methods (ours, imported, reported), columns = student W/A, cells = top-1
  mean ± half-width of the 95 % Student-t interval over seeds, with n;
- ``ablation``: the CMT-KD variants in the order of the paper's Table 1, ours next to the paper's;
- ``paper_delta``: every reported number with ours (and imported) for the same method and setting,
  and the difference;
- ``teachers``: every CMT-KD cell's teachers, trained jointly (CMT-KD), in the teachers-only stage and
  alone (qat at the same bits), validation top-1 at the last epoch (needs ``--histories``);
- ``comparison``: every method of ours against CMT-KD (``cmtkd``) at the same setting, paired by
  seed: the difference, its 95 % t interval, the paired t-test's p-value, Holm-adjusted across the
  table, and a verdict (better / worse / no significant difference / too few seeds).

A cell that has not converged carries a dagger and the table a footnote: the mean over its runs of
``val_gain_last20`` (how far a run's best validation top-1 rose over the last 20 % of its epochs) is
>= 1 point (seed_stats.CONVERGENCE_SCOPE "cell"; "run": any run's gain is). The tidy CSVs carry
``val_gain_mean``, ``not_converged`` (the cell's mark) and ``n_not_converged`` (runs >= 1 point).
Statistics: workflow/scripts/seed_stats.py.
Numbers that are not ours carry a footnote with their provenance; the general notes point at
ASSUMPTIONS.md for everything the paper leaves open.
"""

import argparse
import math
import re
import string
import sys
import unicodedata
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checks
from grid import CELL as KEY
from grid import METHODS, NO_TEACHERS, bits_label, teacher_list, teacher_seed
from script_io import InputError, UserError, error, read_csv
import seed_stats
from seed_stats import (ALPHA, CONVERGENCE_GAIN_PP, cell_convergence, cell_mark, gains, holm, not_converged,
                        paired_difference, spread, verdict)

METHOD_ORDER = list(METHODS)
ABLATION_VARIANTS = {  # the paper's Table 1 rows first, then the natural further switches (docs/method.md §7)
    "cmtkd": "Full CMT-KD",
    "cmtkd-noml": "w/o mutual learning",
    "cmtkd-avg": "Average teacher (equal weights)",
    "cmtkd-nofeat": "w/o feature loss",
    "cmtkd-1t": "One teacher",
    "cmtkd-frozen": "Frozen pre-trained teachers",
}
# What a baseline's name stands for, where the name alone could mislead: a footnote on the method's
# cell wherever it appears (ASSUMPTIONS.md, Baselines).
METHOD_NOTES = {
    "mtkd": ("mtkd: You et al. (KDD 2017) at the output level only (the teachers' averaged soft targets); "
             "their intermediate-layer relative-dissimilarity (triplet) term is not implemented."),
    "dml": ("dml: deep mutual learning (Zhang et al., CVPR 2018), student and teachers trained jointly, "
            "each with cross-entropy plus the mean KL to every peer's prediction at T = 1."),
    "kdcl": ("kdcl: KDCL-MinLogit mutual learning (Guo et al., CVPR 2020) of the student and its jointly trained "
             "teachers at T = 4, without CMT-KD's fusion (called dml before the baselines were renamed)."),
}
GENERAL_NOTES = [
    ("Top-1 accuracy (%) on the test split from each run's standalone evaluation (eval.json), mean ± half-width "
     "of the 95 % Student-t confidence interval over seeds (t(0.975, n−1)·s/√n; no interval for n=1); n = seeds "
     "finished (n=k/m: k of the m configured seeds have finished)."),
    ("Where the paper is silent (schedule, teacher bit-widths, fusion points, initialisation, ...) our runs follow "
     "ASSUMPTIONS.md; reported and imported numbers were not produced by this code and are shown for context."),
]
REFERENCE = "cmtkd"  # the full method: every other method of ours is compared with it
DAGGER = "†"
NOT_CONVERGED_NOTES = {  # by seed_stats.CONVERGENCE_SCOPE
    "cell": (f"not converged: the best validation top-1 of this cell's runs still rose by ≥ {CONVERGENCE_GAIN_PP:g} "
             "pp over their last 20 % of epochs, on average over the runs (ASSUMPTIONS.md W13)"),
    "run": (f"not converged: the best validation top-1 of at least one of this cell's runs still rose by "
            f"≥ {CONVERGENCE_GAIN_PP:g} pp over its last 20 % of epochs (ASSUMPTIONS.md W13)"),
}
TABLE_NOTES = {"teachers": [
    ("Validation top-1 (%) of each CMT-KD teacher at the last epoch (held-out part of the training set; the "
     "teachers are not saved, so they have no test number): trained jointly with the student (CMT-KD's own "
     "history), in the teachers-only stage of cmtkd-frozen (cmtkd-teachers), and alone (the qat run of the same "
     "bits that kd and mtkd load, seed 1000·b + s); z_T: the teachers' combined logit (the mean of the heads, "
     "which CE_T trains with teacher_loss=combined: the heads are not trained one by one), jointly and in the "
     "stage; mean ± 95 % t interval over seeds; — where the suite has no such run (or its runs predate the "
     "z_T log). Joint − alone: paired by student seed, Holm-adjusted across this table. The paper says the "
     "collaboration helps the teachers too (docs/method.md §1)."),
], "comparison": [
    ("Δ top-1 = method − CMT-KD (cmtkd) in points over the seeds both have (paired by seed; Pairs = their number), "
     "mean ± half-width of the 95 % Student-t interval of the differences; p: two-sided paired t-test "
     "(scipy.stats.ttest_rel); p (Holm): Holm-adjusted across all rows of this table."),
    (f"Verdict at α = {ALPHA:g} on the Holm-adjusted p: better / worse than CMT-KD, no significant difference, or "
     "too few seeds (fewer than 2 pairs); all differences zero (a tie) give p = 1."),
    ("A method with one teacher is compared with the CMT-KD teacher sets whose highest bit-width it uses, a method "
     "without teachers with every set; imported and reported numbers are not compared (no shared seeds)."),
]}
SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "runs.schema.yaml"


# ------------------------------------------------------------------------------------- inputs
NUMBERS = ["w_bits", "a_bits", "seed", "top1", "top5"]  # columns that must hold numbers (or be empty)


def read_runs(path: str) -> pd.DataFrame:
    runs = read_csv(path, columns=[*KEY, "seed", "role", "top1", "top5"], numbers=NUMBERS,
                    fix="rebuild it with `snakemake tables`", dtype={"teacher_bits": str}, keep_default_na=False,
                    na_values=[""])
    runs["teacher_bits"] = runs["teacher_bits"].fillna(NO_TEACHERS)
    return runs


def read_grid(path: str) -> pd.DataFrame:
    return read_csv(path, columns=[*KEY, "role"], numbers=["w_bits", "a_bits"],
                    fix="the workflow writes it (snakemake results/runs/grid.csv)", dtype={"teacher_bits": str},
                    keep_default_na=False)


def read_external(paths: list[str], schema_path: str | Path = SCHEMA) -> pd.DataFrame:
    """Imported results in the runs.csv columns, validated (checks.py: schema, one row per run)."""
    try:
        return checks.read_external(paths, schema_path)
    except checks.InputError as exc:
        raise InputError(str(exc)) from None


def read_paper(path: str) -> pd.DataFrame:
    paper = read_csv(path, columns=["method", "dataset", "arch", "w_bits", "a_bits", "top1", "provenance", "source"],
                     numbers=NUMBERS, keep_default_na=False, na_values=[""])
    paper["teacher_bits"] = NO_TEACHERS
    return paper


# ---------------------------------------------------------------------------------- summaries
def ci95_of(values: pd.Series) -> float:
    return spread(values).ci95


def std_of(values: pd.Series) -> float:
    return spread(values).std


def summarize(runs: pd.DataFrame, grid: pd.DataFrame, external: pd.DataFrame) -> pd.DataFrame:
    """One row per (source, method, setting): top-1/top-5 mean, 95 % t half-width (ci95), std, n, the
    number of runs not converged, the mean gain and the cell's mark (seed_stats.cell_mark);
    n_expected from the grid."""
    ours = runs[runs["role"] == "grid"].assign(source="ours", origin="ours")
    expected = grid[grid["role"] == "grid"].groupby(KEY).size().rename("n_expected").reset_index()
    rows = pd.concat([ours, external.assign(origin="external")], ignore_index=True)
    rows["run_not_converged"] = not_converged(rows["converged"]) if "converged" in rows else False
    rows["gain"] = gains(rows)
    rows["seed_counted"] = rows["seed"].where(rows["top1"].notna())  # the seeds n counts
    stats = rows.groupby([*KEY, "source", "origin"], dropna=False).agg(
        top1_mean=("top1", "mean"), top1_ci95=("top1", ci95_of), top1_std=("top1", std_of),
        top5_mean=("top5", "mean"), top5_ci95=("top5", ci95_of), top5_std=("top5", std_of), n=("top1", "count"),
        n_not_converged=("run_not_converged", "sum"), val_gain_mean=("gain", "mean"),
        seeds=("seed_counted", lambda s: ",".join(str(int(x)) for x in sorted(s.dropna()))),
    ).reset_index()
    stats["not_converged"] = [cell_mark(g, n > 0) for g, n in zip(stats["val_gain_mean"], stats["n_not_converged"])]
    # Grid cells with no finished run yet still get a row (n = 0).
    started = stats[stats["origin"] == "ours"].set_index(KEY).index
    not_started = expected[~expected.set_index(KEY).index.isin(started)][KEY]
    stats = pd.concat([stats, not_started.assign(source="ours", origin="ours", n=0, n_not_converged=0,
                                                 not_converged=False, seeds="")],
                      ignore_index=True)
    stats = stats.merge(expected, on=KEY, how="left")
    # Imported rows count their own seeds; ours count against the seeds the grid asks for.
    stats["n_expected"] = stats["n_expected"].where(stats["origin"] == "ours", stats["n"]).fillna(stats["n"])
    stats = stats.astype({"n": int, "n_expected": int, "n_not_converged": int, "not_converged": bool})
    return sort_rows(stats)


def sort_rows(frame: pd.DataFrame) -> pd.DataFrame:
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    origin = {"ours": 0, "external": 1, "reported": 2}
    frame = frame.assign(
        _origin=frame["origin"].map(origin),
        _method=frame["method"].map(lambda m: order.get(m, len(order))),
    )
    frame = frame.sort_values(["dataset", "arch", "_origin", "_method", "method", "source", "teacher_bits",
                               "w_bits", "a_bits"], kind="stable")
    return frame.drop(columns=["_origin", "_method"]).reset_index(drop=True)


# ------------------------------------------------------------------------------- formatting
class Notes:
    """Footnote markers a, b, c, ... for the sources of numbers that are not ours."""

    def __init__(self):
        self.texts: dict[str, str] = {}

    def mark(self, text: str) -> str:
        if text not in self.texts:
            self.texts[text] = string.ascii_lowercase[len(self.texts) % 26]
        return self.texts[text]

    def lines(self) -> list[tuple[str, str]]:
        return [(marker, text) for text, marker in self.texts.items()]


TEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}", "<": r"\textless{}",
                ">": r"\textgreater{}", "|": r"\textbar{}"}
TEX_SPECIAL = re.compile("|".join(re.escape(c) for c in TEX_SPECIALS))
# Every character outside ASCII is written as ASCII LaTeX, so a table compiles under pdflatex with no
# package beyond booktabs, whatever text an imported CSV brings (ASSUMPTIONS.md W19): symbols by name,
# Greek letters in math mode, accented Latin letters with LaTeX's accent commands, and anything else
# (CJK, emoji, ...) as its code point, visibly, e.g. [U+4E2D].
TEX_SYMBOLS = {"§": r"\S{}", "±": r"$\pm$", "≥": r"$\geq$", "≤": r"$\leq$", "≠": r"$\neq$", "≈": r"$\approx$",
               "∞": r"$\infty$", "×": r"$\times$", "÷": r"$\div$", "→": r"$\rightarrow$", "←": r"$\leftarrow$",
               "√": r"$\surd$", "·": r"$\cdot$", "†": r"\dag{}", "‡": r"\ddag{}", "°": r"$^\circ$",
               "µ": r"$\mu$", "−": "--", "–": "--", "—": "--", "…": r"\ldots{}", "“": "``", "”": "''",
               "‘": "`", "’": "'", "«": "<<", "»": ">>", "\u00a0": "~", "ß": r"\ss{}", "æ": r"\ae{}",
               "Æ": r"\AE{}", "œ": r"\oe{}", "Œ": r"\OE{}", "ø": r"\o{}", "Ø": r"\O{}", "ł": r"\l{}",
               "Ł": r"\L{}", "ı": r"\i{}", "¿": r"?`", "¡": r"!`", "€": "EUR", "£": r"\pounds{}",
               "©": r"\copyright{}"}
TEX_ACCENTS = {"\u0300": "`", "\u0301": "'", "\u0302": "^", "\u0303": "~", "\u0304": "=", "\u0306": "u",
               "\u0307": ".", "\u0308": '"', "\u030a": "r", "\u030b": "H", "\u030c": "v", "\u0327": "c",
               "\u0328": "k"}
GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu",
         "nu", "xi", "pi", "rho", "sigma", "tau", "upsilon", "phi", "chi", "psi", "omega"}
GREEK_CAPITAL = {"gamma", "delta", "theta", "lambda", "xi", "pi", "sigma", "upsilon", "phi", "psi", "omega"}


def tex_char(char: str) -> str:
    """One non-ASCII character as ASCII LaTeX that pdflatex sets without extra packages."""
    if char in TEX_SYMBOLS:
        return TEX_SYMBOLS[char]
    name = unicodedata.name(char, "")
    if name.startswith("GREEK SMALL LETTER ") and name[19:].lower() in GREEK:
        return rf"$\{name[19:].lower()}$"
    if name.startswith("GREEK CAPITAL LETTER ") and name[21:].lower() in GREEK_CAPITAL:
        return rf"$\{name[21:].capitalize()}$"
    base, *marks = unicodedata.normalize("NFD", char)
    if base.isascii() and base.isalpha() and marks and all(m in TEX_ACCENTS for m in marks):
        out = {"i": r"\i{}", "j": r"\j{}"}.get(base, base) if any(m in "\u0300\u0301\u0302\u0308" for m in marks) else base
        for mark in marks:
            out = rf"\{TEX_ACCENTS[mark]}{{{out}}}"
        return out
    compatible = unicodedata.normalize("NFKD", char)  # ligatures, superscripts, full-width forms
    if compatible.isascii() and compatible.isprintable():
        return TEX_SPECIAL.sub(lambda m: TEX_SPECIALS[m.group()], compatible)
    if unicodedata.category(char).startswith("Z"):  # other spaces
        return " "
    return rf"\texttt{{[U+{ord(char):04X}]}}"


def tex_ascii(text: str) -> str:
    """``text`` with every non-ASCII character replaced by :func:`tex_char` (LaTeX specials untouched)."""
    return text if text.isascii() else "".join(c if c.isascii() else tex_char(c) for c in text)


def tex_escape(text: str) -> str:
    """Plain text -> ASCII LaTeX that typesets it (one pass: no replacement is escaped again)."""
    return tex_ascii(TEX_SPECIAL.sub(lambda m: TEX_SPECIALS[m.group()], str(text)))


class Tex(str):
    """A cell that is LaTeX already (written by Fmt('tex')); every other cell is escaped when written."""


class Fmt:
    """Cell formatting for one output format ('md' or 'tex'). Cells that hold LaTeX are ``Tex``;
    write_latex escapes every other cell, so text from the data (method, dataset, arch, ...) is
    always escaped."""

    def __init__(self, kind: str):
        self.kind = kind
        self.marked_not_converged = False  # a cell carries the dagger: the table needs its footnote

    def tex(self, text: str) -> str:
        return Tex(text) if self.kind == "tex" else text

    def marker(self, marker: str) -> str:
        return Tex(rf"\textsuperscript{{{marker}}}") if self.kind == "tex" else f" [{marker}]"

    def dagger(self, not_converged) -> str:
        """The not-converged mark for a cell marked ``not_converged`` ('' when false or unknown)."""
        if pd.isna(not_converged) or not bool(not_converged):
            return ""
        self.marked_not_converged = True
        return r"\,\dag" if self.kind == "tex" else f" {DAGGER}"

    def ours(self, mean, ci95, n, n_expected, not_converged=False) -> str:
        """mean ± 95 % t half-width (n), or the mean alone for one seed; a dagger if the cell has not converged."""
        pm = r"$\pm$" if self.kind == "tex" else "±"
        n, n_expected = int(n), int(n_expected)
        count = f"n={n}" if n >= n_expected else f"n={n}/{n_expected}"
        if n == 0 or mean is None or (isinstance(mean, float) and math.isnan(mean)):
            return f"— ({count})"
        mark = self.dagger(not_converged)
        if n > 1 and not pd.isna(ci95):
            return self.tex(f"{mean:.2f} {pm} {ci95:.2f} ({count}){mark}")
        return self.tex(f"{mean:.2f} ({count}){mark}")

    def cell(self, summary_row: dict) -> str:
        """A cell of ours (or imported) from its summarize() row."""
        r = summary_row
        return self.ours(r["top1_mean"], r["top1_ci95"], r["n"], r["n_expected"], r["not_converged"])

    def difference(self, mean, ci95, n_pairs, not_converged=False) -> str:
        if n_pairs == 0 or pd.isna(mean):
            return "—"
        mark = self.dagger(not_converged)
        pm = r"$\pm$" if self.kind == "tex" else "±"
        interval = f" {pm} {ci95:.2f}" if not pd.isna(ci95) else ""
        return self.tex(f"{mean:+.2f}{interval}{mark}")

    @staticmethod
    def p_value(p) -> str:
        if pd.isna(p):
            return "—"
        return "< 0.0001" if p < 0.0001 else f"{p:.4f}"

    def notes(self) -> list[tuple[str, str]]:
        """The dagger's footnote, if a cell was marked."""
        return [(DAGGER, NOT_CONVERGED_NOTES[seed_stats.CONVERGENCE_SCOPE])] if self.marked_not_converged else []

    def reported(self, value, marker: str) -> str:
        body = "unknown" if pd.isna(value) else f"{value:g}"
        return self.tex(body + self.marker(marker))

    def delta(self, value) -> str:
        if value is None or pd.isna(value):
            return "—"
        return f"{value:+.2f}"


def source_label(row, notes: Notes, fmt: Fmt) -> str:
    if row["origin"] == "ours":
        return "ours"
    if row["origin"] == "external":
        return fmt.tex("imported" + fmt.marker(notes.mark(f"Imported (results/external/): {row['source']}.")))
    return "paper" if row["method"].startswith("cmtkd") else "reported"  # the cell carries the footnote


def method_label(method: str, notes: Notes, fmt: Fmt) -> str:
    """The method's name, with a footnote marker when METHOD_NOTES says what the name stands for."""
    if method not in METHOD_NOTES:
        return method
    marker = fmt.marker(notes.mark(METHOD_NOTES[method]))
    return fmt.tex(tex_escape(method) + marker) if fmt.kind == "tex" else method + marker


def teachers_label(teacher_bits: str) -> str:
    """A teacher set as the tables show it: ``8-6-4``; a full-precision teacher as ``FP`` (kd with
    teacher set [32], the Apprentice/QKD-style baseline: ``FP``; ledger B11); ``—`` for none."""
    if teacher_bits == NO_TEACHERS:
        return "—"
    return "-".join("FP" if bits == "32" else bits for bits in str(teacher_bits).split("-"))


def paper_note(row, notes: Notes) -> str:
    note = f" {row['note']}." if isinstance(row.get("note"), str) and row["note"] else ""
    return notes.mark(f"{row['provenance']}: {row['source']}.{note}")


def setting(row) -> str:
    return f"{row['dataset']} {row['arch']} {bits_label(int(row['w_bits']), int(row['a_bits']))}"


def bits_columns(frame: pd.DataFrame) -> list[str]:
    pairs = sorted({(int(w), int(a)) for w, a in zip(frame["w_bits"], frame["a_bits"])})
    return [bits_label(w, a) for w, a in pairs]


# ------------------------------------------------------------------------------------ tables
def main_table(summary: pd.DataFrame, paper: pd.DataFrame, fmt: Fmt) -> tuple[pd.DataFrame, list, pd.DataFrame]:
    notes = Notes()
    present = set(zip(summary["dataset"], summary["arch"]))
    reported = paper.loc[[(d, a) in present for d, a in zip(paper["dataset"], paper["arch"])]]
    reported = reported[reported["top1"].notna()].assign(origin="reported")
    cells = pd.concat([summary, reported], ignore_index=True)
    cells = sort_rows(cells) if len(cells) else cells
    columns = bits_columns(cells) if len(cells) else []
    table_rows: dict[tuple, dict] = {}
    for row in cells.to_dict("records"):
        label = source_label(row, notes, fmt)
        key = (row["dataset"], row["arch"], row["method"], row["teacher_bits"], label)
        line = table_rows.setdefault(key, {
            "Dataset": row["dataset"], "Arch": row["arch"], "Method": method_label(row["method"], notes, fmt),
            "Teachers": teachers_label(row["teacher_bits"]), "Source": label,
            **{c: "" for c in columns}})
        column = bits_label(int(row["w_bits"]), int(row["a_bits"]))
        if row["origin"] == "reported":
            line[column] = fmt.reported(row["top1"], paper_note(row, notes))
        else:
            line[column] = fmt.cell(row)
    display = pd.DataFrame(list(table_rows.values()), columns=["Dataset", "Arch", "Method", "Teachers", "Source",
                                                               *columns])
    tidy = cells.rename(columns={"top1": "reported_top1", "top5": "reported_top5"})
    tidy = tidy.reindex(columns=[*KEY, "origin", "source", "top1_mean", "top1_ci95", "top1_std", "top5_mean",
                                 "top5_ci95", "top5_std", "n", "n_expected", "n_not_converged", "val_gain_mean",
                                 "not_converged", "seeds", "reported_top1",
                                 "reported_top5", "provenance"])
    return display, notes.lines(), tidy


def ablation_table(summary: pd.DataFrame, paper: pd.DataFrame, fmt: Fmt) -> tuple[pd.DataFrame, list, pd.DataFrame]:
    notes = Notes()
    ours = summary[(summary["origin"] == "ours") & summary["method"].isin(ABLATION_VARIANTS)]
    reported_variants = paper[paper["method"].isin(ABLATION_VARIANTS)]
    settings = sorted({setting(r) for r in ours.to_dict("records")})
    paper_settings = sorted({setting(r) for r in reported_variants.to_dict("records")})
    every = settings + [s for s in paper_settings if s not in settings]  # ours first, then the paper's
    columns = [(s, "ours") for s in every if s in settings] + [(s, "reported") for s in every if s in paper_settings]
    columns.sort(key=lambda c: (every.index(c[0]), c[1] != "ours"))
    names = [f"{s}: {kind}" for s, kind in columns]
    # Others at the same settings (imported results, reported numbers of other methods): next to CMT-KD.
    at_settings = lambda frame: frame.loc[frame.apply(lambda r: setting(r) in every, axis=1).astype(bool)] \
        if len(frame) else frame
    others = at_settings(summary[summary["origin"] != "ours"])
    other_reported = at_settings(paper[~paper["method"].isin(ABLATION_VARIANTS)]).assign(origin="reported")
    rows, tidy = [], []
    teacher_sets = {m: sorted(set(ours[ours["method"] == m]["teacher_bits"])) or [NO_TEACHERS]
                    for m in ABLATION_VARIANTS}
    for method, variant in ABLATION_VARIANTS.items():
        for tset in teacher_sets[method]:
            line = {"Variant": variant, "Method": method, "Teachers": teachers_label(tset),
                    "Source": "ours", **{n: "—" for n in names}}
            for r in ours[(ours["method"] == method) & (ours["teacher_bits"] == tset)].to_dict("records"):
                line[f"{setting(r)}: ours"] = fmt.cell(r)
                tidy.append({**{k: r[k] for k in KEY}, "variant": variant, "origin": "ours", "source": "ours",
                             "top1_mean": r["top1_mean"], "top1_ci95": r["top1_ci95"], "top1_std": r["top1_std"],
                             "n": r["n"], "n_expected": r["n_expected"], "n_not_converged": r["n_not_converged"],
                             "val_gain_mean": r["val_gain_mean"], "not_converged": r["not_converged"]})
            for r in reported_variants[reported_variants["method"] == method].to_dict("records"):
                line[f"{setting(r)}: reported"] = fmt.reported(r["top1"], paper_note(r, notes))
                tidy.append({**{k: r[k] for k in KEY if k != "teacher_bits"}, "teacher_bits": NO_TEACHERS,
                             "variant": variant, "origin": "reported", "source": r["source"],
                             "reported_top1": r["top1"], "provenance": r["provenance"]})
            rows.append(line)
    for r in sort_rows(others).to_dict("records") + other_reported.to_dict("records"):
        label = source_label(r, notes, fmt)
        line = {"Variant": "(comparison)", "Method": method_label(r["method"], notes, fmt),
                "Teachers": teachers_label(r["teacher_bits"]), "Source": label,
                **{n: "" for n in names}}
        if r["origin"] == "reported":
            if f"{setting(r)}: reported" in line:
                line[f"{setting(r)}: reported"] = fmt.reported(r["top1"], paper_note(r, notes))
        elif f"{setting(r)}: ours" in line:
            line[f"{setting(r)}: ours"] = fmt.cell(r)
        rows.append(line)
        tidy.append({**{k: r[k] for k in KEY}, "variant": "(comparison)", "origin": r["origin"],
                     "source": r["source"], "top1_mean": r.get("top1_mean"), "top1_ci95": r.get("top1_ci95"),
                     "top1_std": r.get("top1_std"), "n": r.get("n"), "n_expected": r.get("n_expected"),
                     "n_not_converged": r.get("n_not_converged"), "val_gain_mean": r.get("val_gain_mean"),
                     "not_converged": r.get("not_converged"), "reported_top1": r.get("top1"),
                     "provenance": r.get("provenance")})
    display = pd.DataFrame(rows, columns=["Variant", "Method", "Teachers", "Source", *names])
    tidy = pd.DataFrame(tidy).reindex(columns=["variant", *KEY, "origin", "source", "top1_mean", "top1_ci95",
                                               "top1_std", "n", "n_expected", "n_not_converged", "val_gain_mean",
                                               "not_converged", "reported_top1",
                                               "provenance"])
    return display, notes.lines(), tidy


def delta_table(summary: pd.DataFrame, paper: pd.DataFrame, fmt: Fmt) -> tuple[pd.DataFrame, list, pd.DataFrame]:
    notes = Notes()
    rows, tidy = [], []
    setting_key = ["method", "dataset", "arch", "w_bits", "a_bits"]
    for p in paper.to_dict("records"):
        marker = paper_note(p, notes)
        match = summary[(summary[setting_key] == pd.Series({k: p[k] for k in setting_key})).all(axis=1)
                        & (summary["n"] > 0)]
        candidates = match.to_dict("records") or [None]
        for m in candidates:
            d1 = None if m is None else m["top1_mean"] - p["top1"]
            d5 = None if m is None or p.get("top5") != p.get("top5") else m["top5_mean"] - p["top5"]
            rows.append({
                "Method": p["method"], "Dataset": p["dataset"], "Arch": p["arch"],
                "W/A": bits_label(int(p["w_bits"]), int(p["a_bits"])),
                "Reported top-1": fmt.reported(p["top1"], marker),
                "Ours / imported": "not run" if m is None else source_label(m, notes, fmt),
                "Teachers": "—" if m is None else teachers_label(m["teacher_bits"]),
                "Top-1": "—" if m is None else fmt.cell(m),
                "Δ top-1": fmt.delta(d1), "Δ top-5": fmt.delta(d5),
            })
            tidy.append({**{k: p[k] for k in setting_key}, "reported_top1": p["top1"], "reported_top5": p.get("top5"),
                         "provenance": p["provenance"], "source": None if m is None else m["source"],
                         "teacher_bits": None if m is None else m["teacher_bits"],
                         "top1_mean": None if m is None else m["top1_mean"],
                         "top1_ci95": None if m is None else m["top1_ci95"],
                         "top1_std": None if m is None else m["top1_std"],
                         "top5_mean": None if m is None else m["top5_mean"], "n": None if m is None else m["n"],
                         "n_not_converged": None if m is None else m["n_not_converged"],
                         "val_gain_mean": None if m is None else m["val_gain_mean"],
                         "not_converged": None if m is None else m["not_converged"],
                         "delta_top1": d1, "delta_top5": d5})
    display = pd.DataFrame(rows, columns=["Method", "Dataset", "Arch", "W/A", "Reported top-1", "Ours / imported",
                                          "Teachers", "Top-1", "Δ top-1", "Δ top-5"])
    return display, notes.lines(), pd.DataFrame(tidy)


COMPARISON_FIELDS = ["dataset", "arch", "w_bits", "a_bits", "method", "teacher_bits", "reference",
                     "reference_teacher_bits", "n_pairs", "seeds", "diff_mean", "diff_ci95", "diff_ci95_low",
                     "diff_ci95_high", "diff_std", "p_value", "p_holm", "verdict", "n_not_converged",
                     "not_converged"]


def reference_sets(teacher_bits: str, reference_bits: list[str]) -> list[str]:
    """The CMT-KD teacher sets a method's cell is compared with: its own set; for a one-teacher method
    the sets whose highest bit-width it uses (ASSUMPTIONS.md W3); for a method without teachers every set."""
    if teacher_bits in reference_bits:
        return [teacher_bits]
    if teacher_bits == NO_TEACHERS:
        return list(reference_bits)
    if "-" not in teacher_bits:
        return [t for t in reference_bits if max(int(b) for b in t.split("-")) == int(teacher_bits)]
    return []


def compare_cells(setting_key: dict, cell: pd.DataFrame, reference: pd.DataFrame) -> dict:
    """One comparison: ``cell``'s runs minus ``reference``'s runs, paired by seed (no Holm yet)."""
    by_seed = lambda frame: {int(s): float(t) for s, t in zip(frame["seed"], frame["top1"])}  # noqa: E731
    mine, theirs = by_seed(cell), by_seed(reference)
    paired = paired_difference(mine, theirs)
    seeds = sorted(set(mine) & set(theirs))
    mine_c, theirs_c = (cell_convergence(frame[frame["seed"].isin(seeds)]) for frame in (cell, reference))
    return {**setting_key, "method": cell["method"].iloc[0], "teacher_bits": cell["teacher_bits"].iloc[0],
            "reference": REFERENCE, "reference_teacher_bits": reference["teacher_bits"].iloc[0],
            "n_pairs": paired.n_pairs, "seeds": ",".join(map(str, seeds)), "diff_mean": paired.mean,
            "diff_ci95": paired.ci95, "diff_ci95_low": paired.mean - paired.ci95,
            "diff_ci95_high": paired.mean + paired.ci95, "diff_std": paired.std, "p_value": paired.p_value,
            "n_not_converged": mine_c.n_not_converged + theirs_c.n_not_converged,
            "not_converged": mine_c.not_converged or theirs_c.not_converged}


def comparisons(runs: pd.DataFrame) -> pd.DataFrame:
    """Every method of ours (grid runs) against CMT-KD at the same dataset, arch and W/A, paired by
    seed; p-values Holm-adjusted across all rows, then the verdicts (seed_stats)."""
    ours = runs[(runs["role"] == "grid") & runs["top1"].notna()]
    setting_columns = ["dataset", "arch", "w_bits", "a_bits"]
    rows = []
    for values, group in ours.groupby(setting_columns, sort=False):
        reference = group[group["method"] == REFERENCE]
        reference_bits = sorted(set(reference["teacher_bits"]))
        for _, cell in group[group["method"] != REFERENCE].groupby(["method", "teacher_bits"], sort=False):
            for bits in reference_sets(cell["teacher_bits"].iloc[0], reference_bits):
                rows.append(compare_cells(dict(zip(setting_columns, values)), cell,
                                          reference[reference["teacher_bits"] == bits]))
    frame = pd.DataFrame(rows, columns=COMPARISON_FIELDS)
    frame["p_holm"] = holm(frame["p_value"].to_numpy(dtype=float))
    frame["verdict"] = [verdict(d, n, p) for d, n, p in zip(frame["diff_mean"], frame["n_pairs"], frame["p_holm"])]
    if len(frame):
        frame = sort_rows(frame.assign(origin="ours", source="ours")).drop(columns=["origin", "source"])
    return frame.astype({"n_pairs": int, "n_not_converged": int, "not_converged": bool})


def comparison_table(runs: pd.DataFrame, fmt: Fmt) -> tuple[pd.DataFrame, list, pd.DataFrame]:
    notes = Notes()
    tidy = comparisons(runs)
    rows = [{
        "Dataset": r["dataset"], "Arch": r["arch"], "W/A": bits_label(int(r["w_bits"]), int(r["a_bits"])),
        "Method": method_label(r["method"], notes, fmt),
        "Teachers": teachers_label(r["teacher_bits"]),
        "CMT-KD teachers": r["reference_teacher_bits"], "Pairs": f"n={r['n_pairs']}",
        "Δ top-1 (95 % CI)": fmt.difference(r["diff_mean"], r["diff_ci95"], r["n_pairs"], r["not_converged"]),
        "p": fmt.p_value(r["p_value"]), "p (Holm)": fmt.p_value(r["p_holm"]), "Verdict": r["verdict"],
    } for r in tidy.to_dict("records")]
    display = pd.DataFrame(rows, columns=["Dataset", "Arch", "W/A", "Method", "Teachers", "CMT-KD teachers", "Pairs",
                                          "Δ top-1 (95 % CI)", "p", "p (Holm)", "Verdict"])
    return display, notes.lines(), tidy


# ----------------------------------------------------------------------------------- teachers
TEACHER_COLUMNS = ["dataset", "arch", "w_bits", "a_bits", "teacher_set", "teacher_bits"]
# per seed: each teacher head trained jointly / in the teachers-only stage / alone, and the teachers' combined
# logit z_T (what CE_T trains with teacher_loss=combined) jointly (logged by runs since val_top1_teachers) / in the stage
TEACHER_VALUES = ["joint", "stage", "alone", "joint_ensemble", "stage_ensemble"]


def last_value(histories: pd.DataFrame, key: dict, column: str) -> float:
    """``column`` of the last epoch of the run ``key`` in a histories table (NaN when absent)."""
    if histories is None or histories.empty or column not in histories:
        return math.nan
    rows = histories
    for k, v in key.items():
        rows = rows[rows[k].astype(str) == str(v)]
    rows = rows[rows[column].notna()]
    return math.nan if rows.empty else float(rows.sort_values("epoch")[column].iloc[-1])


def teacher_seeds(runs: pd.DataFrame, histories: pd.DataFrame, alone: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per CMT-KD run (``cmtkd``) and teacher bit-width b: the teacher's validation top-1 at the last epoch
    when trained jointly with the student (``joint``, the run's history), in the teachers-only stage of
    cmtkd-frozen (``stage``: the ``cmtkd-teachers`` run of the same set and seed) and alone (``alone``: the
    ``qat`` run at W = A = b with seed 1000 b + s, the teacher kd/mtkd load; from ``alone``'s histories, by
    default the same table); and the teachers' combined logit z_T, jointly (``joint_ensemble``, NaN for runs
    made before CMT-KD logged it) and in the stage (``stage_ensemble``). The last epoch, not a selected one:
    neither side is picked by validation."""
    alone = histories if alone is None else alone
    rows = []
    for r in runs[runs["method"] == REFERENCE].to_dict("records"):
        key = {c: r[c] for c in [*KEY, "seed"]}
        stage = {**key, "method": "cmtkd-teachers", "w_bits": 32, "a_bits": 32}
        for i, bits in enumerate(teacher_list(r["teacher_bits"])):
            column = f"val_top1_teacher{i}_w{bits}a{bits}"
            single = {"method": "qat", "dataset": r["dataset"], "arch": r["arch"], "w_bits": bits, "a_bits": bits,
                      "seed": teacher_seed(int(r["seed"]), bits)}
            rows.append({"dataset": r["dataset"], "arch": r["arch"], "w_bits": int(r["w_bits"]),
                         "a_bits": int(r["a_bits"]), "teacher_set": r["teacher_bits"], "teacher_bits": bits,
                         "seed": int(r["seed"]), "joint": last_value(histories, key, column),
                         "stage": last_value(histories, stage, column),
                         "alone": last_value(alone, single, seed_stats.VAL_COLUMN),
                         "joint_ensemble": last_value(histories, key, "val_top1_teachers"),
                         "stage_ensemble": last_value(histories, stage, seed_stats.VAL_COLUMN)})
    return pd.DataFrame(rows, columns=[*TEACHER_COLUMNS, "seed", *TEACHER_VALUES])


def teacher_summary(per_seed: pd.DataFrame, by: list[str] = TEACHER_COLUMNS) -> pd.DataFrame:
    """Mean ± 95 % t interval of joint, stage and alone per teacher; joint − alone paired by seed, Holm."""
    out = []
    for values, part in per_seed.groupby(by, sort=False):
        values = values if isinstance(values, tuple) else (values,)
        paired = paired_difference({s: v for s, v in zip(part["seed"], part["joint"]) if not pd.isna(v)},
                                   {s: v for s, v in zip(part["seed"], part["alone"]) if not pd.isna(v)})
        row = dict(zip(by, values))
        for column in TEACHER_VALUES:
            cell = spread(part[column])
            row.update({column: cell.mean, f"{column}_ci95": cell.ci95, f"{column}_n": cell.n})
        row.update(joint_minus_alone=paired.mean, ci95=paired.ci95, n_pairs=paired.n_pairs, p_value=paired.p_value)
        out.append(row)
    stats = [f"{c}{suffix}" for c in TEACHER_VALUES for suffix in ("", "_ci95", "_n")]
    tidy = pd.DataFrame(out, columns=[*by, *stats, "joint_minus_alone", "ci95", "n_pairs", "p_value"])
    tidy["p_holm"] = holm(tidy["p_value"]) if len(tidy) else []
    return tidy


def teachers_display(tidy: pd.DataFrame, fmt: "Fmt", by: list[str] = TEACHER_COLUMNS) -> pd.DataFrame:
    pm = r"$\pm$" if fmt.kind == "tex" else "±"

    def value(mean, ci):
        return "—" if pd.isna(mean) else fmt.tex(f"{mean:.2f}" if pd.isna(ci) else f"{mean:.2f} {pm} {ci:.2f}")

    shown = {"dataset": "Dataset", "arch": "Arch", "teacher_set": "Teachers", "axis": "Axis", "level": "Level"}
    rows = []
    for r in tidy.to_dict("records"):
        row = {shown[c]: (teachers_label(r[c]) if c == "teacher_set" else r[c]) for c in by if c in shown}
        if "w_bits" in by:
            row["Student"] = bits_label(int(r["w_bits"]), int(r["a_bits"]))
        row.update({"Teacher": f"W{r['teacher_bits']}A{r['teacher_bits']}",
                    "Joint (CMT-KD)": value(r["joint"], r["joint_ci95"]),
                    "Teachers-only stage": value(r["stage"], r["stage_ci95"]),
                    "Alone (qat)": value(r["alone"], r["alone_ci95"]),
                    "z_T joint": value(r["joint_ensemble"], r["joint_ensemble_ci95"]),
                    "z_T stage": value(r["stage_ensemble"], r["stage_ensemble_ci95"]),
                    "Joint − alone": fmt.difference(r["joint_minus_alone"], r["ci95"], r["n_pairs"])
                    if not pd.isna(r["joint_minus_alone"]) else "—",
                    "Pairs": r["n_pairs"], "p (Holm)": fmt.p_value(r["p_holm"])})
        rows.append(row)
    return pd.DataFrame(rows)


def teachers_table(runs: pd.DataFrame, histories: pd.DataFrame | None, fmt) -> tuple[pd.DataFrame, list, pd.DataFrame]:
    tidy = teacher_summary(teacher_seeds(runs, histories if histories is not None else pd.DataFrame()))
    return teachers_display(tidy, fmt), [], tidy


TITLES = {
    "main": "Main comparison: top-1 accuracy (%) by student bit-width",
    "ablation": "Ablation of CMT-KD (rows as in the paper's Table 1, then further switches): top-1 accuracy (%)",
    "paper_delta": "Difference to reported numbers (ours − reported, top-1/top-5 points)",
    "comparison": "Each method against CMT-KD, paired by seed: Δ top-1 (points), paired t-test, Holm-adjusted",
    "teachers": "CMT-KD's teachers trained jointly, in the teachers-only stage and alone: validation top-1 (%)",
}


def write_tidy_csv(tidy: pd.DataFrame, path: Path) -> None:
    """A table's tidy CSV: counts as integers, p-values with 6 significant digits, the rest 4 decimals."""
    tidy = tidy.copy()
    for column in ("n", "n_expected", "n_not_converged", "n_pairs"):
        if column in tidy:
            tidy[column] = tidy[column].astype("Int64")
    for column in ("p_value", "p_holm"):  # small p-values need more than float_format's 4 decimals
        if column in tidy:
            tidy[column] = tidy[column].map(lambda p: "" if pd.isna(p) else f"{p:.6g}")
    tidy.to_csv(path, index=False, float_format="%.4f")


def write_markdown(path: Path, title: str, display: pd.DataFrame, notes: list, general: list = GENERAL_NOTES) -> None:
    lines = [f"# {title}", "", display.to_markdown(index=False) if len(display) else "(no rows)", ""]
    lines += [f"- {text}" for text in general]
    lines += [f"- {marker} {text}" if marker == DAGGER else f"- [{marker}] {text}" for marker, text in notes]
    path.write_text("\n".join(lines) + "\n")


def write_latex(path: Path, name: str, title: str, display: pd.DataFrame, notes: list,
                general: list = GENERAL_NOTES) -> None:
    shown = display.map(lambda cell: cell if isinstance(cell, Tex) else tex_escape(cell))
    shown = shown.rename(columns={c: tex_escape(c) for c in display.columns})
    styler = shown.style.hide(axis="index")
    body = styler.to_latex(hrules=True, caption=tex_escape(title), label=f"tab:{name}", position="htbp",
                           position_float="centering", column_format="l" * len(shown.columns))
    notes_tex = [tex_escape(text) for text in general]
    notes_tex += [rf"\dag\,{tex_escape(text)}" if marker == DAGGER else
                  rf"\textsuperscript{{{marker}}}\,{tex_escape(text)}" for marker, text in notes]
    footer = "\\par\\smallskip\n{\\footnotesize\n" + "\\\\\n".join(notes_tex) + "\n}\n"
    body = body.replace("\\end{table}", footer + "\\end{table}")
    header = "% Generated by workflow/scripts/make_tables.py; needs \\usepackage{booktabs}.\n"
    path.write_text(header + tex_ascii(body))  # cells written as LaTeX (Tex) may hold Unicode too


def read_histories(path: str | None) -> pd.DataFrame | None:
    if not path:
        return None
    return read_csv(path, columns=[*KEY, "seed", "epoch"], numbers=["epoch"], dtype={"teacher_bits": str},
                    keep_default_na=False, na_values=[""], fix="rebuild it with `snakemake tables`")


def build(runs_csv, grid_csv, paper_csv, external_csvs, out_dir, schema=SCHEMA, histories_csv=None) -> None:
    runs, grid, paper = read_runs(runs_csv), read_grid(grid_csv), read_paper(paper_csv)
    histories = read_histories(histories_csv)
    summary = summarize(runs, grid, read_external(external_csvs, schema))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    compare = lambda _summary, _paper, fmt: comparison_table(runs, fmt)  # noqa: E731  (runs, not cells)
    teachers = lambda _summary, _paper, fmt: teachers_table(runs, histories, fmt)  # noqa: E731
    for name, make in (("main", main_table), ("ablation", ablation_table), ("paper_delta", delta_table),
                       ("comparison", compare), ("teachers", teachers)):
        general = GENERAL_NOTES + TABLE_NOTES.get(name, [])
        display, notes, tidy = make(summary, paper, fmt := Fmt("md"))
        write_tidy_csv(tidy, out / f"{name}.csv")
        write_markdown(out / f"{name}.md", TITLES[name], display, notes + fmt.notes(), general)
        display, notes, _ = make(summary, paper, fmt := Fmt("tex"))
        write_latex(out / f"{name}.tex", name, TITLES[name], display, notes + fmt.notes(), general)
        print(f"{out / name}.{{csv,md,tex}}: {len(display)} rows")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n")[0])
    parser.add_argument("--runs", required=True, help="results/runs.csv")
    parser.add_argument("--grid", required=True, help="results/grid.csv (expected seeds per cell)")
    parser.add_argument("--paper", required=True, help="results/paper/reported.csv")
    parser.add_argument("--external", nargs="*", default=[], help="imported results in the runs.csv columns")
    parser.add_argument("--schema", default=str(SCHEMA), help="JSON schema of a runs.csv row")
    parser.add_argument("--histories", help="results/runs/histories.csv (for the teachers table; without it the "
                                            "table has no teacher accuracies)")
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args(argv)
    try:
        build(args.runs, args.grid, args.paper, args.external, args.out_dir, args.schema, args.histories)
    except UserError as exc:  # an input file it cannot use (script_io.InputError): one line naming it
        return error(exc)
    except OSError as exc:  # e.g. an --out-dir it cannot write to
        return error(f"{exc.filename or args.out_dir}: {exc.strerror or exc}")
    return 0


if __name__ == "__main__":
    if "snakemake" in globals():  # rule make_tables (script: directive)
        from script_io import run_rule

        sm = snakemake  # noqa: F821
        sys.exit(run_rule(main, ["--runs", sm.input.runs, "--grid", sm.input.grid, "--paper", sm.input.paper,
                                 "--schema", str(sm.input.schema), "--histories", sm.input.histories,
                                 "--external", *sm.input.external,
                                 "--out-dir", str(Path(sm.output.main_csv).parent)], sm.log[0]))
    sys.exit(main())
