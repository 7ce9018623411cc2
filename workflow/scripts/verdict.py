"""The verdict study (config/verdict.yaml, README "Evidence"): why CMT-KD trails on ResNet-18.

    verdict.py plan    [--config config/verdict.yaml] [--dir studies/verdict]   levels, runs, estimated hours
    verdict.py run     [--config ...] [--dir ...] [--cores 2]                    train every level (resumes)
    verdict.py publish [--config ...] [--dir ...] [--out results/verdict]        tables, plots, fingerprints
    make verdict                                                                 run, then publish

The study file is an ordinary suite config (the reference recipe, its methods and seeds) plus a
``study`` section of **axes**, each a mapping of levels. A level is ``{}`` (the suite as it is: the
study's base point, shared by every axis) or ``{set: {...}, methods: [...]}``: ``set`` is layered over
the suite (any suite key: ``recipe.epochs``, ``recipe.init``, ``method_args.cmtkd.fusion_input``), and
``methods`` keeps only those methods in the level's grid; the level's other methods are compared from
the base point, whose runs are the same runs (nothing in them changes with the level). One factor at a
time: every level differs from the base point in its own ``set`` only.

``run`` writes each distinct level's suite (``DIR/<axis>~<level>/suite.yaml``; the base point in
``DIR/base/``) and runs Snakemake on it (``--configfile`` that file, ``--directory`` its folder, every
run trained once; an interrupted study resumes where it stopped, as any suite does). ``publish`` checks
that every level is complete, publishes each level as the reference is published
(``publish_results.py``: runs.csv, tables, plots, FINGERPRINT.json per level, in ``OUT/<level>/``) and
writes the study's own tables and plot into ``OUT/tables`` and ``OUT/plots``:

- ``verdict``: per axis and level, CMT-KD minus each baseline, paired by seed (mean, 95 % t interval,
  raw p of the paired t-test, Holm over every comparison of the study, verdict at 5 %);
- ``level_effect``: each method at each level minus itself at the base point, paired by seed (what a
  level does to every method it retrains);
- ``accuracy``: every method's top-1 (mean ± 95 % t interval over seeds) per axis and level;
- ``teachers``: CMT-KD's jointly trained teachers next to independently trained ``qat`` teachers of
  the same bits (and the teachers-only stage of ``cmtkd-frozen``), validation top-1 at the last epoch
  (neither side is selected by epoch), paired by student seed;
- ``importance``: CMT-KD's importance weights pi at the last epoch per level (does theta learn?);
- ``plots/length.{png,pdf}``: CMT-KD − KD and CMT-KD − MTKD (and the other baselines) against training
  length, with their intervals.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grid  # noqa: E402
import make_tables  # noqa: E402
import seed_stats  # noqa: E402
import suite_config  # noqa: E402
from script_io import InputError, error, read_csv, write_text  # noqa: E402

ROOT = suite_config.ROOT
BASE = "base"  # the directory of the study's base point
CMTKD = "cmtkd"  # the method every baseline is compared with
STUDY_KEYS = {"set", "methods"}
REFERENCE_EPOCHS = 13  # config/reference.yaml's recipe, which results/reference/runs.csv timed
RUN_OVERHEAD_S = 6.0  # per run: process start, data, the standalone evaluation (measured: ~5-7 s)


class StudyError(ValueError):
    """A study file the driver cannot run; the message names the key."""


# ------------------------------------------------------------------------------------ levels
def read_study(path: str | Path) -> tuple[dict, dict]:
    """(the suite config without ``study``, the ``study`` section), checked."""
    raw = suite_config.read_yaml(path)
    study = raw.pop("study", None)
    if not isinstance(study, dict) or not isinstance(study.get("axes"), dict) or not study["axes"]:
        raise StudyError(f"{path}: a study file needs 'study: {{axes: {{AXIS: {{LEVEL: {{...}}}}}}}}' "
                         f"(see workflow/scripts/verdict.py)")
    for axis, levels in study["axes"].items():
        if not isinstance(levels, dict) or len(levels) < 2:
            raise StudyError(f"{path}: study.axes.{axis} must map at least two level names to their settings")
        if sum(1 for spec in levels.values() if not spec) != 1:
            raise StudyError(f"{path}: study.axes.{axis} needs exactly one level that is '{{}}' (the base point)")
        for level, spec in levels.items():
            if not grid.LEVEL_TEXT.match(str(level)):
                raise StudyError(f"{path}: study.axes.{axis}.{level}: a level name names a folder (letters, digits, . _ + -)")
            unknown = set(spec or {}) - STUDY_KEYS
            if unknown:
                raise StudyError(f"{path}: study.axes.{axis}.{level}: unknown key(s) {sorted(unknown)}; a level has "
                                 f"'set' (suite keys layered over the study's suite) and 'methods'")
    return raw, study


def level_suite(suite: dict, spec: dict) -> dict:
    """The suite of one level: ``set`` layered over the suite, experiments cut to ``methods``."""
    config = grid.merge(suite, (spec or {}).get("set", {}))
    keep = (spec or {}).get("methods")
    if keep:
        experiments = {}
        for name, exp in config["experiments"].items():
            methods = [m for m in exp["methods"] if m in keep]
            if methods:
                experiments[name] = {**exp, "methods": methods}
        config["experiments"] = experiments
    return config


def levels(suite: dict, study: dict) -> pd.DataFrame:
    """One row per (axis, level): its folder name, its methods (None: all) and its suite config."""
    rows = []
    for axis, specs in study["axes"].items():
        for level, spec in specs.items():
            name = BASE if not spec else f"{axis}~{level}"
            rows.append({"axis": axis, "level": str(level), "suite": name, "methods": (spec or {}).get("methods"),
                         "config": level_suite(suite, spec)})
    return pd.DataFrame(rows)


def suites(table: pd.DataFrame) -> dict[str, dict]:
    """Each distinct level suite once, by folder name (the base point first)."""
    out = {}
    for row in table.to_dict("records"):
        out.setdefault(row["suite"], row["config"])
    return dict(sorted(out.items(), key=lambda item: item[0] != BASE))


def write_suites(table: pd.DataFrame, directory: Path) -> dict[str, Path]:
    paths = {}
    for name, config in suites(table).items():
        path = directory / name / "suite.yaml"
        text = "# written by workflow/scripts/verdict.py from the study file; do not edit\n" + \
            __import__("yaml").safe_dump(config, sort_keys=False)
        if not path.is_file() or path.read_text() != text:
            write_text(path, text)
        paths[name] = path.resolve()
    return paths


def expanded(path: Path) -> pd.DataFrame:
    """The runs of a written level suite, as the workflow expands them (config/config.yaml under it)."""
    try:
        return grid.expand(suite_config.load_suite([path])[0])
    except (suite_config.SuiteConfigError, grid.GridError) as exc:
        raise StudyError(str(exc)) from None


# ------------------------------------------------------------------------------------ plan / run
def estimate(paths: dict[str, Path], reference_runs: Path, cores: int) -> pd.DataFrame:
    """Runs and estimated single-core hours per level suite: each run priced at the mean
    ``train_seconds`` of its (method, arch, W/A) in the reference (1 thread per run) scaled by its epochs."""
    ref = read_csv(reference_runs, columns=["method", "arch", "w_bits", "train_seconds"], numbers=["train_seconds"])
    per_epoch = (ref.assign(s=ref["train_seconds"] / REFERENCE_EPOCHS)
                 .groupby(["method", "arch", "w_bits"])["s"].mean().to_dict())
    by_method = (ref.assign(s=ref["train_seconds"] / REFERENCE_EPOCHS).groupby(["method", "arch"])["s"].mean().to_dict())
    rows = []
    for name, path in paths.items():
        runs = expanded(path)
        seconds = [per_epoch.get((r["method"], r["arch"], r["w_bits"]), by_method.get((r["method"], r["arch"]), math.nan))
                   * r["epochs"] + RUN_OVERHEAD_S for r in runs.to_dict("records")]
        rows.append({"suite": name, "runs": len(runs), "cpu_hours": sum(seconds) / 3600,
                     "wall_hours": sum(seconds) / 3600 / cores})
    return pd.DataFrame(rows)


def run(config_path: Path, directory: Path, cores: int) -> int:
    suite, study = read_study(config_path)
    table = levels(suite, study)
    paths = write_suites(table, directory)
    for name, path in paths.items():
        print(f"verdict: level suite {name} ({path})", flush=True)
        start = time.time()
        command = [sys.executable, "-m", "snakemake", "--cores", str(cores), "--configfile", str(path),
                   "--directory", str(path.parent), "--snakefile", str(ROOT / "Snakefile"), "--rerun-incomplete"]
        status = subprocess.call(command)
        if status:
            print(f"cmtkd: error: level suite {name} stopped (exit {status}); rerun the same command to resume",
                  file=sys.stderr)
            return status
        print(f"verdict: {name} done in {time.time() - start:.0f} s", flush=True)
    return 0


# ------------------------------------------------------------------------------------ tables
def method_label(method: str, teacher_bits: str) -> str:
    """``kd (FP teacher)`` for a full-precision teacher, ``kd (8)``, ``mtkd (8-6-4)``; plain otherwise."""
    if teacher_bits in ("", grid.NO_TEACHERS) or pd.isna(teacher_bits):
        return method
    if str(teacher_bits) == str(grid.FULL_PRECISION):
        return f"{method} (FP teacher)"
    return f"{method} ({teacher_bits})"


def read_level_runs(directory: Path, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    runs = read_csv(directory / name / "results" / "runs.csv", columns=[*grid.COLUMNS, "role", "top1"],
                    numbers=["top1"], dtype={"teacher_bits": str}, keep_default_na=False, na_values=[""])
    histories = read_csv(directory / name / "results" / "runs" / "histories.csv", columns=[*grid.COLUMNS, "epoch"],
                         dtype={"teacher_bits": str}, keep_default_na=False, na_values=[""])
    return runs, histories


def level_runs(table: pd.DataFrame, data: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per (axis, level): the grid runs it compares (its own methods from its suite, the others from
    the base point), labelled."""
    frames = []
    for row in table.to_dict("records"):
        own = data[row["suite"]]
        own = own[own["role"] == "grid"].assign(suite=row["suite"])
        if row["methods"]:
            base = data[BASE]
            base = base[(base["role"] == "grid") & ~base["method"].isin(row["methods"])].assign(suite=BASE)
            own = pd.concat([own[own["method"].isin(row["methods"])], base])
        frames.append(own.assign(axis=row["axis"], level=row["level"]))
    runs = pd.concat(frames, ignore_index=True)
    runs["label"] = [method_label(m, t) for m, t in zip(runs["method"], runs["teacher_bits"])]
    return runs


SETTING = ["dataset", "arch", "w_bits", "a_bits"]  # a table cell, seeds aside


def verdict_table(runs: pd.DataFrame) -> pd.DataFrame:
    """CMT-KD − each baseline, per axis, level and setting, paired by seed; Holm over all of them."""
    rows = []
    for (axis, level, *cell), part in runs.groupby(["axis", "level", *SETTING], sort=False):
        ours = part[part["method"] == CMTKD]
        if ours.empty:
            continue
        mine = dict(zip(ours["seed"], ours["top1"]))
        for label, other in part[part["method"] != CMTKD].groupby("label", sort=False):
            paired = seed_stats.paired_difference(mine, dict(zip(other["seed"], other["top1"])))
            rows.append({"axis": axis, "level": level, **dict(zip(SETTING, cell)), "baseline": label,
                         "cmtkd_top1": seed_stats.spread(ours["top1"]).mean,
                         "baseline_top1": seed_stats.spread(other["top1"]).mean, "difference": paired.mean,
                         "ci95": paired.ci95, "n_pairs": paired.n_pairs, "p_value": paired.p_value})
    tidy = pd.DataFrame(rows)
    tidy["p_holm"] = seed_stats.holm(tidy["p_value"])
    tidy["verdict"] = [seed_stats.verdict(d, n, p) for d, n, p in zip(tidy["difference"], tidy["n_pairs"],
                                                                      tidy["p_holm"])]
    return tidy


def level_effect_table(runs: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Each method at each level minus the same method at its axis's base point, paired by seed (how much
    the level moves every method, not only CMT-KD); Holm over the table. Methods a level does not
    retrain (its baselines come from the base point) are left out: their difference is zero by construction."""
    base_level = {r["axis"]: r["level"] for r in table.to_dict("records") if r["suite"] == BASE}
    retrained = {(r["axis"], r["level"]): r["methods"] for r in table.to_dict("records")}
    rows = []
    for (axis, level, *cell, label), part in runs.groupby(["axis", "level", *SETTING, "label"], sort=False):
        methods = retrained[(axis, level)]
        if level == base_level[axis] or (methods and part["method"].iloc[0] not in methods):
            continue
        base = runs[(runs["axis"] == axis) & (runs["level"] == base_level[axis]) & (runs["label"] == label)]
        for column, value in zip(SETTING, cell):
            base = base[base[column] == value]
        paired = seed_stats.paired_difference(dict(zip(part["seed"], part["top1"])), dict(zip(base["seed"], base["top1"])))
        rows.append({"axis": axis, "level": level, "base_level": base_level[axis], **dict(zip(SETTING, cell)),
                     "method": label, "top1": seed_stats.spread(part["top1"]).mean,
                     "base_top1": seed_stats.spread(base["top1"]).mean, "difference": paired.mean, "ci95": paired.ci95,
                     "n_pairs": paired.n_pairs, "p_value": paired.p_value})
    tidy = pd.DataFrame(rows)
    if len(tidy):
        tidy["p_holm"] = seed_stats.holm(tidy["p_value"])
    return tidy


def accuracy_table(runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (axis, level, *cell, label), part in runs.groupby(["axis", "level", *SETTING, "label"], sort=False):
        s = seed_stats.spread(part["top1"])
        rows.append({"axis": axis, "level": level, **dict(zip(SETTING, cell)), "method": label,
                     "top1": s.mean, "ci95": s.ci95, "n": s.n})
    return pd.DataFrame(rows)


def teachers_table(table: pd.DataFrame, data: dict, histories: dict) -> pd.DataFrame:
    """make_tables' teachers table per level with CMT-KD runs: each teacher's last-epoch validation top-1
    trained jointly, in the teachers-only stage and alone (qat; from the base point where the level
    trains only CMT-KD methods), joint − alone paired by student seed, Holm over the study."""
    frames = []
    for row in table.to_dict("records"):
        alone = histories[BASE] if row["methods"] else histories[row["suite"]]
        per_seed = make_tables.teacher_seeds(data[row["suite"]], histories[row["suite"]], alone)
        frames.append(per_seed.assign(axis=row["axis"], level=row["level"]))
    per_seed = pd.concat(frames, ignore_index=True)
    return make_tables.teacher_summary(per_seed, ["axis", "level", *make_tables.TEACHER_COLUMNS])


def importance_table(table: pd.DataFrame, histories: dict) -> pd.DataFrame:
    """Per level: CMT-KD's importance weights pi at the last epoch (mean over seeds, and the largest
    distance of any pi from 1/n): does theta learn anything?"""
    rows = []
    for row in table.to_dict("records"):
        hist = histories[row["suite"]]
        runs = hist[hist["method"] == CMTKD]
        columns = [c for c in runs.columns if c.startswith("pi_") and runs[c].notna().any()]
        if runs.empty or not columns:
            continue
        last = runs.sort_values("epoch").groupby("seed").tail(1)
        n = len({c.rsplit("_", 1)[1] for c in columns})
        rows.append({"axis": row["axis"], "level": row["level"], "seeds": len(last),
                     **{c: float(last[c].mean()) for c in columns},
                     "max_deviation": float((last[columns] - 1 / n).abs().max().max())})
    return pd.DataFrame(rows)


def fmt(mean: float, ci: float, digits: int = 2, sign: bool = False) -> str:
    if pd.isna(mean):
        return "–"
    text = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    return text if pd.isna(ci) else f"{text} ± {ci:.{digits}f}"


def p_text(p: float) -> str:
    return "–" if pd.isna(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")


def write_tables(tidy: dict[str, pd.DataFrame], out: Path) -> None:
    v, a, t, pi, e = tidy["verdict"], tidy["accuracy"], tidy["teachers"], tidy["importance"], tidy["level_effect"]
    shown = {
        "verdict": ("CMT-KD minus each baseline, paired by seed (top-1 points, 95 % t interval; Holm over all "
                    f"{len(v)} comparisons)", pd.DataFrame({
                        "axis": v["axis"], "level": v["level"], "setting": v["arch"] + " " +
                        [grid.bits_label(w, x) for w, x in zip(v["w_bits"], v["a_bits"])],
                        "baseline": v["baseline"], "CMT-KD": v["cmtkd_top1"].map("{:.2f}".format),
                        "baseline top-1": v["baseline_top1"].map("{:.2f}".format),
                        "CMT-KD − baseline": [fmt(d, c, sign=True) for d, c in zip(v["difference"], v["ci95"])],
                        "n": v["n_pairs"], "p": v["p_value"].map(p_text), "p (Holm)": v["p_holm"].map(p_text),
                        "verdict": v["verdict"]})),
        "accuracy": ("Test top-1 per axis level (mean ± 95 % t interval over seeds)", pd.DataFrame({
            "axis": a["axis"], "level": a["level"], "setting": a["arch"] + " " +
            [grid.bits_label(w, x) for w, x in zip(a["w_bits"], a["a_bits"])], "method": a["method"],
            "top-1": [fmt(m, c) for m, c in zip(a["top1"], a["ci95"])], "n": a["n"]})),
        "teachers": ("CMT-KD's teachers: trained jointly with the student (Joint), in the teachers-only stage of "
                     "cmtkd-frozen and alone as qat runs; validation top-1 at the last epoch, joint − alone paired "
                     "by student seed (Holm over the study)",
                     make_tables.teachers_display(t, make_tables.Fmt("md"),
                                                  ["axis", "level", *make_tables.TEACHER_COLUMNS])),
        "level_effect": ("Each method at each level minus the same method at its axis's base point, paired by seed "
                         "(points, 95 % t interval; Holm over this table)", pd.DataFrame({
                             "axis": e["axis"], "level": e["level"], "vs": e["base_level"], "method": e["method"],
                             "top-1": e["top1"].map("{:.2f}".format), "base top-1": e["base_top1"].map("{:.2f}".format),
                             "level − base": [fmt(d, c, sign=True) for d, c in zip(e["difference"], e["ci95"])],
                             "n": e["n_pairs"], "p": e["p_value"].map(p_text), "p (Holm)": e["p_holm"].map(p_text)})
                         if len(e) else pd.DataFrame()),
        "importance": ("CMT-KD's importance weights pi = softmax(theta) at the last epoch, mean over seeds "
                       "(pi_<point>_<teacher>, teachers in teacher_bits order), and the largest |pi - 1/n| of any run",
                       pi.round(4)),
    }
    shown["verdict_wide"] = ("CMT-KD minus each baseline per axis level (points, 95 % t interval; * = Holm-significant "
                             "at 5 % over the whole study; CMT-KD's own top-1 in the first column)", wide_verdict(v))
    for name, frame in tidy.items():
        write_text(out / "tables" / f"{name}.csv", frame.to_csv(index=False))
    for name, (title, display) in shown.items():
        text = f"# {title}\n\n{display.to_markdown(index=False)}\n\nSee README.md beside this folder and ASSUMPTIONS.md (A5, A19, A20, W13).\n"
        write_text(out / "tables" / f"{name}.md", text)


def wide_verdict(v: pd.DataFrame) -> pd.DataFrame:
    """One row per axis level, one column per baseline: CMT-KD − baseline (the paper's layout of a table)."""
    cell = [fmt(d, c, sign=True) + ("*" if p < seed_stats.ALPHA else "") for d, c, p in
            zip(v["difference"], v["ci95"], v["p_holm"].fillna(1.0))]
    frame = v.assign(cell=cell)
    wide = frame.pivot_table(index=["axis", "level"], columns="baseline", values="cell", aggfunc="first", sort=False)
    ours = frame.groupby(["axis", "level"], sort=False)["cmtkd_top1"].first().map("{:.2f}".format)
    wide.insert(0, "CMT-KD top-1", ours)
    return wide.reset_index()


def plot_length(verdict: pd.DataFrame, runs: pd.DataFrame, axis: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    part = verdict[verdict["axis"] == axis]
    epochs = runs[runs["axis"] == axis].groupby("level")["epochs"].first().to_dict()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, (label, rows) in enumerate(part.groupby("baseline", sort=False)):
        x = [epochs[level] for level in rows["level"]]
        main = label.startswith(("kd (", "mtkd ("))
        ax.errorbar([e * (1 + 0.015 * (i - 3)) for e in x], rows["difference"], yerr=rows["ci95"].fillna(0),
                    marker="o", capsize=3, lw=2 if main else 1, alpha=1 if main else 0.45, label=f"CMT-KD − {label}")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(epochs.values())), [str(e) for e in sorted(set(epochs.values()))])
    ax.set_xlabel("training epochs (same schedule shape)")
    ax.set_ylabel("top-1 difference (points), 95 % CI")
    ax.set_title(f"CMT-KD minus each baseline against training length ({part['arch'].iloc[0]} "
                 f"{grid.bits_label(part['w_bits'].iloc[0], part['a_bits'].iloc[0])})", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    (out / "plots").mkdir(parents=True, exist_ok=True)
    for ext in ("png", "pdf"):
        fig.savefig(out / "plots" / f"{axis}.{ext}", dpi=150, **({"metadata": {"CreationDate": None}} if ext == "pdf" else {}))
    plt.close(fig)


def publish(config_path: Path, directory: Path, out: Path) -> dict:
    import publish_results

    suite, study = read_study(config_path)
    table = levels(suite, study)
    paths = write_suites(table, directory)
    data, histories = {}, {}
    for name, path in paths.items():
        publish_results.publish(directory / name, [str(path)], out / name, None,
                                f"python workflow/scripts/verdict.py run --config {config_path}")
        data[name], histories[name] = read_level_runs(directory, name)
    runs = level_runs(table, data)
    tidy = {"verdict": verdict_table(runs), "accuracy": accuracy_table(runs),
            "level_effect": level_effect_table(runs, table), "teachers": teachers_table(table, data, histories),
            "importance": importance_table(table, histories)}
    write_tables(tidy, out)
    length_axis = study.get("length_axis", "length")
    if length_axis in study["axes"]:
        plot_length(tidy["verdict"], runs, length_axis, out)
    return tidy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["plan", "run", "publish"])
    parser.add_argument("--config", default=str(ROOT / "config" / "verdict.yaml"), help="the study file")
    parser.add_argument("--dir", default="studies/verdict", help="where the level suites run (default %(default)s)")
    parser.add_argument("--cores", type=int, default=2, help="snakemake --cores for each level suite")
    parser.add_argument("--out", default=str(ROOT / "results" / "verdict"), help="publish into (default %(default)s)")
    parser.add_argument("--reference-runs", default=str(ROOT / "results" / "reference" / "runs.csv"),
                        help="plan: the runs.csv whose train_seconds price the study")
    args = parser.parse_args(argv)
    try:
        if args.action == "run":
            return run(Path(args.config), Path(args.dir), args.cores)
        if args.action == "publish":
            tidy = publish(Path(args.config), Path(args.dir), Path(args.out))
            print(f"{args.out}: {len(tidy['verdict'])} comparisons, {len(tidy['accuracy'])} cells, "
                  f"{len(tidy['teachers'])} teacher rows")
            return 0
        suite, study = read_study(args.config)
        table = levels(suite, study)
        print(table[["axis", "level", "suite", "methods"]].to_string(index=False))
        cost = estimate(write_suites(table, Path(args.dir)), Path(args.reference_runs), args.cores)
        print(cost.to_string(index=False, float_format="{:.2f}".format))
        print(f"total: {cost['runs'].sum()} runs, {cost['cpu_hours'].sum():.2f} single-core hours, "
              f"{cost['wall_hours'].sum():.2f} h wall at {args.cores} jobs")
        return 0
    except (StudyError, InputError, suite_config.SuiteConfigError, grid.GridError) as exc:
        return error(exc)
    except Exception as exc:  # noqa: BLE001
        from cmtkd.errors import UserError

        if isinstance(exc, UserError):
            return error(exc)
        raise


if __name__ == "__main__":
    sys.exit(main())
