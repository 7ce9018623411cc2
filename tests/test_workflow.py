"""The Snakemake workflow: lint, the paper grids' DAGs, config errors, reruns, tables, plots, GPU slots.

Most tests are dry runs (``snakemake -n``) in a temporary working directory, so nothing here trains
except ``test_tiny_suite_end_to_end``. Expected job counts are derived here from the config files,
independently of workflow/scripts/grid.py.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from itertools import product
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "Snakefile"
SCRIPTS = ROOT / "workflow" / "scripts"
FIXTURE = ROOT / "tests" / "fixtures" / "workflow"
GOLDEN = FIXTURE / "golden"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]

# How methods use teachers (from the method docs): frozen pre-trained teacher runs, one or all of
# the set; jointly trained teachers; none; the teacher set of a teachers-only stage run.
PRETRAINED_ONE = {"kd", "kd-at"}
PRETRAINED_ALL = {"mtkd"}
STAGE = {"cmtkd-frozen": "cmtkd-teachers"}  # loads one cmtkd-teachers run (W32A32) of its teacher set
JOINT_ONE = {"cmtkd-1t"}
NO_TEACHER = {"fp", "qat"}


def snakemake(workdir: Path, *args: str, config: Path | None = None, timeout: int = 120,
              env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [*SNAKEMAKE, "--snakefile", str(SNAKEFILE), "--directory", str(workdir), "--cores", "1", *args]
    if config is not None:
        cmd += ["--configfile", str(config)]
    full_env = {k: v for k, v in os.environ.items() if k != "CMTKD_SKIP_DATA_CHECK"}
    full_env.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, check=False)


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a (dry) run as {rule: count}."""
    counts, inside = {}, False
    for line in output.splitlines():
        if line.startswith("job ") and "count" in line:
            inside = True
            continue
        if inside:
            parts = line.split()
            if not parts or set(line.strip()) <= {"-", " "}:
                continue
            if parts[0] == "total":
                break
            counts[parts[0]] = int(parts[1])
    return counts


def planned_jobs(output: str, rule: str) -> list[str]:
    """Run directories of the planned jobs of ``rule`` in a dry run's output."""
    dirs, current = [], None
    for line in output.splitlines():
        match = re.match(r"^(?:local)?rule (\S+):$", line.strip())
        if match:
            current = match.group(1)
        elif current == rule and line.strip().startswith("output:"):
            first = line.split("output:", 1)[1].split(",")[0].strip()
            dirs.append(str(Path(first).parent))
    return sorted(dirs)


def expected_runs(config: dict) -> set[tuple]:
    """Every run of a suite config, derived independently: the grid cells of all experiments
    (fp only at W32A32; teacherless methods with teacher set "none"; single-teacher methods with
    the highest bit-width of the set) plus the qat/fp teacher runs the frozen-teacher methods load
    (the b-bit teacher of seed s trained with seed 1000 * b + s) and the teachers-only stage runs the
    stage methods load."""
    dataset = config["dataset"]["name"]
    runs = set()
    for exp in config["experiments"].values():
        for method, arch, bits, seed in product(exp["methods"], exp["archs"], exp["bits"], exp["seeds"]):
            w, a = (32, 32) if method == "fp" else map(int, bits[1:].split("A"))
            if method in NO_TEACHER:
                sets = ["none"]
            elif method in PRETRAINED_ONE | JOINT_ONE:
                sets = [str(max(t)) for t in exp["teacher_sets"]]
            else:
                sets = ["-".join(map(str, t)) for t in exp["teacher_sets"]]
            runs |= {(method, dataset, arch, w, a, t, seed) for t in sets}
    for method, dataset_, arch, _w, _a, tset, seed in list(runs):
        if method in PRETRAINED_ONE | PRETRAINED_ALL:
            for b in map(int, tset.split("-")):
                runs.add(("fp" if b == 32 else "qat", dataset_, arch, b, b, "none", 1000 * b + seed))
        if method in STAGE:
            runs.add((STAGE[method], dataset_, arch, 32, 32, tset, seed))
    return runs


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def tiny_config(**experiment) -> dict:
    exp = {"methods": ["fp", "qat", "kd", "mtkd"], "archs": ["alexnet"], "bits": ["W2A2"],
           "teacher_sets": [[8, 4]], "seeds": [0, 1], **experiment}
    return {"dataset": {"name": "digits"}, "recipe": {"epochs": 1, "model": {"width": 0.0625}},
            "experiments": {"tiny": exp}}


# ------------------------------------------------------------------------------------- lint & DAG
def test_lint_is_clean(tmp_path):
    done = subprocess.run([*SNAKEMAKE, "--snakefile", str(SNAKEFILE), "--lint"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Lints for" not in done.stdout + done.stderr


@pytest.mark.parametrize("name", ["config.yaml", "cifar100.yaml", "imagenet.yaml"])
def test_dry_run_plans_every_run_of_the_grid_once(tmp_path, name):
    config = yaml.safe_load((ROOT / "config" / name).read_text())
    runs = expected_runs(config)
    # Data roots point nowhere here: a dry run must not need the data.
    done = snakemake(tmp_path, "-n", "-p", config=ROOT / "config" / name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "model.init_from" not in done.stdout  # recipe.init defaults to scratch: the paper's setting
    counts = job_counts(done.stdout)
    assert counts == {"train": len(runs), "grid_table": 1, "collect_runs": 1,  # train evaluates too
                      "make_tables": 1, "plots": 1, "all": 1}
    planned = planned_jobs(done.stdout, "train")
    assert len(planned) == len(set(planned)) == len(runs)  # every teacher once, shared


def test_default_suite_size():
    # Derivation of the default suite: per seed, comparison = fp (W32A32) + 6 methods at W2A2 = 7;
    # ablation adds cmtkd-noml, -avg at W2A2 (cmtkd is shared) = 2; frozen teachers qat
    # W8A8, W6A6, W4A4 = 3 (seeds 8000 + s, 6000 + s, 4000 + s: shared by kd and mtkd of seed s).
    # 12 runs per seed, 3 seeds.
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    assert len(expected_runs(config)) == (1 + 6 + 2 + 3) * 3 == 36


def test_paper_grids_cover_every_method_and_ablation():
    methods = {"fp", "qat", "kd", "kd-at", "mtkd", "dml", "kdcl", "cmtkd", "cmtkd-noml", "cmtkd-avg", "cmtkd-nofeat",
               "cmtkd-1t", "cmtkd-frozen", "cmtkd-teachers"}
    cifar = yaml.safe_load((ROOT / "config" / "cifar100.yaml").read_text())
    runs = expected_runs(cifar)
    assert {r[0] for r in runs} == methods
    assert {r[2] for r in runs} == {"alexnet", "resnet18"}
    assert {(1, 2), (2, 2), (4, 4)} <= {(r[3], r[4]) for r in runs}
    assert {r[6] for r in runs if r[6] < 1000} == {0, 1, 2}  # student seeds; teachers: 1000 * bits + seed
    assert {(r[3], r[6]) for r in runs if r[6] >= 1000} == {(b, 1000 * b + s) for b in (8, 6, 5, 4) for s in (0, 1, 2)}
    imagenet = yaml.safe_load((ROOT / "config" / "imagenet.yaml").read_text())
    assert imagenet["recipe"]["epochs"] == 100 and imagenet["recipe"]["optim"]["milestones"] == [30, 60, 90]
    assert {r[2] for r in expected_runs(imagenet)} == {"alexnet", "resnet18"}


# ----------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("change, expected", [
    (lambda c: c["experiments"]["tiny"].update(bits=["W9A2"]), ["experiments.tiny.bits[0]", "W<weight bits>"]),
    (lambda c: c.update(experiment={}), ["'experiment' was unexpected", "allowed keys here"]),
    (lambda c: c["experiments"]["tiny"].update(seeds="0"), ["experiments.tiny.seeds", "not of type 'array'"]),
    (lambda c: c["experiments"]["tiny"]["methods"].append("lqnet"),
     ["experiments.tiny.methods[4]", "unknown method 'lqnet'", "known methods"]),
    (lambda c: c["experiments"]["tiny"].update(bits=["W4A4"]),
     ["experiments.tiny.teacher_sets[0]", "not higher than the student W4A4", "higher teacher bit-widths"]),
    (lambda c: c["recipe"].update(arch="resnet18"), ["recipe.arch", "set per run by the grid"]),
    (lambda c: c.update(method_args={"mtkd": {"teachers": ["x"]}}), ["method_args.mtkd.teachers", "teacher_sets"]),
])
def test_bad_config_stops_before_any_job_naming_key_and_fix(tmp_path, change, expected):
    config = tiny_config()
    change(config)
    done = snakemake(tmp_path, "-n", config=write_config(tmp_path / "bad.yaml", config))
    assert done.returncode != 0
    for text in expected:
        assert text in done.stdout + done.stderr, done.stdout + done.stderr
    assert not (tmp_path / "results").exists()


def test_missing_dataset_stops_before_any_job(tmp_path):
    config = tiny_config(methods=["qat"], seeds=[0])
    config["dataset"] = {"name": "cifar100", "root": str(tmp_path / "no-cifar")}
    path = write_config(tmp_path / "cifar.yaml", config)
    assert snakemake(tmp_path, "-n", config=path).returncode == 0  # a dry run does not need the data
    done = snakemake(tmp_path, config=path)
    assert done.returncode != 0
    assert "config key 'dataset.root'" in done.stderr and "cifar-100-python" in done.stderr, done.stderr
    assert not list((tmp_path / "results").rglob("*.log")) and not list((tmp_path / "results").rglob("*.json"))


def test_invalid_imported_results_are_rejected(tmp_path):
    (tmp_path / "results" / "external").mkdir(parents=True)
    (tmp_path / "results" / "external" / "theirs.csv").write_text(
        "method,dataset,arch,w_bits,a_bits,top1\nlq-nets,cifar100,alexnet,2,two,61.1\n")
    done = snakemake(tmp_path, "-n", config=write_config(tmp_path / "c.yaml", tiny_config()))
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "theirs.csv" in output and "line 2" in output and "column a_bits" in output, output
    assert "runs.schema.yaml" in output, output


# ---------------------------------------------------------------------------- reruns and resume
def fake_finished_suite(workdir: Path, config: dict) -> Path:
    """Placeholder outputs for every job of ``config``, marked up to date with --touch."""
    path = write_config(workdir / "suite.yaml", config)
    done = snakemake(workdir, "-n", config=path)
    for line in done.stdout.splitlines():
        if line.strip().startswith(("output:", "log:")):
            for name in line.split(":", 1)[1].split(","):
                file = workdir / name.strip()
                file.parent.mkdir(parents=True, exist_ok=True)
                if not file.exists():
                    file.write_text("placeholder\n")
    touched = snakemake(workdir, "--touch", config=path)
    assert touched.returncode == 0, touched.stdout + touched.stderr
    assert "Nothing to be done" in snakemake(workdir, "-n", config=path).stdout
    return path


def test_deleting_one_run_retrains_only_it_and_what_depends_on_it(tmp_path):
    config = tiny_config()
    path = fake_finished_suite(tmp_path, config)
    runs = tmp_path / "results" / "runs"
    student = "method~kd/dataset~digits/arch~alexnet/w_bits~2/a_bits~2/teacher_bits~8/seed~1"
    shutil.rmtree(runs / student)
    done = snakemake(tmp_path, "-n", config=path)
    assert planned_jobs(done.stdout, "train") == [f"results/runs/{student}"]
    assert job_counts(done.stdout) == {"train": 1, "collect_runs": 1, "make_tables": 1, "plots": 1, "all": 1}
    fake_finished_suite(tmp_path, config)  # finished again

    # A frozen teacher: it and the students that load it (kd and mtkd of seed 0), nothing else.
    teacher = "method~qat/dataset~digits/arch~alexnet/w_bits~8/a_bits~8/teacher_bits~none/seed~8000"
    shutil.rmtree(runs / teacher)
    done = snakemake(tmp_path, "-n", config=path)
    assert planned_jobs(done.stdout, "train") == sorted([
        f"results/runs/{teacher}",
        "results/runs/method~kd/dataset~digits/arch~alexnet/w_bits~2/a_bits~2/teacher_bits~8/seed~0",
        "results/runs/method~mtkd/dataset~digits/arch~alexnet/w_bits~2/a_bits~2/teacher_bits~8-4/seed~0",
    ])


def test_frozen_runs_share_one_teachers_only_stage(tmp_path):
    """cmtkd-frozen of two student bit-widths loads one cmtkd-teachers run of its teacher set and seed."""
    config = tiny_config(methods=["cmtkd-frozen"], bits=["W2A2", "W1A2"], seeds=[0])
    done = snakemake(tmp_path, "-n", "-p", config=write_config(tmp_path / "frozen.yaml", config))
    assert done.returncode == 0, done.stdout + done.stderr
    stage = "results/runs/method~cmtkd-teachers/dataset~digits/arch~alexnet/w_bits~32/a_bits~32/teacher_bits~8-4/seed~0"
    frozen = "results/runs/method~cmtkd-frozen/dataset~digits/arch~alexnet/w_bits~{}/a_bits~2/teacher_bits~8-4/seed~0"
    assert planned_jobs(done.stdout, "train") == sorted([stage, frozen.format(1), frozen.format(2)])
    assert done.stdout.count(f"method_args.teachers_run={stage}") == 2
    assert "method_args.teacher_bits=[8, 4]" in done.stdout


def train_commands(output: str) -> dict[str, str]:
    """Run directory -> `cmtkd train` command of the planned train jobs of a dry run with -p."""
    return {re.search(r"--out '?([^' ]+)", line).group(1): line for line in output.splitlines()
            if "train_run.py" in line and "--out" in line}


def test_recipe_init_fp_starts_every_other_run_from_one_fp_run_per_arch_and_seed(tmp_path):
    """recipe.init: fp adds one fp run per (arch, seed) and starts every other run of the suite from it:
    students, their frozen qat teachers (seed 1000 * b + s: the fp run of seed s) and teachers-only stages."""
    config = tiny_config(methods=["qat", "kd", "mtkd", "cmtkd-frozen"], archs=["alexnet", "resnet18"])
    config["recipe"]["init"] = "fp"
    done = snakemake(tmp_path, "-n", "-p", config=write_config(tmp_path / "init.yaml", config))
    assert done.returncode == 0, done.stdout + done.stderr
    fp = "results/runs/method~fp/dataset~digits/arch~{}/w_bits~32/a_bits~32/teacher_bits~none/seed~{}"
    starts = {fp.format(arch, seed) for arch in ("alexnet", "resnet18") for seed in (0, 1)}
    without_init = {"results/runs/" + "/".join(f"{c}~{v}" for c, v in zip(
        ("method", "dataset", "arch", "w_bits", "a_bits", "teacher_bits", "seed"), run)) for run in expected_runs(config)}
    planned = planned_jobs(done.stdout, "train")
    assert len(planned) == len(set(planned)) and set(planned) == without_init | starts  # each fp run once
    commands = train_commands(done.stdout)
    assert set(commands) == set(planned)
    for run_dir, command in commands.items():
        if run_dir in starts:
            assert "model.init_from" not in command, command
            continue
        arch = re.search(r"arch~(\w+)", run_dir).group(1)
        seed = int(run_dir.rsplit("seed~", 1)[1]) % 1000
        assert f"--set model.init_from={fp.format(arch, seed)} " in command.replace("'", ""), command
    # Snakemake orders the jobs: a run that starts from an fp run takes its model.pt as input.
    assert f"{fp.format('alexnet', 0)}/model.pt" in done.stdout


def test_recipe_init_fp_reuses_the_grids_own_fp_run(tmp_path):
    config = tiny_config(seeds=[0])  # fp, qat, kd, mtkd
    config["recipe"]["init"] = "fp"
    done = snakemake(tmp_path, "-n", "-p", config=write_config(tmp_path / "init.yaml", config))
    assert done.returncode == 0, done.stdout + done.stderr
    planned = planned_jobs(done.stdout, "train")
    assert len(planned) == len(expected_runs(config))  # no second fp run
    fp = "results/runs/method~fp/dataset~digits/arch~alexnet/w_bits~32/a_bits~32/teacher_bits~none/seed~0"
    commands = train_commands(done.stdout)
    assert "model.init_from" not in commands[fp]
    assert sum(f"model.init_from={fp}" in c.replace("'", "") for c in commands.values()) == len(planned) - 1


def test_tables_target_never_trains(tmp_path):
    path = fake_finished_suite(tmp_path, tiny_config(methods=["fp", "qat"], seeds=[0]))
    shutil.rmtree(tmp_path / "results" / "runs" / "method~fp")  # a run not finished (yet)
    assert job_counts(snakemake(tmp_path, "-n", config=path).stdout)["train"] == 1
    done = snakemake(tmp_path, "tables", "-n", config=path)
    assert done.returncode == 0 and job_counts(done.stdout) == {"tables": 1}, done.stdout


# --------------------------------------------------------------------------- tables and plots
@pytest.fixture()
def fixture_workdir(tmp_path) -> Path:
    """tests/fixtures/workflow laid out as a working directory: runs, grid, imported results."""
    (tmp_path / "results").mkdir()
    shutil.copytree(FIXTURE / "runs", tmp_path / "results" / "runs")
    shutil.copy(FIXTURE / "grid.csv", tmp_path / "results" / "runs" / "grid.csv")
    shutil.copytree(FIXTURE / "external", tmp_path / "results" / "external")
    shutil.copy(FIXTURE / "config.yaml", tmp_path / "config.yaml")
    return tmp_path


def run_script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(SCRIPTS / name), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def build_fixture_tables(workdir: Path) -> Path:
    run_script("collect_runs.py", "--grid", "results/runs/grid.csv", "--out", "results/runs.csv",
               "--histories", "results/runs/histories.csv", "--finished-only", cwd=workdir)
    run_script("make_tables.py", "--runs", "results/runs.csv", "--grid", "results/runs/grid.csv",
               "--paper", str(ROOT / "results" / "paper" / "reported.csv"),
               "--external", "results/external/lqnets_rerun.csv", "--out-dir", "results/tables", cwd=workdir)
    return workdir / "results"


def test_tables_match_golden_files(fixture_workdir):
    """Rewrite the golden files after an intended change: CMTKD_UPDATE_GOLDEN=1 pytest -k golden."""
    results = build_fixture_tables(fixture_workdir)
    if os.environ.get("CMTKD_UPDATE_GOLDEN"):
        shutil.copy(results / "runs.csv", GOLDEN / "runs.csv")
        for produced in (results / "tables").iterdir():
            shutil.copy(produced, GOLDEN / produced.name)
    assert (results / "runs.csv").read_text() == (GOLDEN / "runs.csv").read_text()
    for name in ("main", "ablation", "paper_delta", "comparison"):
        for ext in ("csv", "md", "tex"):
            produced = (results / "tables" / f"{name}.{ext}").read_text()
            assert produced == (GOLDEN / f"{name}.{ext}").read_text(), f"{name}.{ext} differs from the golden file"


def test_tables_mark_missing_seeds_and_provenance(fixture_workdir):
    results = build_fixture_tables(fixture_workdir)
    runs = pd.read_csv(results / "runs.csv")
    assert len(runs) == 13  # 14 runs in the grid, qat seed 1 not finished
    kd = runs[runs["method"] == "kd"].sort_values("seed")
    assert kd["teacher_hashes"].tolist() == ["ab" * 32, "cd" * 32]
    assert set(runs[runs["role"] == "teacher"]["w_bits"]) == {8}
    main = (results / "tables" / "main.md").read_text()
    assert "63.40 (n=1/2)" in main  # the cell with a missing seed says so
    ours = {line.split("|")[3].strip(): line for line in main.splitlines() if "| ours " in line}
    # 68.91 and 69.35: mean ± t(0.975, 1) · s / √2 = 12.706 · 0.311 / 1.414; converged (no dagger)
    assert "69.13 ± 2.80 (n=2)" in ours["cmtkd"] and "†" not in ours["cmtkd"]
    assert "67.02 ± 2.29 (n=2) †" in ours["cmtkd-noml"] and "- † not converged: the best validation top-1" in main
    assert "imported [a]" in main and "72.1 [b]" in main and "SECONDARY" in main and "ASSUMPTIONS.md" in main
    delta = pd.read_csv(results / "tables" / "paper_delta.csv")
    cmtkd = delta[delta["method"] == "cmtkd"].iloc[0]
    assert cmtkd["delta_top1"] == pytest.approx(69.13 - 72.1, abs=1e-3)
    ablation = pd.read_csv(results / "tables" / "ablation.csv")
    nofeat = ablation[ablation["method"] == "cmtkd-nofeat"]
    assert len(nofeat) == 1 and nofeat["reported_top1"].isna().all()  # a method with no paper number
    tex = (results / "tables" / "main.tex").read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex and "$\\pm$" in tex


def test_a_cell_with_no_finished_run_is_shown_as_such(fixture_workdir):
    shutil.rmtree(fixture_workdir / "results" / "runs" / "method~qat" / "dataset~cifar100" / "arch~alexnet" / "w_bits~2")
    main = (build_fixture_tables(fixture_workdir) / "tables" / "main.md").read_text()
    assert "| qat          | —          | ours         | — (n=0/2)" in main


def test_plots_from_fixture_runs(fixture_workdir):
    results = build_fixture_tables(fixture_workdir)
    run_script("plots.py", "--runs", "results/runs.csv", "--histories", "results/runs/histories.csv",
               "--out-dir", "results/plots", cwd=fixture_workdir)
    for name in ("accuracy_vs_bits", "training_curves", "importance_weights"):
        png = results / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    sys.path.insert(0, str(SCRIPTS))
    from plots import importance_columns

    points = importance_columns(pd.read_csv(results / "runs" / "histories.csv"))
    assert list(points) == ["conv2", "conv3", "conv4"] and [i for i, _ in points["conv2"]] == [0, 1, 2]


def test_snakemake_tables_target_uses_finished_runs_only(fixture_workdir):
    done = snakemake(fixture_workdir, "tables", config=fixture_workdir / "config.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "train" not in job_counts(done.stdout)
    grid = fixture_workdir / "results" / "runs" / "grid.csv"
    assert grid.read_text() == (FIXTURE / "grid.csv").read_text()  # the fixture grid is the workflow's
    assert (fixture_workdir / "results" / "tables" / "main.md").read_text() == (GOLDEN / "main.md").read_text()
    assert (fixture_workdir / "results" / "plots" / "importance_weights.png").exists()


# ------------------------------------------------------------------------------ GPUs and costs
def test_gpu_slots_are_exclusive(tmp_path):
    """Three jobs, a pool of two GPUs: jobs that overlap in time never share a GPU; the third waits."""
    env = {**os.environ, "CMTKD_GPU_LOCK_DIR": str(tmp_path / "locks")}
    probe = ("import os, time; start = time.time(); time.sleep(1.5); "
             "print(os.environ['CUDA_VISIBLE_DEVICES'], start, time.time())")
    wrapper = [sys.executable, str(SCRIPTS / "gpu_slot.py"), "--pool", "3,5", "--", sys.executable, "-c", probe]
    jobs = [subprocess.Popen(wrapper, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for _ in range(3)]
    outputs = [job.communicate(timeout=60) for job in jobs]
    assert all(job.returncode == 0 for job in jobs), outputs
    slots = [(gpu, float(start), float(end)) for gpu, start, end in (out.split() for out, _ in outputs)]
    assert {gpu for gpu, _, _ in slots} == {"3", "5"}
    for i, (gpu_a, start_a, end_a) in enumerate(slots):
        for gpu_b, start_b, end_b in slots[i + 1:]:
            if start_a < end_b and start_b < end_a:  # ran at the same time
                assert gpu_a != gpu_b, slots
    assert any("waiting" in err for _, err in outputs)


def test_gpu_slots_claim_several_gpus_all_or_nothing(tmp_path):
    """--count 2 from a pool of four: jobs that overlap in time get disjoint pairs; the third waits."""
    env = {**os.environ, "CMTKD_GPU_LOCK_DIR": str(tmp_path / "locks")}
    probe = ("import os, time; start = time.time(); time.sleep(1.5); "
             "print(os.environ['CUDA_VISIBLE_DEVICES'], start, time.time())")
    wrapper = [sys.executable, str(SCRIPTS / "gpu_slot.py"), "--count", "2", "--pool", "7,1,4,2", "--",
               sys.executable, "-c", probe]
    jobs = [subprocess.Popen(wrapper, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for _ in range(3)]
    outputs = [job.communicate(timeout=60) for job in jobs]
    assert all(job.returncode == 0 for job in jobs), outputs
    slots = [(set(gpus.split(",")), float(start), float(end)) for gpus, start, end in (out.split() for out, _ in outputs)]
    assert all(len(gpus) == 2 and gpus <= {"1", "2", "4", "7"} for gpus, _, _ in slots), slots
    overlapping = 0
    for i, (gpus_a, start_a, end_a) in enumerate(slots):
        for gpus_b, start_b, end_b in slots[i + 1:]:
            if start_a < end_b and start_b < end_a:  # ran at the same time
                assert not gpus_a & gpus_b, slots
                overlapping += 1
    assert overlapping >= 1  # two pairs fit at once ...
    first_end = min(end for _, _, end in slots)
    assert sum(start >= first_end for _, start, _ in slots) == 1, slots  # ... the third waited for one
    assert sum("waiting" in err for _, err in outputs) == 1, outputs
    # More GPUs than the pool has: an error, not a wait forever.
    done = subprocess.run([*wrapper[:2], "--count", "5", "--pool", "0,1,2,3", "--", "true"], capture_output=True,
                          text=True, timeout=30, env=env, check=False)
    assert done.returncode != 0 and "only 4" in done.stderr, done.stderr


def shell_commands(output: str, rule: str) -> list[str]:
    """The shell commands of the planned jobs of ``rule`` in a dry run with --printshellcmds."""
    commands, current = [], None
    for line in output.splitlines():
        match = re.match(r"^(?:local)?rule (\S+):$", line.strip())
        if match:
            current = match.group(1)
        elif current == rule and "gpu_slot.py" in line:
            commands.append(line.strip())
    return commands


def test_imagenet_training_jobs_use_eight_gpus_through_torchrun(tmp_path):
    done = snakemake(tmp_path, "-n", "--printshellcmds", config=ROOT / "config" / "imagenet.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    runs = expected_runs(yaml.safe_load((ROOT / "config" / "imagenet.yaml").read_text()))
    train = shell_commands(done.stdout, "train")
    assert len(train) == len(runs)
    for command in train:
        assert "gpu_slot.py\" --count 8 --" in command and "--nproc_per_node 8" in command, command
        assert "--device cuda" in command and "train.amp=bf16" in command and "train.channels_last=true" in command
        assert " --evaluate > " in command  # the test-split evaluation runs in the same job
    # Resources as the scheduler sees them: gpu=8 per training job (its evaluation included).
    resources = {}
    current = None
    for line in done.stdout.splitlines():
        match = re.match(r"^(?:local)?rule (\S+):$", line.strip())
        if match:
            current = match.group(1)
        elif line.strip().startswith("resources:") and current == "train":
            gpu = re.search(r"\bgpu=(\d+)", line)
            resources.setdefault(current, set()).add(gpu.group(1) if gpu else None)
    assert resources == {"train": {"8"}}, resources


def test_one_gpu_per_job_keeps_the_single_process_command(tmp_path):
    config = {**tiny_config(methods=["qat"], seeds=[0]), "gpu": True}
    done = snakemake(tmp_path, "-n", "--printshellcmds", config=write_config(tmp_path / "gpu.yaml", config))
    assert done.returncode == 0, done.stdout + done.stderr
    (train,) = shell_commands(done.stdout, "train")
    assert "gpu_slot.py\" -- python" in train and "--count" not in train and "--nproc_per_node" not in train


def test_gpus_per_job_zero_is_rejected(tmp_path):
    config = {**tiny_config(), "gpu": True, "gpus_per_job": 0}
    done = snakemake(tmp_path, "-n", config=write_config(tmp_path / "bad.yaml", config))
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "config key 'gpus_per_job'" in output and "less than the minimum of 1" in output, output
    assert "GPUs per training job" in output, output


def test_train_run_under_torchrun_on_cpu(tmp_path):
    """train_run.py --nproc_per_node 2 --evaluate: the training runs as two gloo processes (CPU), then this
    process evaluates the saved student (eval.json: the number the training reported)."""
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, str(SCRIPTS / "train_run.py"), "train", "--out", str(out), "--method",
                           "qat", "--arch", "alexnet", "--dataset", "digits", "--w-bits", "2", "--a-bits", "2",
                           "--seed", "0", "--device", "cpu", "--set", "train.progress=none", "--set", "epochs=1",
                           "--set", "model.width=0.0625", "--nproc_per_node", "2", "--threads", "2", "--evaluate"],
                          capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "torch.distributed.run --standalone --nproc_per_node=2" in done.stderr, done.stderr
    assert "2 processes" in done.stdout + done.stderr
    metrics, evaluation = (json.loads((out / name).read_text()) for name in ("metrics.json", "eval.json"))
    assert evaluation["top1"] == metrics["top1"] and evaluation["split"] == "test"


def test_estimate_cost(tmp_path):
    config = {"dataset": {"name": "cifar100"}, "recipe": {"epochs": 200, "data": {"val_fraction": 0.1}},
              "experiments": {"one": {"methods": ["qat", "cmtkd"], "archs": ["resnet18"], "bits": ["W2A2"],
                                      "teacher_sets": [[8, 6, 4]], "seeds": [0]}}}
    path = write_config(tmp_path / "c.yaml", config)
    done = run_script("estimate_cost.py", "--config", str(path), "--images-per-s", "resnet18=5000", cwd=tmp_path)
    # qat: 200 epochs x 45,000 training images / 5,000 img/s = 0.5 h; cmtkd: 4 networks per step = 2 h.
    assert "Total: 2.5 GPU-hours" in done.stdout, done.stdout
    smk = snakemake(tmp_path, "estimate", config=path)  # no data needed, nothing trained
    assert smk.returncode == 0 and "No throughput known for resnet18" in smk.stdout, smk.stdout + smk.stderr


def test_estimate_cost_layers_configs_as_the_workflow_does(tmp_path):
    """config/sensitivity.yaml sets no recipe: layered over config/config.yaml (11 epochs) as Snakemake
    layers it, with every variant run of its `vary` priced at its own number of teachers."""
    done = run_script("estimate_cost.py", "--config", str(ROOT / "config" / "sensitivity.yaml"),
                      "--images-per-s", "alexnet=1000", cwd=tmp_path)
    assert "Runs: 48 (0 teacher-only, 45 sensitivity variants)." in done.stdout, done.stdout
    # 11 epochs x 3,000 training images (4,000 less the recipe's val_fraction 0.25) / 1,000 img/s per
    # network; networks per step 1 + n teachers: 3 runs with 1 teacher, 3 with 2, 39 with 3 (the default
    # point + 12 option levels), 3 with 4.
    hours = 11 * 3000 / 1000 / 3600 * (3 * 2 + 3 * 3 + 39 * 4 + 3 * 5)
    assert f"Total: {hours:.1f} GPU-hours" in done.stdout, done.stdout
    assert "|       11 |" in done.stdout  # the default suite's epochs


def test_estimate_cost_layers_several_files_in_order(tmp_path):
    grid = {"dataset": {"name": "cifar100"}, "recipe": {"epochs": 200},
            "experiments": {"one": {"methods": ["qat"], "archs": ["resnet18"], "bits": ["W2A2"],
                                    "teacher_sets": [[8, 6, 4]], "seeds": [0]}}}
    first = write_config(tmp_path / "a.yaml", grid)
    second = write_config(tmp_path / "b.yaml", {"recipe": {"epochs": 100}})
    done = run_script("estimate_cost.py", "--config", str(first), "--configfile", str(second),
                      "--images-per-s", "resnet18=5000", cwd=tmp_path)
    # 100 epochs x 37,500 images (50,000 less config/config.yaml's val_fraction 0.25) / 5,000 img/s
    assert "Total: 0.2 GPU-hours" in done.stdout, done.stdout
    done = run_script("estimate_cost.py", "--configfile", str(second), str(first),
                      "--images-per-s", "resnet18=5000", cwd=tmp_path)
    assert "Total: 0.4 GPU-hours" in done.stdout, done.stdout  # the later file wins: 200 epochs
    # Without config/config.yaml underneath, a file without `dataset` is no suite: one line naming the key.
    alone = subprocess.run([sys.executable, str(SCRIPTS / "estimate_cost.py"), "--replace-workflow-config",
                            "--config", str(second)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert alone.returncode != 0 and alone.stderr.count("\n") == 1, alone.stderr
    assert alone.stderr.startswith("cmtkd: error: invalid suite config") and "'dataset'" in alone.stderr


def test_paper_numbers_have_provenance():
    paper = pd.read_csv(ROOT / "results" / "paper" / "reported.csv")
    assert set(paper["provenance"]) <= {"PAPER", "SECONDARY", "REF"} and paper["source"].notna().all()
    table1 = paper[(paper["dataset"] == "cifar100") & (paper["arch"] == "alexnet")].set_index("method")["top1"]
    assert table1["cmtkd"] == 72.1 and table1["cmtkd-noml"] == 70.9


# ----------------------------------------------------------------------------------- end to end
def test_tiny_suite_end_to_end(tmp_path):
    """Two 1-epoch runs through the whole DAG: runs.csv, tables, plots and the HTML report."""
    config = tiny_config(methods=["fp", "qat"], seeds=[0])
    config["description"] = "tiny\n\n.. raw:: html\n\n   <script>alert('cmtkd')</script>\n"  # shown, never run
    done = snakemake(tmp_path, "--cores", "2", config=write_config(tmp_path / "tiny.yaml", config), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    results = tmp_path / "results"
    runs = pd.read_csv(results / "runs.csv")
    assert sorted(runs["method"]) == ["fp", "qat"] and runs["top1"].between(0, 100).all()
    for run_dir in runs["run_dir"]:
        evaluation = json.loads((tmp_path / run_dir / "eval.json").read_text())
        assert runs.set_index("run_dir").loc[run_dir, "top1"] == evaluation["top1"]
        assert (tmp_path / run_dir / "checkpoint.pt").exists()
    assert all((results / "tables" / f"{n}.{e}").exists() for n in ("main", "ablation", "paper_delta", "comparison")
               for e in ("csv", "md", "tex"))
    html = (results / "report.html").read_text()
    assert len(html) > 100_000
    assert "&lt;script&gt;alert('cmtkd')&lt;/script&gt;" in html and "<script>alert('cmtkd')" not in html
    assert "Nothing to be done" in snakemake(tmp_path, "-n", config=tmp_path / "tiny.yaml").stdout
    # A changed recipe makes every run outdated (the params rerun trigger) ...
    config["recipe"]["epochs"] = 2
    write_config(tmp_path / "tiny.yaml", config)
    assert job_counts(snakemake(tmp_path, "-n", config=tmp_path / "tiny.yaml").stdout)["train"] == 2
    # ... and tables built for another suite leave these runs out instead of averaging them in (issue 26.1):
    # `snakemake tables` without the smoke run's --configfile is the default suite, whose qat and fp cells
    # have the same run directories but 11 epochs.
    done = snakemake(tmp_path, "tables", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    said = done.stdout + done.stderr  # (the tables rule shows its log)
    left_out = [line for line in said.splitlines() if line.startswith("left out ")]
    assert len(left_out) == 2 and all("trained with another configuration" in line and "1 epochs" in line
                                      for line in left_out), said[-3000:]
    assert pd.read_csv(results / "runs.csv").empty
    assert "(n=1/3)" not in (results / "tables" / "main.md").read_text()  # before: `qat ... 19.80 (n=1/3)`
    # with its own config the smoke run tabulates again
    done = snakemake(tmp_path, "tables", config=write_config(tmp_path / "tiny.yaml", {**config, "recipe": {
        **config["recipe"], "epochs": 1}}), timeout=300)
    assert done.returncode == 0 and "left out " not in done.stdout + done.stderr, done.stdout[-3000:]
    assert sorted(pd.read_csv(results / "runs.csv")["method"]) == ["fp", "qat"]
    suite = yaml.safe_load((results / "runs" / "suite.yaml").read_text())  # the suite the tables were made for
    assert suite["recipe"]["epochs"] == 1 and list(suite["experiments"]) == ["tiny"]
