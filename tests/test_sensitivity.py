"""Sensitivity studies: experiments with ``vary`` (grid expansion, run directories and arguments,
config errors), the sensitivity table on hand-made runs (golden numbers worked out below), and a
dry run of config/sensitivity.yaml. Nothing here trains.
"""
from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "workflow" / "scripts"
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import checks  # noqa: E402
import grid  # noqa: E402
import sensitivity  # noqa: E402
import suite_config  # noqa: E402
from test_workflow import job_counts, planned_jobs, snakemake, write_config  # noqa: E402

KD_TEACHER = "method~qat/dataset~digits/arch~alexnet/w_bits~8/a_bits~8/teacher_bits~none/seed~800{}"


def study(**vary) -> dict:
    """kd (frozen 8-bit teacher) and cmtkd (joint 8/4 teachers), temperature varied, 2 seeds."""
    return {"dataset": {"name": "digits"}, "recipe": {"epochs": 1, "model": {"width": 0.0625}},
            "method_args": {"kd": {"temperature": 4}, "cmtkd": {"temperature": 4}},
            "experiments": {"study": {"methods": ["kd", "cmtkd"], "archs": ["alexnet"], "bits": ["W2A2"],
                                      "teacher_sets": [[8, 4]], "seeds": [0, 1],
                                      "vary": vary or {"temperature": [1, 4]}}}}


def checked(config: dict) -> dict:
    return suite_config.check_suite(config, "test")


def run_dir(row: dict) -> str:
    pattern = "/".join(f"{c}~{row[c]}" for c in grid.COLUMNS)
    return f"results/runs/{grid.variant_dir(row.get(grid.VARIANT, ''))}{pattern}"


# ------------------------------------------------------------------------------ grid expansion
def test_variants_get_their_own_directories_and_share_default_point_and_teachers():
    table = grid.expand(checked(study()))
    rows = table.to_dict("records")
    dirs = grid.run_dirs(table, ["/".join(f"{c}~{r[c]}" for c in grid.COLUMNS) for r in rows])
    assert len(dirs) == len(set(dirs)) == 10  # 2 methods x 2 levels x 2 seeds + the 8-bit teacher of 2 seeds
    assert sorted(table["role"]) == ["grid"] * 4 + ["teacher"] * 2 + ["variant"] * 4
    variants = table[table["role"] == "variant"]
    assert set(variants[grid.VARIANT]) == {"temperature=1"}  # the default level (4) is the grid's own run
    assert set(table[table["role"] != "variant"][grid.VARIANT]) == {""}
    assert ("results/runs/variant~temperature=1/method~kd/dataset~digits/arch~alexnet/w_bits~2/a_bits~2/"
            "teacher_bits~8/seed~0") in dirs
    # One frozen teacher per seed, loaded by the default kd run and its variant alike.
    teachers = table[table["role"] == "teacher"]
    assert sorted(teachers["seed"]) == [8000, 8001] and set(teachers[grid.VARIANT]) == {""}
    for seed in (0, 1):
        kd = [r for r in rows if r["method"] == "kd" and r["seed"] == seed]
        loaded = {tuple(map(run_dir, grid.loaded_runs(r["method"], r["dataset"], r["arch"], r["teacher_bits"],
                                                      r["seed"]))) for r in kd}
        assert loaded == {(f"results/runs/{KD_TEACHER.format(seed)}",)}


def test_a_variant_run_differs_from_the_default_in_its_option_only():
    config = checked(study())
    key = {"method": "cmtkd", "dataset": "digits", "arch": "alexnet", "w_bits": 2, "a_bits": 2,
           "teacher_bits": "8-4", "seed": 0}
    default = grid.train_argv(config, key, [])
    assert grid.train_argv(config, {**key, grid.VARIANT: ""}, []) == default  # no variant = the default run
    variant = grid.train_argv(config, {**key, grid.VARIANT: "temperature=1"}, [])
    assert [a for a in default if a not in variant] == ["method_args.temperature=4"]
    assert [a for a in variant if a not in default] == ["method_args.temperature=1"]
    # A job's wildcards hold the directory part of the variant; run_key reads the label from it.
    assert grid.run_key({**key, grid.VARIANT: "variant~temperature=1/"})[grid.VARIANT] == "temperature=1"
    assert grid.VARIANT not in grid.run_key(key)  # a suite without vary: the key of before


def test_a_suite_without_vary_has_no_variant_column():
    config = checked(study())
    del config["experiments"]["study"]["vary"]
    table = grid.expand(config)
    assert grid.VARIANT not in table and set(table["role"]) == {"grid", "teacher"}
    patterns = ["/".join(f"{c}~{r[c]}" for c in grid.COLUMNS) for r in table.to_dict("records")]
    assert grid.run_dirs(table, patterns) == [f"results/runs/{p}" for p in patterns]
    assert grid.sensitivity_levels(config).empty


def test_teacher_set_levels_are_ordinary_runs_and_the_default_is_shared():
    config = checked(study(temperature=[1, 4], teacher_sets=[[8], [8, 4], [8, 6, 4]]))
    levels = grid.sensitivity_levels(config)
    cmtkd = levels[(levels["method"] == "cmtkd") & (levels["factor"] == "teacher_sets")]
    assert list(cmtkd["level"]) == ["8", "8-4", "8-6-4"] and list(cmtkd["default"]) == [False, True, False]
    assert set(cmtkd[grid.VARIANT]) == {""}
    # kd uses the highest teacher of a set: all three sets are its 8-bit teacher, the default run.
    kd = levels[(levels["method"] == "kd") & (levels["factor"] == "teacher_sets")]
    assert set(kd["teacher_bits"]) == {"8"}
    table = grid.expand(config)
    assert len(table[(table["method"] == "cmtkd") & (table[grid.VARIANT] == "")]) == 3 * 2  # 3 sets x 2 seeds
    assert len(table[table["role"] == "grid"]) == 4  # the default point once, whichever factor it belongs to
    assert sorted(table[table["role"] == "teacher"]["seed"]) == [8000, 8001]


# ----------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("change, expected", [
    ({"vary": {"gamma": [0, 100]}}, "config key 'experiments.study.vary.gamma': state the default level in "
                                    "'method_args.kd.gamma'"),
    ({"vary": {"temperature": [1, 2]}}, "config key 'experiments.study.vary.temperature' = [1, 2]: add the default "
                                        "level 4 (method_args.kd.temperature)"),
    ({"vary": {"teacher_bits": [[8], [8, 4]]}}, "config key 'experiments.study.vary.teacher_bits' is set by the "
                                                "workflow from the teacher set; vary 'experiments.study.vary.teacher_sets'"),
    ({"vary": {"temperature": [4, "a b"]}}, "config key 'experiments.study.vary.temperature[1]' = 'a b': a level must"),
    ({"vary": {"teacher_sets": [[8], [8, 6]]}}, "add the default level [8, 4] (experiments.study.teacher_sets)"),
    ({"vary": {"teacher_sets": [[8], [8, 2]]}}, "config key 'experiments.study.vary.teacher_sets[1]' = [8, 2]: "
                                                "teacher bit-width(s) [2] are not higher than the student W2A2"),
    ({"teacher_sets": [[8, 4], [8]], "vary": {"teacher_sets": [[8], [8, 4]]}}, "give the experiment exactly one "
                                                                               "teacher set"),
    ({"vary": {"temperature": [4]}}, "config key 'experiments.study.vary.temperature': [4] is too short"),
    ({"vary": {"temperature": [4, {"a": 1}]}}, "config key 'experiments.study.vary.temperature[1]': {'a': 1} is not"),
])
def test_bad_vary_keys_are_named_with_their_fix(change, expected):
    config = study()
    config["experiments"]["study"].update(change)
    with pytest.raises(suite_config.SuiteConfigError) as error:
        checked(config)
    assert expected in str(error.value), str(error.value)


def test_a_bad_level_stops_the_workflow_in_one_line_naming_the_key(tmp_path):
    config = study()
    config["experiments"]["study"]["vary"] = {"temperature": [1, 2]}
    done = snakemake(tmp_path, "-n", config=write_config(tmp_path / "bad.yaml", config))
    said = done.stdout + done.stderr
    assert done.returncode != 0 and "Traceback" not in said and not (tmp_path / "results").exists()
    assert "config key 'experiments.study.vary.temperature' = [1, 2]: add the default level 4" in said, said


def test_variant_arguments_are_resolved_by_cmtkd_before_the_first_job():
    """checks.py resolves every variant's own arguments: a level cmtkd refuses is named with its variant."""
    config = checked(study(temperature=[4, "hot"]))
    table = grid.expand(config)
    runs = table[checks.key_columns(table)].to_dict("records")
    argv = lambda key: grid.train_argv(config, grid.run_key(key), [run_dir(k) for k in grid.loaded_runs(  # noqa: E731
        key["method"], key["dataset"], key["arch"], key["teacher_bits"], key["seed"])])
    problems = checks.cmtkd_problems(config, runs, argv)
    assert len(problems) == 1, problems
    assert "variant temperature=hot" in problems[0] and "method_args.temperature" in problems[0]
    assert "experiments.*.vary" in problems[0]


# ------------------------------------------------------------------------- the table (golden)
def fixture_study(tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    """Hand-made runs of cmtkd with gamma {0, 100 (default), 1000} and teacher sets {8}, {8, 6, 4} (default)."""
    config = {"dataset": {"name": "digits"}, "recipe": {"epochs": 2}, "method_args": {"cmtkd": {"gamma": 100}},
              "experiments": {"s": {"methods": ["cmtkd"], "archs": ["alexnet"], "bits": ["W2A2"],
                                    "teacher_sets": [[8, 6, 4]], "seeds": [0, 1, 2],
                                    "vary": {"gamma": [0, 100, 1000], "teacher_sets": [[8], [8, 6, 4]]}}}}
    levels = grid.sensitivity_levels(checked(config))
    levels.to_csv(tmp_path / "levels.csv", index=False)
    cell = {"method": "cmtkd", "dataset": "digits", "arch": "alexnet", "w_bits": 2, "a_bits": 2}
    top1 = {("8-6-4", ""): [90, 91, 92], ("8-6-4", "gamma=0"): [92, 94, 93],
            ("8-6-4", "gamma=1000"): [85, 86, 87], ("8", ""): [91.5, 91.5]}  # teachers {8}: seed 2 missing
    runs = [{**cell, "teacher_bits": t, "seed": s, grid.VARIANT: v, "role": "grid" if (t, v) == ("8-6-4", "") else
             "variant", "top1": acc, "converged": not (v == "gamma=1000" and s == 2)}
            for (t, v), accs in top1.items() for s, acc in enumerate(accs)]
    pd.DataFrame(runs).to_csv(tmp_path / "runs.csv", index=False)
    # pi of the default runs: uniform at epoch 1; at epoch 2 (listed first) max |pi - 1/3| = 1/15, 1/6, 0.
    last = {0: (0.4, 0.3, 0.3), 1: (0.5, 0.25, 0.25), 2: (1 / 3, 1 / 3, 1 / 3)}
    hist = [{**cell, "teacher_bits": "8-6-4", "seed": s, grid.VARIANT: "", "epoch": e, "val_top1_student": 90.0,
             **{f"pi_conv2_{i}": (last[s][i] if e == 2 else 1 / 3) for i in range(3)}}
            for s in range(3) for e in (2, 1)]
    pd.DataFrame(hist).to_csv(tmp_path / "histories.csv", index=False)
    tidy = sensitivity.build(str(tmp_path / "runs.csv"), str(tmp_path / "histories.csv"), str(tmp_path / "levels.csv"),
                             str(tmp_path / "tables"), str(tmp_path / "plots"))
    return tmp_path, tidy


def test_sensitivity_table_golden_numbers(tmp_path):
    workdir, tidy = fixture_study(tmp_path)
    row = {(r["factor"], r["level"]): r for r in tidy.to_dict("records")}
    assert list(row) == [("gamma", "0"), ("gamma", "100"), ("gamma", "1000"), ("teacher_sets", "8"),
                         ("teacher_sets", "8-6-4")]
    t2 = 4.302652729911275  # t(0.975, 2)
    default = row[("gamma", "100")]
    assert default["default"] and default["mean"] == pytest.approx(91.0) and default["n"] == 3
    assert default["ci95"] == pytest.approx(t2 * 1 / math.sqrt(3))  # s = 1
    assert math.isnan(default["diff_mean"]) and default["verdict"] == "default"
    assert default["pi_deviation"] == pytest.approx((1 / 15 + 1 / 6 + 0) / 3)  # the last epoch, not the first
    # gamma 0: differences 2, 3, 1 -> mean 2, s = 1, t = 2 sqrt(3); df 2: p = 1 - t / sqrt(t^2 + 2) = 1 - sqrt(6/7).
    gamma0 = row[("gamma", "0")]
    assert gamma0["diff_mean"] == pytest.approx(2.0) and gamma0["diff_ci95"] == pytest.approx(t2 / math.sqrt(3))
    assert gamma0["p_value"] == pytest.approx(1 - math.sqrt(6 / 7))
    # gamma 1000: differences all -5 -> p = 0 (seed_stats: no spread); Holm over {p0, 0}: p0 x 1 and 0 x 2.
    gamma1000 = row[("gamma", "1000")]
    assert gamma1000["diff_mean"] == pytest.approx(-5.0) and gamma1000["p_value"] == 0.0
    assert gamma1000["p_holm"] == 0.0 and gamma1000["verdict"] == "worse"
    assert gamma0["p_holm"] == pytest.approx(1 - math.sqrt(6 / 7)) and gamma0["verdict"] == "no significant difference"
    assert gamma1000["n_not_converged"] == 1 and math.isnan(gamma1000["pi_deviation"])
    assert gamma1000["not_converged"] and not default["not_converged"]  # no gains in the fixture: the runs' flags
    # teachers {8}: seeds 0, 1 only: differences 1.5, 0.5 -> mean 1, s = 1/sqrt(2), t = 2; df 1 (Cauchy):
    # p = 1 - (2/pi) atan(2); ci = t(0.975, 1) * 0.5. Its own family in Holm (one test: unchanged).
    one = row[("teacher_sets", "8")]
    assert one["n"] == 2 and one["n_expected"] == 3 and one["ci95"] == 0.0 and one["n_pairs"] == 2
    assert one["diff_mean"] == pytest.approx(1.0) and one["diff_ci95"] == pytest.approx(12.706204736174707 * 0.5)
    assert one["p_value"] == pytest.approx(1 - 2 / math.pi * math.atan(2)) and one["p_holm"] == one["p_value"]
    assert row[("teacher_sets", "8-6-4")]["mean"] == default["mean"]  # the same runs: one default point

    md = (workdir / "tables" / "sensitivity.md").read_text()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("| ")]
    assert cells[0] == ["Factor", "Level", "Top-1 (95 % CI)", "Δ vs default (95 % CI)", "p", "p (Holm)", "Verdict",
                        "max abs(π − 1/n)"]  # one setting: no Setting column
    assert cells[1:] == [
        ["gamma", "0", "93.00 ± 2.48 (n=3)", "+2.00 ± 2.48", "0.0742", "0.0742", "no significant difference", "—"],
        ["gamma", "100 (default)", "91.00 ± 2.48 (n=3)", "—", "—", "—", "default", "0.0778"],
        ["gamma", "1000", "86.00 ± 2.48 (n=3) †", "-5.00 ± 0.00", "< 0.0001", "< 0.0001", "worse", "—"],
        ["teacher_sets", "8 (1 teacher)", "91.50 ± 0.00 (n=2/3)", "+1.00 ± 6.35", "0.2952", "0.2952",
         "no significant difference", "—"],
        ["teacher_sets", "8-6-4 (3 teachers) (default)", "91.00 ± 2.48 (n=3)", "—", "—", "—", "default", "0.0778"]]
    assert "- † not converged" in md
    csv = pd.read_csv(workdir / "tables" / "sensitivity.csv")
    assert len(csv) == 5 and {"p_value", "p_holm", "verdict", "pi_deviation", "variant"} <= set(csv.columns)
    tex = (workdir / "tables" / "sensitivity.tex").read_text()
    assert "\\toprule" in tex and "teacher\\_sets" in tex and "\\dag" in tex
    for name in ("sensitivity", "sensitivity_pi"):
        png = workdir / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert (workdir / "plots" / f"{name}.pdf").exists()


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_sensitivity_latex_table_compiles(tmp_path):
    from test_workflow_inputs import compile_tex

    workdir, _ = fixture_study(tmp_path)
    done = compile_tex(workdir / "tables" / "sensitivity.tex", tmp_path)
    assert done.returncode == 0, done.stdout[-3000:]


def test_levels_that_are_all_numbers_are_read_back_as_their_json_text(tmp_path):
    grid.sensitivity_levels(checked(study(temperature=[1, 2.5, 4]))).to_csv(tmp_path / "levels.csv", index=False)
    levels = sensitivity.read_levels(tmp_path / "levels.csv")
    part = next(sensitivity.groups(levels))
    assert list(part["value"]) == ["1", "2.5", "4"] and list(part["level"]) == ["1", "2.5", "4"]
    assert sensitivity.x_positions(part) == ([1.0, 2.5, 4.0], "linear")
    assert list(part["default"]) == [False, False, True]


@pytest.mark.parametrize("values, scale", [
    ([0, 1, 10, 100, 1000], "symlog"), ([0.1, 1, 10], "log"), ([1, 2, 4], "log"), ([0, 0.5, 1], "linear"),
    ([1, 2], "linear"), ([1, 2, 5], "linear"),
])
def test_log_axis_where_the_levels_are_log_spaced(values, scale):
    assert sensitivity.axis_scale(values) == scale


# --------------------------------------------------------------------------- the workflow
def expected_sensitivity_runs(config: dict) -> int:
    """Runs of a one-factor-at-a-time study, derived from its config: the default point plus every
    non-default level of every factor, per seed (one method, arch, bit-width and teacher set)."""
    exp = config["experiments"]["sensitivity"]
    assert len(exp["methods"]) == len(exp["archs"]) == len(exp["bits"]) == len(exp["teacher_sets"]) == 1
    return len(exp["seeds"]) * (1 + sum(len(levels) - 1 for levels in exp["vary"].values()))


def test_sensitivity_suite_dry_run(tmp_path):
    config = yaml.safe_load((ROOT / "config" / "sensitivity.yaml").read_text())
    assert "recipe" not in config  # the default suite's recipe, inherited
    n = expected_sensitivity_runs(config)
    assert n == 3 * (1 + 4 + 2 + 2 + 2 + 2 + 3) == 48
    done = snakemake(tmp_path, "-n", "-p", config=ROOT / "config" / "sensitivity.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert job_counts(done.stdout) == {"train": n, "grid_table": 1, "collect_runs": 1,
                                       "make_tables": 1, "plots": 1, "sensitivity_levels": 1, "sensitivity": 1,
                                       "all": 1}
    planned = planned_jobs(done.stdout, "train")
    assert len(set(planned)) == n
    assert sum("/variant~" in d for d in planned) == 3 * (4 + 2 + 2 + 2 + 2)  # teacher sets: ordinary dirs
    assert "results/runs/variant~fusion_points=stage-ends+last/method~cmtkd/dataset~digits/arch~alexnet/w_bits~2/" \
           "a_bits~2/teacher_bits~8-6-4/seed~0" in planned
    assert "--set 'method_args.fusion_points=[\"stage-ends+last\"]'" in done.stdout
    assert "method_args.theta_lr_mult=10 " in done.stdout


def test_tables_target_of_a_sensitivity_suite_rebuilds_its_table(tmp_path):
    config = study()
    path = write_config(tmp_path / "study.yaml", config)
    done = snakemake(tmp_path, "tables", "-n", "-p", config=path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert job_counts(done.stdout) == {"grid_table": 1, "sensitivity_levels": 1, "tables": 1}
    assert "sensitivity.py\" --runs results/runs.csv" in done.stdout
    del config["experiments"]["study"]["vary"]
    shutil.rmtree(tmp_path / ".snakemake", ignore_errors=True)
    done = snakemake(tmp_path, "tables", "-n", "-p", config=write_config(tmp_path / "plain.yaml", config))
    assert done.returncode == 0 and "sensitivity" not in done.stdout, done.stdout + done.stderr


def test_a_level_is_marked_by_the_mean_rise_of_its_runs(tmp_path):
    workdir, _ = fixture_study(tmp_path)
    runs = pd.read_csv(workdir / "runs.csv", keep_default_na=False, na_values=[""])
    # gamma 1000: only seed 2 rose (1.5 points; mean 0.5): counted, not marked. gamma 0: every run rose 1.0.
    runs["val_gain_last20"] = 0.0
    runs.loc[runs[grid.VARIANT].eq("gamma=1000") & runs["seed"].eq(2), "val_gain_last20"] = 1.5
    runs.loc[runs[grid.VARIANT].eq("gamma=0"), ["val_gain_last20", "converged"]] = [1.0, False]
    runs.to_csv(workdir / "runs.csv", index=False)
    tidy = sensitivity.build(str(workdir / "runs.csv"), str(workdir / "histories.csv"), str(workdir / "levels.csv"),
                             str(workdir / "tables"), str(workdir / "plots"))
    row = {(r["factor"], r["level"]): r for r in tidy.to_dict("records")}
    assert (row[("gamma", "1000")]["n_not_converged"], row[("gamma", "1000")]["not_converged"]) == (1, False)
    assert row[("gamma", "1000")]["val_gain_mean"] == pytest.approx(0.5)
    assert (row[("gamma", "0")]["n_not_converged"], row[("gamma", "0")]["not_converged"]) == (3, True)
    md = (workdir / "tables" / "sensitivity.md").read_text()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("| ")]
    top1 = {(c[0], c[1]): c[2] for c in cells[1:]}
    assert top1[("gamma", "0")] == "93.00 ± 2.48 (n=3) †" and top1[("gamma", "1000")] == "86.00 ± 2.48 (n=3)"


@pytest.mark.parametrize("which", ["runs", "histories", "levels"])
@pytest.mark.parametrize("content", [b"", b"\xff\xfe garbage\n", b"a,b\n1,2\n"], ids=["empty", "binary", "columns"])
def test_a_bad_input_file_is_one_line_naming_it(tmp_path, which, content):
    """Each of the three inputs, empty, not text or without the columns: one line naming it, nothing written."""
    import contextlib
    import io

    workdir, _ = fixture_study(tmp_path)
    (workdir / f"{which}.csv").write_bytes(content)
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        status = sensitivity.main(["--runs", str(workdir / "runs.csv"), "--histories", str(workdir / "histories.csv"),
                                   "--levels", str(workdir / "levels.csv"), "--tables", str(tmp_path / "t"),
                                   "--plots", str(tmp_path / "p")])
    [line] = err.getvalue().splitlines()
    assert status == 2 and line.startswith("cmtkd: error: ") and f"{which}.csv" in line, line
    assert not (tmp_path / "t").exists() and not (tmp_path / "p").exists()
