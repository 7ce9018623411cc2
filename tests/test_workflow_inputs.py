"""Workflow inputs: suite config layering and overrides, checks before any job, LaTeX and report output.

Unit tests of workflow/scripts/{suite_config,checks,html_report,config_docs,make_tables}.py, and
Snakemake dry runs (``-n``) for what users type. Nothing here trains.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "workflow" / "scripts"
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import checks  # noqa: E402
import config_docs  # noqa: E402
import grid  # noqa: E402
import html_report  # noqa: E402
import suite_config  # noqa: E402
from test_workflow import FIXTURE, GOLDEN, expected_runs, job_counts, run_script, snakemake  # noqa: E402
from test_workflow import tiny_config, write_config  # noqa: E402

DEFAULT = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
SCHEMA = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())


def output_of(done: subprocess.CompletedProcess) -> str:
    return done.stdout + done.stderr


# ------------------------------------------------------------------------- layering (issue 14.7)
def test_a_partial_configfile_layers_over_the_default_suite(tmp_path):
    layer = write_config(tmp_path / "short.yaml", {"recipe": {"epochs": 1}})
    suite = suite_config.layer_suite([layer])
    assert suite["recipe"] == {**DEFAULT["recipe"], "epochs": 1}  # the rest of the recipe is the default's
    assert suite["experiments"] == DEFAULT["experiments"] and suite["dataset"] == DEFAULT["dataset"]
    # Through Snakemake: the default grid (36 runs), no complaint about missing keys.
    done = snakemake(tmp_path, "-n", config=layer)
    assert done.returncode == 0, output_of(done)
    assert job_counts(done.stdout)["train"] == len(expected_runs(DEFAULT)) == 36


def test_a_configfile_with_experiments_brings_its_own_grid(tmp_path):
    for name in ("cifar100.yaml", "imagenet.yaml"):
        alone = yaml.safe_load((ROOT / "config" / name).read_text())
        layered = suite_config.layer_suite([ROOT / "config" / name])
        assert layered == alone, name  # nothing of the default suite leaks into a paper grid
        # ... and the keys keep the file's order: the train jobs' --set flags (their params) are
        # those of the suite alone, so its finished runs stay up to date.
        assert yaml.safe_dump(layered, sort_keys=False) == yaml.safe_dump(alone, sort_keys=False), name
    mine = {"mine": {"methods": ["qat"], "archs": ["alexnet"], "bits": ["W2A2"], "seeds": [0]}}
    path = write_config(tmp_path / "mine.yaml", {"experiments": mine})
    layered = suite_config.layer_suite([path])
    assert layered["experiments"] == mine and layered["recipe"] == DEFAULT["recipe"]
    # Overrides (--config) merge into the experiments instead: change one setting of a grid.
    layered = suite_config.layer_suite([path], {"experiments": {"mine": {"seeds": [3]}}})
    assert layered["experiments"] == {"mine": {**mine["mine"], "seeds": [3]}}


def test_replace_workflow_config_skips_the_default_suite(tmp_path):
    config = tiny_config(methods=["qat"], seeds=[0])
    path = write_config(tmp_path / "own.yaml", config)
    assert suite_config.layer_suite([path], default=None) == config
    done = snakemake(tmp_path, "-n", "--replace-workflow-config", config=path)
    assert done.returncode == 0 and job_counts(done.stdout)["train"] == 1, output_of(done)


def test_overrides_keep_the_order_of_the_suite():
    """--config changes values in place (as Snakemake's update_config): unchanged values, same jobs."""
    merged = suite_config.merge(DEFAULT, {"recipe": {"data": {"batch_size": 128}, "new": 1}})
    assert list(merged["recipe"]) == [*DEFAULT["recipe"], "new"] and list(merged) == list(DEFAULT)


def test_config_overrides_are_read_as_yaml():
    parsed = suite_config.parse_overrides(
        ["gpu=true", "recipe={epochs: 1, optim: {lr: 0.001}}", "experiments={comparison: {seeds: [0]}}",
         "description=123", "report=false"], SCHEMA)
    assert parsed == {"gpu": True, "recipe": {"epochs": 1, "optim": {"lr": 0.001}},
                      "experiments": {"comparison": {"seeds": [0]}}, "description": "123", "report": False}
    with pytest.raises(suite_config.SuiteConfigError, match="KEY=VALUE"):
        suite_config.parse_overrides(["gpu"], SCHEMA)


def test_nested_config_overrides_work_in_snakemake(tmp_path):
    done = snakemake(tmp_path, "-n", "--config", "recipe={epochs: 1}", "experiments={comparison: {seeds: [0]}}")
    assert done.returncode == 0, output_of(done)
    expected = expected_runs({**DEFAULT, "experiments": {**DEFAULT["experiments"], "comparison": {
        **DEFAULT["experiments"]["comparison"], "seeds": [0]}}})
    assert job_counts(done.stdout)["train"] == len(expected)


def test_gpu_true_is_accepted_as_snakemake_users_write_it(tmp_path):
    path = write_config(tmp_path / "one.yaml", tiny_config(methods=["qat"], seeds=[0]))
    done = snakemake(tmp_path, "-n", "--printshellcmds", "--config", "gpu=true", config=path)
    assert done.returncode == 0, output_of(done)
    assert 'gpu_slot.py" -- python' in done.stdout and "--device cuda" in done.stdout


def test_a_negative_seed_is_explained_in_words(tmp_path):
    config = tiny_config()
    config["experiments"]["tiny"]["seeds"] = [-1]
    done = snakemake(tmp_path, "-n", config=write_config(tmp_path / "neg.yaml", config))
    output = output_of(done)
    assert done.returncode != 0
    assert "config key 'experiments.tiny.seeds[0]': -1 is less than the minimum of 0" in output, output
    assert "random seeds, integers 0-999" in output and "{'type'" not in output, output


def test_schema_hints_never_show_a_schema_mapping():
    """Every failing key's hint is a description string (a property named `description` is no hint)."""
    config = tiny_config()
    config["experiments"]["tiny"].update(seeds=[-1], archs=["vgg"], description=3)
    problems = suite_config.schema_problems(config, SCHEMA)
    assert len(problems) == 3
    for problem in problems:
        assert "{" not in problem, problem


# ------------------------------------------------------------------- teacher seeds (issue 11.3)
def test_frozen_teachers_get_seeds_of_their_own_shared_between_methods():
    """Each frozen teacher's seed is 1000 * bits + the student's seed: the teachers of one mtkd run
    differ from each other and from the student; kd's teacher is mtkd's teacher of the same bits."""
    mtkd = grid.teacher_runs("mtkd", "digits", "alexnet", "8-6-4", 1)
    assert [(t["method"], t["w_bits"], t["a_bits"], t["seed"]) for t in mtkd] == [
        ("qat", 8, 8, 8001), ("qat", 6, 6, 6001), ("qat", 4, 4, 4001)]
    assert grid.teacher_runs("kd", "digits", "alexnet", "8", 1) == mtkd[:1]  # one run, shared
    assert grid.teacher_runs("mtkd", "digits", "alexnet", "32-8", 0)[0] == {
        "method": "fp", "dataset": "digits", "arch": "alexnet", "w_bits": 32, "a_bits": 32,
        "teacher_bits": "none", "seed": 32000}
    assert grid.teacher_runs("kdcl", "digits", "alexnet", "8-6-4", 1) == []  # joint teachers: no runs
    frame = grid.expand(tiny_config())  # fp, qat, kd, mtkd at W2A2 with teachers [8, 4], seeds 0 and 1
    teachers = frame[frame["role"] == "teacher"]
    assert sorted(zip(teachers["w_bits"], teachers["seed"])) == [(4, 4000), (4, 4001), (8, 8000), (8, 8001)]
    assert set(frame[frame["role"] == "grid"]["seed"]) == {0, 1}  # the grid's own qat runs are no teachers
    with pytest.raises(grid.GridError, match="below 1000"):
        grid.teacher_seed(1000, 8)


def test_arch_recipe_writes_the_command_a_recipe_with_its_keys_writes():
    """An arch_recipe key merges into its recipe section: the run's `cmtkd train` command (Snakemake's
    params) is the one a suite with that key in its recipe writes, token for token, and other
    architectures' commands do not change; an overridden key keeps its place with the new value."""
    base, per_arch, in_recipe = tiny_config(), tiny_config(), tiny_config()
    for config in (base, per_arch, in_recipe):
        config["recipe"] |= {"optim": {"lr": 0.1, "momentum": 0.9}, "data": {"batch_size": 64},
                             "train": {"select": "best_val"}}
    per_arch["arch_recipe"] = {"resnet18": {"data": {"image_size": 14}, "optim": {"lr": 0.05}}}
    in_recipe["recipe"] = grid.merge(in_recipe["recipe"], per_arch["arch_recipe"]["resnet18"])
    resnet, alexnet = run_key("qat", tset="none") | {"arch": "resnet18"}, run_key("qat", tset="none")
    assert grid.train_argv(per_arch, resnet, []) == grid.train_argv(in_recipe, resnet, [])
    assert "data.image_size=14" in grid.train_argv(per_arch, resnet, [])
    assert grid.train_argv(per_arch, alexnet, []) == grid.train_argv(base, alexnet, [])
    assert [a.split("=")[0] for a in grid.train_argv(per_arch, resnet, [])] == \
        [a.split("=")[0] for a in grid.train_argv(in_recipe, resnet, [])]
    assert grid.merge({"optim": {"lr": 0.1, "momentum": 0.9}}, {"optim": {"lr": 0.05}}) == \
        {"optim": {"lr": 0.05, "momentum": 0.9}}
    assert list(grid.merge({"data": {"a": 1}, "train": {}}, {"data": {"b": 2}})["data"]) == ["a", "b"]


def test_recipe_init_is_the_grids_key_not_cmtkd_trains():
    """recipe.init: fp adds `model.init_from` for the runs it starts and changes nothing else of a command;
    scratch (or no key) gives today's commands; a per-arch init or a hand-set init_from beside it is refused."""
    scratch, fp, explicit = tiny_config(), tiny_config(), tiny_config()
    fp["recipe"]["init"], explicit["recipe"]["init"] = "fp", "scratch"
    key = run_key("kd", tset="8")
    assert grid.init_runs(scratch, key) == grid.init_runs(explicit, key) == []
    assert grid.train_argv(scratch, key, ["t"]) == grid.train_argv(explicit, key, ["t"]) == grid.train_argv(fp, key, ["t"])
    (start,) = grid.init_runs(fp, run_key("qat", w=8, a=8, tset="none", seed=8001))
    assert start == {"method": "fp", "dataset": "digits", "arch": "alexnet", "w_bits": 32, "a_bits": 32,
                     "teacher_bits": "none", "seed": 1}
    assert grid.init_runs(fp, run_key("fp", w=32, a=32, tset="none", seed=1)) == []
    assert grid.train_argv(fp, key, ["t"], ["results/runs/x"])[-2:] == ["--set", "model.init_from=results/runs/x"]
    assert len(grid.expand(fp)) == len(grid.expand(scratch))  # the grid's fp runs are the starting points
    for change, message in [({"arch_recipe": {"alexnet": {"init": "fp"}}}, "move it to 'recipe.init'"),
                            ({"recipe": {**fp["recipe"], "model": {"init_from": "x"}}}, "recipe.model.init_from")]:
        with pytest.raises(grid.GridError, match=re.escape(message)):
            grid.expand({**fp, **change})


def test_a_seed_that_could_collide_with_a_teacher_seed_is_rejected(tmp_path):
    config = tiny_config(seeds=[0, 1000])
    done = snakemake(tmp_path, "-n", config=write_config(tmp_path / "bad.yaml", config))
    assert done.returncode != 0
    assert "experiments.tiny.seeds[1]" in output_of(done) and "maximum of 999" in output_of(done), output_of(done)


# --------------------------------------------------------------------- checks before any job
def run_key(method, w=2, a=2, tset="8-4", seed=0) -> dict:
    return {"method": method, "dataset": "digits", "arch": "alexnet", "w_bits": w, "a_bits": a,
            "teacher_bits": tset, "seed": seed}


def argv_maker(config):
    def train_argv(key):
        dirs = [f"/nonexistent/teacher-{t['w_bits']}" for t in grid.loaded_runs(
            key["method"], key["dataset"], key["arch"], key["teacher_bits"], key["seed"])]
        return grid.train_argv(config, key, dirs)
    return train_argv


def test_every_run_of_the_default_suite_resolves_without_its_teachers_trained():
    """The pre-start check runs before any teacher exists: resolving a config must not read them."""
    config = suite_config.check_suite(suite_config.layer_suite(), "default")
    runs = grid.expand(config)[list(grid.COLUMNS)].to_dict("records")
    assert checks.cmtkd_problems(config, runs, argv_maker(config)) == []


def test_a_bad_method_option_is_rejected_by_cmtkd_train_itself():
    config = suite_config.check_suite(suite_config.merge(tiny_config(), {
        "method_args": {"mtkd": {"aggregation": "bogus"}}}), "bad")
    runs = [run_key("mtkd", seed=0), run_key("mtkd", seed=1), run_key("qat", tset="none")]
    problems = checks.cmtkd_problems(config, runs, argv_maker(config))
    assert len(problems) == 1, problems
    assert "config key 'method_args.aggregation' must be one of" in problems[0] and "'bogus'" in problems[0]
    assert "mtkd digits alexnet W2A2 teachers 8-4 seed 0 and 1 more run(s)" in problems[0]
    assert "method_args.mtkd" in problems[0]


@pytest.mark.parametrize("recipe, message", [
    ({"optim": {"lr": -0.1}}, "optim.lr must be a finite number > 0, got -0.1"),
    ({"optim": {"momentum": 1.5}}, "optim.momentum must be in [0, 1), got 1.5"),
    ({"model": {"width": 0.0625}, "optim": {"weight_decay": -1.0}}, "optim.weight_decay must be a finite number >= 0"),
])
def test_a_bad_recipe_number_is_rejected_by_cmtkd_train_itself(recipe, message):
    """`snakemake -n` does not resolve run configs (a dry run does not import cmtkd); the pre-start check
    of a real run (and `python workflow/scripts/checks.py`) does, through `cmtkd train --print-config`."""
    config = tiny_config(methods=["qat"], seeds=[0])
    config["recipe"].update(recipe)
    config = suite_config.check_suite(config, "bad")
    problems = checks.cmtkd_problems(config, [run_key("qat", tset="none")], argv_maker(config))
    assert len(problems) == 1 and message in problems[0] and "recipe" in problems[0], problems


def test_bad_method_option_stops_the_workflow_before_any_job(tmp_path):
    config = tiny_config(methods=["qat", "mtkd"], seeds=[0])
    config["method_args"] = {"mtkd": {"aggregation": "bogus"}}
    path = write_config(tmp_path / "bogus.yaml", config)
    assert snakemake(tmp_path, "-n", config=path).returncode == 0  # a dry run does not import cmtkd
    done = snakemake(tmp_path, config=path, timeout=300)
    assert done.returncode != 0
    assert "config key 'method_args.aggregation' must be one of" in done.stderr and "bogus" in done.stderr, output_of(done)
    assert not list(tmp_path.glob("results/runs/method~*/**/train.log"))  # no job started


def write_external(workdir: Path, name: str, rows: str) -> Path:
    path = workdir / "results" / "external" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("method,dataset,arch,w_bits,a_bits,seed,top1,source\n" + rows)
    return path


def test_duplicate_imported_rows_are_rejected_with_file_and_lines(tmp_path):
    write_external(tmp_path, "theirs.csv", "lq-nets,cifar100,alexnet,2,2,0,61.1,LQ\n"
                                           "lq-nets,cifar100,alexnet,2,2,1,61.7,LQ\n"
                                           "lq-nets,cifar100,alexnet,2,2,0,99.0,LQ\n")
    done = snakemake(tmp_path, "-n", config=write_config(tmp_path / "c.yaml", tiny_config()))
    output = output_of(done)
    assert done.returncode != 0
    assert "results/external/theirs.csv lines 2, 4: 2 rows for the same run" in output, output
    assert "with different top1 (61.1, 99)" in output and "seed=0" in output, output
    assert not (tmp_path / "results" / "runs").exists()


def test_duplicates_across_files_and_without_seeds_are_found(tmp_path):
    a = write_external(tmp_path, "a.csv", "lq-nets,cifar100,alexnet,2,2,0,61.1,LQ\n")
    b = write_external(tmp_path, "b.csv", "lq-nets,cifar100,alexnet,2,2,0,61.1,LQ\n")
    with pytest.raises(checks.InputError) as error:
        checks.read_external([str(a), str(b)])
    assert f"{a} line 2; {b} line 2: 2 rows for the same run" in str(error.value)
    noseed = tmp_path / "noseed.csv"
    noseed.write_text("method,dataset,arch,w_bits,a_bits,top1\nx,cifar100,alexnet,2,2,60\nx,cifar100,alexnet,2,2,62\n")
    with pytest.raises(checks.InputError, match=r"lines 2, 3: 2 rows .*seed=\(none\)"):
        checks.read_external([str(noseed)])
    # Different seeds or sources are different runs.
    ok = write_external(tmp_path, "ok.csv", "lq-nets,cifar100,alexnet,2,2,0,61.1,LQ\n"
                                            "lq-nets,cifar100,alexnet,2,2,1,61.1,LQ\n"
                                            "lq-nets,cifar100,alexnet,2,2,0,61.1,other paper\n")
    assert len(checks.read_external([str(ok)])) == 3


def test_make_tables_refuses_duplicate_imported_rows(tmp_path):
    """make_tables.py on its own (not only the workflow's start-up check) never averages duplicates."""
    (tmp_path / "results").mkdir()
    shutil.copytree(FIXTURE / "runs", tmp_path / "results" / "runs")
    shutil.copy(FIXTURE / "grid.csv", tmp_path / "results" / "runs" / "grid.csv")
    dup = write_external(tmp_path, "dup.csv", "lq-nets,cifar100,alexnet,2,2,0,61.1,LQ\n" * 3)
    run_script("collect_runs.py", "--grid", "results/runs/grid.csv", "--out", "results/runs.csv",
               "--histories", "results/runs/histories.csv", "--finished-only", cwd=tmp_path)
    done = subprocess.run([sys.executable, str(SCRIPTS / "make_tables.py"), "--runs", "results/runs.csv", "--grid",
                           "results/runs/grid.csv", "--paper", str(ROOT / "results" / "paper" / "reported.csv"),
                           "--external", str(dup), "--out-dir", "results/tables"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0 and "lines 2, 3, 4: 3 rows for the same run" in done.stderr, done.stderr
    assert not (tmp_path / "results" / "tables" / "main.md").exists()


def test_a_run_of_the_old_dml_is_not_collected_as_the_new_dml(tmp_path):
    """dml was renamed kdcl (KDCL-MinLogit); a finished run directory of the old dml must not enter
    the tables as Zhang et al.'s dml: collection stops with one line naming the run and the fix."""
    from cmtkd.files import read_sealed_json, write_sealed_json

    (tmp_path / "results").mkdir()
    shutil.copytree(FIXTURE / "runs", tmp_path / "results" / "runs")
    kd = "method~kd/dataset~cifar100/arch~alexnet/w_bits~2/a_bits~2/teacher_bits~8/seed~0"
    old = "method~dml/dataset~cifar100/arch~alexnet/w_bits~2/a_bits~2/teacher_bits~8-6-4/seed~0"
    shutil.copytree(tmp_path / "results" / "runs" / kd, tmp_path / "results" / "runs" / old)
    metrics = read_sealed_json(tmp_path / "results" / "runs" / old / "metrics.json", "")
    metrics = {k: v for k, v in metrics.items() if k not in ("sha256", "teacher_checkpoints", "teacher_sha256")}
    write_sealed_json(tmp_path / "results" / "runs" / old / "metrics.json",
                      {**metrics, "method": "dml", "teacher_bits": [8, 6, 4], "teacher_reduction": "sum"})
    grid_csv = (FIXTURE / "grid.csv").read_text() + f"dml,cifar100,alexnet,2,2,8-6-4,0,grid,2,0.1,results/runs/{old}\n"
    (tmp_path / "results" / "runs" / "grid.csv").write_text(grid_csv)
    done = subprocess.run([sys.executable, str(SCRIPTS / "collect_runs.py"), "--grid", "results/runs/grid.csv",
                           "--out", "results/runs.csv", "--histories", "results/runs/histories.csv",
                           "--finished-only"], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert f"results/runs/{old} was trained by the method called dml before it was renamed kdcl" in line
    assert "delete the run directory" in line and not (tmp_path / "results" / "runs.csv").exists()


# ------------------------------------------------------------------------------------ LaTeX
HOSTILE = "lq-nets,cifar_100 & co,alex#net^2,2,2,0,61.1,\"Smith & Jones, 50% {x}\"\n"


def tables_with(workdir: Path, external_rows: str) -> Path:
    (workdir / "results").mkdir(parents=True)
    shutil.copytree(FIXTURE / "runs", workdir / "results" / "runs")
    shutil.copy(FIXTURE / "grid.csv", workdir / "results" / "runs" / "grid.csv")
    external = [str(FIXTURE / "external" / "lqnets_rerun.csv"), str(write_external(workdir, "odd.csv", external_rows))]
    run_script("collect_runs.py", "--grid", "results/runs/grid.csv", "--out", "results/runs.csv",
               "--histories", "results/runs/histories.csv", "--finished-only", cwd=workdir)
    run_script("make_tables.py", "--runs", "results/runs.csv", "--grid", "results/runs/grid.csv",
               "--paper", str(ROOT / "results" / "paper" / "reported.csv"), "--external", *external,
               "--out-dir", "results/tables", cwd=workdir)
    return workdir / "results" / "tables"


def test_tex_escape_is_one_pass():
    from make_tables import tex_escape

    assert tex_escape("a\\b{c}") == r"a\textbackslash{}b\{c\}"
    assert tex_escape("50% & $x_1$ #~^") == r"50\% \& \$x\_1\$ \#\textasciitilde{}\^{}"


def test_every_latex_cell_is_escaped(tmp_path):
    tex = (tables_with(tmp_path, HOSTILE) / "main.tex").read_text()
    assert r"cifar\_100 \& co" in tex and r"alex\#net\^{}2" in tex, tex
    assert r"Smith \& Jones, 50\% \{x\}" in tex
    body = tex.split("\\midrule", 1)[1].split("\\bottomrule", 1)[0]
    for row in body.split("\\\\"):
        cells = row.split(" & ")
        for cell in cells:  # no unescaped special outside the commands the writer itself emits
            plain = re.sub(r"\\textsuperscript\{[a-z]\}|\$\\pm\$|\\\^\{\}|\\textbackslash\{\}|\\[&%$#_{}]", "", cell)
            assert not re.search(r"[&%$#_^{}]", plain), (cell, row)


def test_baselines_whose_name_could_mislead_carry_a_footnote_saying_what_they_are(tmp_path):
    """mtkd is You et al. at the output level only; dml/kdcl name two different mutual learnings."""
    tables = tables_with(tmp_path, "mtkd,cifar100,alexnet,2,2,0,64.1,elsewhere\n"
                                   "dml,cifar100,alexnet,2,2,0,65.2,elsewhere\n"
                                   "kdcl,cifar100,alexnet,2,2,0,66.3,elsewhere\n")
    main = (tables / "main.md").read_text()
    rows = {line.split("|")[3].strip(): line for line in main.splitlines() if line.startswith("| cifar100")}
    for method, text in [("mtkd", "relative-dissimilarity (triplet) term is not implemented"),
                         ("dml", "Zhang et al., CVPR 2018"), ("kdcl", "KDCL-MinLogit")]:
        [label] = [name for name in rows if name.split(" [")[0] == method]
        marker = label.split("[")[1].rstrip("]")
        assert f"- [{marker}] {method}: " in main and text in main.split(f"- [{marker}] ", 1)[1].splitlines()[0]
    assert "| kd " in main  # methods whose name says it all: no footnote
    tex = (tables / "main.tex").read_text()
    assert r"mtkd\textsuperscript{" in tex and "relative-dissimilarity" in tex


def compile_tex(table: Path, workdir: Path) -> subprocess.CompletedProcess:
    document = workdir / f"{table.stem}_doc.tex"
    document.write_text("\\documentclass{article}\n\\usepackage[T1]{fontenc}\n\\usepackage{booktabs}\n"
                        "\\begin{document}\n\\input{" + str(table) + "}\n\\end{document}\n")
    return subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", document.name], cwd=workdir,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(shutil.which("pdflatex") is None,
                    reason="pdflatex is not installed (apt-get install texlive-latex-base texlive-latex-recommended)")
def test_generated_latex_tables_compile_with_pdflatex(tmp_path):
    tables = tables_with(tmp_path / "work", HOSTILE)
    for name in ("main", "ablation", "paper_delta", "comparison"):
        for table in (tables / f"{name}.tex", GOLDEN / f"{name}.tex"):
            done = compile_tex(table, tmp_path)
            assert done.returncode == 0, f"{table}:\n" + done.stdout[-3000:]


# ----------------------------------------------------------------------------------- report
def render_front_page(description) -> str:
    """workflow/report/workflow.rst as `snakemake --report` renders it (Jinja, then docutils)."""
    from docutils.core import publish_parts
    from jinja2 import Environment

    class Snakemake:
        config = {"description": description} if description is not None else {}

    template = (ROOT / "workflow" / "report" / "workflow.rst").read_text()
    text = Environment(trim_blocks=True, lstrip_blocks=True).from_string(template).render(
        snakemake=Snakemake, categories={}, files={})
    return publish_parts(text, writer_name="html", settings_overrides={"report_level": 5})["html_body"]


def test_report_shows_the_description_as_plain_text():
    hostile = ("Suite *one* with `a link <javascript:alert(2)>`_\n\n.. raw:: html\n\n"
               "   <script>alert(1)</script>\n\n.. include:: /etc/passwd\n")
    html = render_front_page(hostile)
    assert "<script>" not in html and "javascript:" not in html.replace("&lt;javascript:", "")
    assert "href" not in html.split("Suite:", 1)[1].split("</pre>", 1)[0]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and ".. raw:: html" in html
    assert "Suite *one* with" in html and "root:" not in html  # shown as typed; nothing included
    assert "Suite:" not in render_front_page(None)  # no description: no block


# ------------------------------------------------------------------------- the report writer
def test_report_command_repeats_the_invocation(tmp_path):
    command = html_report.report_command("Snakefile", tmp_path, "results/report.html", ["a.yaml"],
                                         ["gpu=true", "recipe={epochs: 1}"], True)
    assert command[1:3] == ["-m", "snakemake"]
    assert command[command.index("--configfile") + 1] == "a.yaml" and "--replace-workflow-config" in command
    assert command[command.index("--config") + 1:] == ["gpu=true", "recipe={epochs: 1}"]


def test_report_is_outdated_only_when_an_output_is_newer(tmp_path):
    outputs = [tmp_path / "a.csv", tmp_path / "b.png"]
    html = tmp_path / "report.html"
    assert not html_report.report_outdated(True, outputs, html)  # outputs missing
    for p in outputs:
        p.write_text("x")
    assert html_report.report_outdated(True, outputs, html) and not html_report.report_outdated(False, outputs, html)
    html.write_text("x")
    os.utime(html, (outputs[0].stat().st_mtime + 10,) * 2)
    assert not html_report.report_outdated(True, outputs, html)
    os.utime(outputs[1], (html.stat().st_mtime + 10,) * 2)
    assert html_report.report_outdated(True, outputs, html)


# ------------------------------------------------------------------------ docs and catalog
def test_config_readme_is_generated_from_the_schema():
    assert (ROOT / "config" / "README.md").read_text() == config_docs.render(), \
        "config/README.md is out of date: python workflow/scripts/config_docs.py"
    text = config_docs.render()

    def keys(schema, prefix=""):
        for name, child in schema.get("properties", {}).items():
            yield f"{prefix}.{name}" if prefix else name
            yield from keys(child, f"{prefix}.{name}" if prefix else name)

    for key in keys(SCHEMA):
        assert f"| `{key}` |" in text, key


def test_workflow_catalog_file():
    catalog = yaml.safe_load((ROOT / ".snakemake-workflow-catalog.yml").read_text())
    usage = catalog["usage"]
    assert usage["software-stack-deployment"]["conda"] is True and usage["report"] is True
    assert "--configfile" in usage["mandatory-flags"]["desc"]


# ------------------------------------------------------------------------------ thin workflow
def test_common_smk_is_wiring_only():
    lines = (ROOT / "workflow" / "rules" / "common.smk").read_text().splitlines()
    assert len(lines) <= 80, len(lines)
    # Config loading, schema messages, checks and the report writer live in workflow/scripts/.
    assert not [line for line in lines if re.match(r"(import|from) (jsonschema|pandas|yaml|subprocess)\b", line)]


def test_workflow_scripts_do_not_import_torch():
    code = ("import sys; sys.path.insert(0, 'workflow/scripts'); "
            "import grid, suite_config, checks, html_report, config_docs, make_tables; "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stdout + done.stderr


def test_checks_command_line(tmp_path):
    path = write_config(tmp_path / "tiny.yaml", tiny_config(methods=["qat", "mtkd"], seeds=[0]))
    done = subprocess.run([sys.executable, str(SCRIPTS / "checks.py"), "--configfile", str(path), "--external"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and "4 runs checked: ok" in done.stderr, done.stdout + done.stderr
    bad = {**tiny_config(methods=["mtkd"], seeds=[0]), "method_args": {"mtkd": {"aggregation": "bogus"}}}
    done = subprocess.run([sys.executable, str(SCRIPTS / "checks.py"), "--configfile",
                           str(write_config(tmp_path / "bad.yaml", bad)), "--external"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1 and "method_args.aggregation" in done.stdout, done.stdout + done.stderr


# ------------------------------------------------------------- bad input files: one line, never a traceback
BAD_CSV = {  # kind -> the file's bytes (None: no file at all) and what the one-line error says about it
    "empty": (b"", "is empty"),
    "garbage": (b"\x89PNG\r\n\x1a\n" + b"\xff\xfe\x00\x13" * 16, "is not a readable CSV file"),
    "wrong columns": (b"name,value\nx,1\n", "lacks the columns"),
    "unparsable": (b'method,top1\n"never closed,1\n', "is not a readable CSV file"),
    "missing": (None, "does not exist"),
}
PAPER = ROOT / "results" / "paper" / "reported.csv"


def bad_csv(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"bad-{kind.replace(' ', '-')}.csv"
    if BAD_CSV[kind][0] is not None:
        path.write_bytes(BAD_CSV[kind][0])
    return path


def run_main(script: str, *argv) -> tuple[int, str]:
    """``workflow/scripts/SCRIPT.py ARGV`` in this process (its ``main``): (exit status, stderr)."""
    module = importlib.import_module(script)
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        status = module.main([str(a) for a in argv])
    return status, err.getvalue()


def one_line_error(status: int, err: str, *needles) -> str:
    """The run failed (exit status 2) with one ``cmtkd: error:`` line holding every needle; the line."""
    assert status == 2 and "Traceback" not in err, err
    [line] = err.splitlines()
    assert line.startswith("cmtkd: error: "), line
    for needle in needles:
        assert str(needle) in line, (needle, line)
    return line


def histories_csv(tmp_path: Path) -> Path:
    path = tmp_path / "histories.csv"
    path.write_text(f"{','.join(grid.COLUMNS)},epoch,val_top1_student\nqat,cifar100,alexnet,2,2,none,0,1,60.5\n")
    return path


def script_argv(script: str, bad_flag: str, bad: Path, tmp_path: Path) -> list:
    """SCRIPT's arguments: good input files (the workflow fixture's) except ``bad_flag``'s, outputs in tmp_path/out."""
    out = tmp_path / "out"
    inputs = {"collect_runs": {"--grid": FIXTURE / "grid.csv"},
              "make_tables": {"--runs": GOLDEN / "runs.csv", "--grid": FIXTURE / "grid.csv", "--paper": PAPER},
              "plots": {"--runs": GOLDEN / "runs.csv", "--histories": histories_csv(tmp_path)},
              "estimate_cost": {"--grid": FIXTURE / "grid.csv", "--runs": GOLDEN / "runs.csv"}}[script]
    outputs = {"collect_runs": ["--out", out / "runs.csv", "--histories", out / "histories.csv"],
               "make_tables": ["--out-dir", out], "plots": ["--out-dir", out], "estimate_cost": []}[script]
    return [a for flag, path in {**inputs, bad_flag: bad}.items() for a in (flag, path)] + outputs


@pytest.mark.parametrize("kind", list(BAD_CSV))
@pytest.mark.parametrize("script, flag", [("collect_runs", "--grid"), ("make_tables", "--runs"),
                                          ("make_tables", "--grid"), ("make_tables", "--paper"), ("plots", "--runs"),
                                          ("plots", "--histories"), ("estimate_cost", "--grid"),
                                          ("estimate_cost", "--runs")])
def test_a_bad_input_file_is_one_line_naming_it(tmp_path, script, flag, kind):
    """Empty, garbage, unparsable, without the needed columns or missing (also estimate_cost --runs, once
    skipped in silence): one line naming the file and what is wrong, exit status 2, nothing written."""
    bad = bad_csv(tmp_path, kind)
    one_line_error(*run_main(script, *script_argv(script, flag, bad, tmp_path)), bad, BAD_CSV[kind][1])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script, flag", [("collect_runs", "--grid"), ("make_tables", "--paper"),
                                          ("plots", "--histories"), ("estimate_cost", "--runs")])
def test_a_bad_input_file_ends_the_command_with_one_line(tmp_path, script, flag):
    """The same from the command line: exit status 2, one line on stderr, no traceback."""
    bad = bad_csv(tmp_path, "garbage")
    done = subprocess.run([sys.executable, str(SCRIPTS / f"{script}.py"),
                           *map(str, script_argv(script, flag, bad, tmp_path))],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    one_line_error(done.returncode, done.stderr, bad, "is not a readable CSV file")


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "abc", ""])
def test_estimate_cost_wants_a_positive_throughput(value):
    status, err = run_main("estimate_cost", "--grid", FIXTURE / "grid.csv", "--images-per-s", f"alexnet={value}")
    one_line_error(status, err, f"'alexnet={value}'", "a number > 0")


def collected_workdir(tmp_path: Path) -> Path:
    """The workflow fixture's runs as a working directory, its grid.csv without the unfinished run."""
    (tmp_path / "results").mkdir()
    shutil.copytree(FIXTURE / "runs", tmp_path / "results" / "runs")
    lines = (FIXTURE / "grid.csv").read_text().splitlines()
    finished = [line for line in lines[1:]
                if (FIXTURE / line.split(",")[-1].removeprefix("results/") / "eval.json").exists()]
    (tmp_path / "results" / "runs" / "grid.csv").write_text("\n".join([lines[0], *finished]) + "\n")
    return tmp_path


def collect(out: str = "results/runs.csv") -> tuple[int, str]:
    """collect_runs.py in the working directory of collected_workdir (the current one)."""
    return run_main("collect_runs", "--grid", "results/runs/grid.csv", "--out", out,
                    "--histories", "results/runs/histories.csv")


QAT_RUN = "results/runs/method~qat/dataset~cifar100/arch~alexnet/w_bits~2/a_bits~2/teacher_bits~none/seed~0"


@pytest.mark.parametrize("file, damage, needles", [
    ("history.csv", b"\x89PNG\r\n\x1a\n\xff\xfe", ["is not a readable CSV file"]),
    ("history.csv", b"", ["is empty"]),
    ("history.csv", b"epoch,val_top1_student\n1,60.1\n2,abc\n", ["column val_top1_student", "line 3", "'abc'"]),
    ("history.csv", b"val_top1_student\n60.1\n", ["lacks the columns epoch"]),
    ("eval.json", {"top1": "abc"}, ["top1 is 'abc', not a number", "cmtkd evaluate"]),
    ("eval.json", {"top1": float("nan")}, ["top1 is nan, not a number"]),
    ("eval.json", {"top5": [1]}, ["top5 is [1], not a number"]),
    ("metrics.json", {"top1": "abc"}, ["top1 is 'abc', not a number", "cmtkd train"]),
])
def test_collect_runs_names_a_run_file_it_cannot_use(tmp_path, monkeypatch, file, damage, needles):
    """history.csv is not sealed: garbage in it is one line naming it; eval.json and metrics.json are sealed,
    but a resealed non-number where an accuracy belongs is one line too (an evaluation is a share of images
    right: never NaN). Nothing is written."""
    from cmtkd.files import read_sealed_json, write_sealed_json

    workdir = collected_workdir(tmp_path)
    monkeypatch.chdir(workdir)
    path = workdir / QAT_RUN / file
    if isinstance(damage, bytes):
        path.write_bytes(damage)
    else:
        content = {k: v for k, v in read_sealed_json(path, "").items() if k != "sha256"}
        write_sealed_json(path, {**content, **damage})
    one_line_error(*collect(), f"{QAT_RUN}/{file}", *needles)
    assert not (workdir / "results" / "runs.csv").exists()


@pytest.mark.parametrize("unwritable", [
    "a file in the way",
    pytest.param("read-only folder", marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")),
])
def test_collect_runs_to_an_unwritable_folder_is_one_line(tmp_path, monkeypatch, unwritable):
    workdir = collected_workdir(tmp_path)
    monkeypatch.chdir(workdir)
    blocked = workdir / "blocked"
    if unwritable == "a file in the way":
        blocked.write_text("not a folder")
    else:
        blocked.mkdir()
        blocked.chmod(0o555)
    one_line_error(*collect(out="blocked/runs.csv"), "blocked", "cannot")
    assert not (workdir / "results" / "runs" / "histories.csv").exists()


def runs_with_top1(tmp_path: Path, value: str) -> Path:
    """The fixture's runs.csv with the first run's top1 replaced by ``value`` (as text)."""
    lines = (GOLDEN / "runs.csv").read_text().splitlines()
    header = lines[0].split(",")
    first = lines[1].split(",")
    first[header.index("top1")] = value
    path = tmp_path / f"runs-{value or 'empty'}.csv"
    path.write_text("\n".join([lines[0], ",".join(first), *lines[2:]]) + "\n")
    return path


def test_make_tables_names_a_top1_that_is_not_a_number(tmp_path):
    runs = runs_with_top1(tmp_path, "abc")
    status, err = run_main("make_tables", "--runs", runs, "--grid", FIXTURE / "grid.csv", "--paper", PAPER,
                           "--out-dir", tmp_path / "out")
    one_line_error(status, err, runs, "column top1", "data row 1 (line 2)", "'abc' is not a number")
    assert not (tmp_path / "out").exists()


def test_make_tables_reads_a_nan_top1_as_an_empty_one(tmp_path):
    """A run without a top-1 (an empty cell) is left out of its cell's mean, as before; nan/NaN, how a missing
    number is often written, mean the same (not a crash)."""
    tables = {}
    for value in ("", "nan", "NaN"):
        out = tmp_path / f"out-{value or 'empty'}"
        status, err = run_main("make_tables", "--runs", runs_with_top1(tmp_path, value), "--grid",
                               FIXTURE / "grid.csv", "--paper", PAPER, "--out-dir", out)
        assert status == 0, err
        tables[value] = {p.name: p.read_text() for p in sorted(out.iterdir())}
    assert tables["nan"] == tables[""] == tables["NaN"]
    # ... and out of its cell's n (it counted as a seed: "69.35 (n=2)" from one value)
    import io

    import pandas as pd

    golden, missing = (pd.read_csv(io.StringIO(text)) for text in ((GOLDEN / "main.csv").read_text(),
                                                                    tables[""]["main.csv"]))
    ours = lambda frame: frame[frame["origin"] == "ours"]["n"].sum()  # noqa: E731
    assert ours(missing) == ours(golden) - 1
    mine = missing[missing["origin"] == "ours"]
    listed = mine["seeds"].fillna("").astype(str).map(lambda text: len(text.split(",")) if text else 0)
    assert (listed == mine["n"]).all()  # the seeds column lists the seeds n counts


def test_an_input_csv_that_is_a_fifo_is_one_line_not_a_hang(tmp_path):
    import os

    fifo = tmp_path / "runs.csv"
    os.mkfifo(fifo)
    status, err = run_main("make_tables", "--runs", fifo, "--grid", FIXTURE / "grid.csv", "--paper", PAPER,
                           "--out-dir", tmp_path / "out")
    one_line_error(status, err, fifo, "not a regular file")
