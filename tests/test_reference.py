"""Reference results: config/reference.yaml's grid, publish_results.py (a finished suite -> results/reference/
with a fingerprint) and reference_check.py (a rerun against the committed runs, cell by cell).

Nothing here trains: the suites are fixture folders written by the tests.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "workflow" / "scripts"
sys.path.insert(0, str(SCRIPTS))
import publish_results  # noqa: E402
import reference_check  # noqa: E402
import seed_stats  # noqa: E402
import suite_config  # noqa: E402
from test_workflow import expected_runs, job_counts, snakemake  # noqa: E402
from test_workflow_inputs import BAD_CSV, bad_csv, one_line_error  # noqa: E402

from cmtkd.files import sha256_file, write_sealed_json  # noqa: E402

REFERENCE_YAML = ROOT / "config" / "reference.yaml"


def runs(rows, **common) -> pd.DataFrame:
    """runs.csv rows from (method, seed, top1[, config_hash])."""
    base = dict(dataset="digits", arch="alexnet", w_bits=2, a_bits=2, role="grid", **common)
    out = []
    for row in rows:
        method, seed, top1, *config = row
        out.append({**base, "method": method, "seed": seed, "top1": top1,
                    "teacher_bits": "none" if method == "qat" else "8-6-4", "config_hash": (config or ["h"])[0],
                    "run_dir": f"results/runs/method~{method}/seed~{seed}"})
    return pd.DataFrame(out)


def check(tmp_path, reference: pd.DataFrame, rerun: pd.DataFrame, *args: str) -> subprocess.CompletedProcess:
    """``reference_check.py compare`` in this process (the CLI itself: test_missing_rerun_is_one_line)."""
    reference.to_csv(tmp_path / "reference.csv", index=False)
    rerun.to_csv(tmp_path / "rerun.csv", index=False)
    return compare(tmp_path / "rerun.csv", tmp_path / "reference.csv", "--out-dir", str(tmp_path / "out"), *args)


def compare(rerun: Path, reference: Path, *args: str) -> subprocess.CompletedProcess:
    """``reference_check.py compare RERUN --reference REFERENCE ARGS`` in this process."""
    argv = ["compare", str(rerun), "--reference", str(reference), *args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = reference_check.main(argv)
    return subprocess.CompletedProcess(argv, status, out.getvalue(), err.getvalue())


def table(tmp_path) -> pd.DataFrame:
    return pd.read_csv(tmp_path / "out" / "reference_check.csv", dtype=str).set_index("method")


REFERENCE = runs([("qat", s, v) for s, v in enumerate([94.0, 95.0, 94.5, 95.5, 94.8])]
                 + [("cmtkd", s, v) for s, v in enumerate([95.0, 95.2, 94.6, 95.8, 95.1])])


# ------------------------------------------------------------------------------- reference_check
def test_identical_rerun_agrees_seed_for_seed(tmp_path):
    done = check(tmp_path, REFERENCE, REFERENCE.iloc[[0, 1, 5]])
    assert done.returncode == 0, done.stdout + done.stderr
    result = table(tmp_path)
    assert result.loc["qat", "rule"] == "identical" and result.loc["qat", "identical seeds"] == "2 of 2"
    assert result.loc["cmtkd", "identical seeds"] == "1 of 1" and set(result["agree"]) == {"yes"}
    assert "2 cell(s) compared: 2 agree (2 identical" in done.stdout
    assert (tmp_path / "out" / "reference_check.csv").with_suffix(".md").read_text().startswith("| method")


def test_other_seeds_within_noise_agree_by_welch_and_a_shift_does_not(tmp_path):
    noise = runs([("qat", s, v) for s, v in zip(range(5, 10), [94.2, 95.3, 94.9, 95.1, 94.4])])
    done = check(tmp_path, REFERENCE, noise, "--per-cell")
    assert done.returncode == 0, done.stdout + done.stderr
    result = table(tmp_path).loc["qat"]
    assert result["rule"] == "Welch interval of Δ" and result["identical seeds"] == "0 of 0"
    ref, new = seed_stats.spread(REFERENCE["top1"][:5]), seed_stats.spread(noise["top1"])
    assert float(result["allowed |Δ|"]) == pytest.approx(seed_stats.welch_half_width(ref, new), abs=0.005)
    shifted = noise.assign(top1=noise["top1"] - 2.0)
    done = check(tmp_path, REFERENCE, shifted, "--per-cell")
    assert done.returncode == 1 and table(tmp_path).loc["qat", "agree"] == "no"
    assert "1 cell(s) compared: 0 agree" in done.stdout


def test_welch_half_width_matches_scipy():
    a, b = [94.0, 95.0, 94.5, 95.5, 94.8], [93.1, 95.9, 94.0]
    result = stats.ttest_ind(b, a, equal_var=False)
    if not hasattr(result, "confidence_interval"):
        pytest.skip("scipy < 1.11 has no confidence_interval")
    low, high = result.confidence_interval(0.95)
    half = seed_stats.welch_half_width(seed_stats.spread(a), seed_stats.spread(b))
    assert half == pytest.approx((high - low) / 2, rel=1e-9)
    assert seed_stats.welch_half_width(seed_stats.spread([1.0, 1.0]), seed_stats.spread([2.0, 2.0])) == 0.0


@pytest.mark.parametrize("value, agrees", [(96.0, True), (97.0, False)])
def test_one_rerun_seed_against_the_prediction_interval(tmp_path, value, agrees):
    done = check(tmp_path, REFERENCE, runs([("qat", 7, value)]))
    assert done.returncode == (0 if agrees else 1), done.stdout + done.stderr
    result = table(tmp_path).loc["qat"]
    values = REFERENCE["top1"][:5]
    expected = stats.t.ppf(0.975, 4) * values.std(ddof=1) * math.sqrt(1 + 1 / 5)  # one cell: m = 1
    assert result["rule"] == "prediction interval"
    assert float(result["allowed |Δ|"]) == pytest.approx(expected, abs=0.005)
    assert abs(value - values.mean()) < expected if agrees else abs(value - values.mean()) > expected


def test_bonferroni_over_the_compared_cells(tmp_path):
    rerun = runs([("qat", 7, 95.0), ("cmtkd", 7, 95.0)])
    check(tmp_path, REFERENCE, rerun)
    assert float(table(tmp_path).loc["qat", "confidence"]) == pytest.approx(1 - 0.05 / 2)
    check(tmp_path, REFERENCE, rerun, "--per-cell")
    assert float(table(tmp_path).loc["qat", "confidence"]) == pytest.approx(0.95)


def test_one_reference_seed_uses_the_tolerance(tmp_path):
    one = REFERENCE[REFERENCE["seed"] == 0]
    assert check(tmp_path, one, runs([("qat", 1, 94.4)])).returncode == 0  # |Δ| = 0.4 <= 0.5
    assert check(tmp_path, one, runs([("qat", 1, 94.6)])).returncode == 1
    assert check(tmp_path, one, runs([("qat", 1, 94.6)]), "--tolerance", "1").returncode == 0


def test_partial_rerun_and_cells_not_in_the_reference(tmp_path):
    rerun = pd.concat([REFERENCE.iloc[[2]], runs([("kd", 0, 12.0)])])
    done = check(tmp_path, REFERENCE, rerun)
    assert done.returncode == 0, done.stdout + done.stderr
    result = table(tmp_path)
    assert list(result.index) == ["kd", "qat"]  # cmtkd is not rerun: not compared
    assert result.loc["kd", "agree"] == "not in reference" and result.loc["qat", "agree"] == "yes"
    assert "1 cell(s) compared" in done.stdout and "1 rerun cell(s) not in the reference" in done.stdout


def test_a_different_training_config_does_not_agree(tmp_path):
    rerun = REFERENCE.iloc[[0]].assign(config_hash="other")
    done = check(tmp_path, REFERENCE, rerun)
    assert done.returncode == 1 and table(tmp_path).loc["qat", "agree"] == "no (config differs)"
    assert table(tmp_path).loc["qat", "config"] == "differs"


@pytest.mark.parametrize("make_rerun, message", [
    (lambda: runs([("kd", 0, 12.0)]), "no cell of the rerun is in the reference"),
    (lambda: pd.DataFrame({"method": ["qat"], "top1": [1.0]}), "lacks the columns"),
    (lambda: pd.concat([REFERENCE.iloc[[0]], REFERENCE.iloc[[0]]]), "rows for the same run"),
])
def test_nothing_to_compare_is_one_line_and_exit_2(tmp_path, make_rerun, message):
    done = check(tmp_path, REFERENCE, make_rerun())
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("cmtkd: error: ") and message in done.stderr
    assert done.stderr.count("\n") == 1 and not (tmp_path / "out").exists()


def test_missing_rerun_is_one_line(tmp_path):
    REFERENCE.to_csv(tmp_path / "reference.csv", index=False)
    done = subprocess.run([sys.executable, str(SCRIPTS / "reference_check.py"), "compare", str(tmp_path / "nowhere"),
                           "--reference", str(tmp_path / "reference.csv")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "runs.csv does not exist" in done.stderr


@pytest.mark.parametrize("kind", list(BAD_CSV))
@pytest.mark.parametrize("which", ["rerun", "reference"])
def test_a_bad_runs_csv_is_one_line_naming_it(tmp_path, which, kind):
    """Empty, garbage, unparsable, not a runs.csv, or missing: one line that names the file, nothing written."""
    good, bad = tmp_path / "good.csv", bad_csv(tmp_path, kind)
    REFERENCE.to_csv(good, index=False)
    files = {"rerun": good, "reference": good, which: bad}
    done = compare(files["rerun"], files["reference"], "--out-dir", str(tmp_path / "out"))
    said = "no reference results at" if (which, kind) == ("reference", "missing") else BAD_CSV[kind][1]
    one_line_error(done.returncode, done.stderr, bad, said)
    assert done.stdout == "" and not (tmp_path / "out").exists()


def test_an_unwritable_out_dir_is_one_line_and_prints_no_report(tmp_path):
    REFERENCE.to_csv(tmp_path / "reference.csv", index=False)
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the folder should be")
    done = compare(tmp_path / "reference.csv", tmp_path / "reference.csv", "--out-dir", str(blocked / "out"))
    one_line_error(done.returncode, done.stderr, blocked, "cannot create")
    assert done.stdout == ""


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "abc"])
def test_tolerance_must_be_a_finite_number_of_points(tmp_path, capsys, value):
    REFERENCE.to_csv(tmp_path / "reference.csv", index=False)
    reference = str(tmp_path / "reference.csv")
    with pytest.raises(SystemExit) as exit_:
        reference_check.main(["compare", reference, "--reference", reference, "--tolerance", value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "argument --tolerance: expected points, a finite number >= 0" in err, err


def test_targets_of_chosen_cells_and_seeds():
    reference = pd.concat([REFERENCE, runs([("qat", 0, 90.0)]).assign(arch="resnet18", run_dir="r18")])
    assert reference_check.targets(reference, "alexnet:W2A2:qat", "0,1") == [
        "results/runs/method~qat/seed~0/eval.json", "results/runs/method~qat/seed~1/eval.json"]
    assert len(reference_check.targets(reference, "*:w2a2:qat", None)) == 6
    assert len(reference_check.targets(reference, "all", None)) == 11
    with pytest.raises(reference_check.CheckError, match="alexnet:W1A2:qat is not in the reference"):
        reference_check.targets(reference, "alexnet:W1A2:qat", None)
    with pytest.raises(reference_check.CheckError, match="ARCH:BITS:METHOD"):
        reference_check.targets(reference, "alexnet-qat", None)
    with pytest.raises(reference_check.CheckError, match=r"seed\(s\) \[9\]"):
        reference_check.targets(reference, "all", "9")


# ------------------------------------------------------------------------------- publish_results
TINY = {"experiments": {"tiny": {"methods": ["qat", "kd"], "archs": ["alexnet"], "bits": ["W2A2"],
                                 "teacher_sets": [[8]], "seeds": [0, 1]}}}


def make_suite(tmp_path, drop_seed: int | None = None) -> tuple[Path, Path]:
    """A finished suite of TINY (kd and qat, seeds 0 and 1, the 8-bit teachers) as the workflow leaves it."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    suite = tmp_path / "suite"
    rows = []
    for method, w, tset, seed, role in [("qat", 2, "none", 0, "grid"), ("qat", 2, "none", 1, "grid"),
                                        ("kd", 2, "8", 0, "grid"), ("kd", 2, "8", 1, "grid"),
                                        ("qat", 8, "none", 8000, "teacher"), ("qat", 8, "none", 8001, "teacher")]:
        if seed == drop_seed:
            continue
        run_dir = f"results/runs/method~{method}/w_bits~{w}/seed~{seed}"
        (suite / run_dir).mkdir(parents=True)
        write_sealed_json(suite / run_dir / "metrics.json", {"env": {"python": "3.11.7", "threads": 1}})
        (suite / run_dir / "model.pt").write_bytes(b"weights")
        (suite / run_dir / "checkpoint.pt").write_bytes(b"state")
        rows.append(dict(method=method, dataset="digits", arch="alexnet", w_bits=w, a_bits=w, teacher_bits=tset,
                         seed=seed, role=role, top1=90.0 + seed % 7, train_seconds=10.0 + seed % 7, torch="2.14.1",
                         device_name="x86_64", git_commit="abc123" if seed else "abc123-dirty", run_dir=run_dir))
    pd.DataFrame(rows).to_csv(suite / "results" / "runs.csv", index=False)
    for name in (*(f"tables/main.{ext}" for ext in ("csv", "md", "tex")), "plots/curves.png", "plots/curves.pdf"):
        (suite / "results" / name).parent.mkdir(parents=True, exist_ok=True)
        (suite / "results" / name).write_text(name)
    logs = suite / ".snakemake" / "log"
    logs.mkdir(parents=True)
    (logs / "2026-11-27T090240.090239.snakemake.log").write_text(
        "  Date: 2026-11-27 09:02:40\n[Fri Nov 27 09:02:41 2026]\nElapsed time: 0:01:40.5\n")
    (logs / "2026-11-27T100000.000000.snakemake.log").write_text(  # killed: no Elapsed line
        "Building DAG of jobs...\n[Fri Nov 27 10:00:05 2026]\nrule train:\n[Fri Nov 27 10:00:20 2026]\n")
    return suite, config


def publish(suite: Path, config: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / "publish_results.py"), str(suite), "--configfile",
                           str(config), "--out", str(out)], capture_output=True, text=True, timeout=60)


def test_publish_copies_text_and_pictures_with_a_fingerprint(tmp_path):
    suite, config = make_suite(tmp_path)
    out = tmp_path / "results" / "reference"
    done = publish(suite, config, out)
    assert done.returncode == 0, done.stdout + done.stderr
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["ENVIRONMENT.md", "FINGERPRINT.json", "plots/curves.png", "runs.csv",
                     *(f"tables/main.{ext}" for ext in ("csv", "md"))]  # no checkpoint, model, log, .tex or .pdf
    print_ = json.loads((out / "FINGERPRINT.json").read_text())
    assert print_["code"]["run_commits"] == {"abc123": 4, "abc123-dirty": 2} and print_["code"]["any_run_dirty"]
    assert print_["runs"]["total"] == 6
    assert (print_["runs"]["grid"], print_["runs"]["teacher"]) == (4, 2)
    assert print_["runs"]["train_seconds_total"] == 10 * 6 + (0 + 1 + 0 + 1 + 6 + 0)  # 8000 % 7 = 6, 8001 % 7 = 0
    assert print_["runs"]["threads_per_job"] == [1] and print_["runs"]["python"] == ["3.11.7"]
    assert print_["wall_time"]["seconds"] == 100.5 + 20  # the finished invocation + the killed one (no Date line)
    layers = print_["suite"]["config_layers"]
    assert [layer["sha256"] for layer in layers] == [sha256_file(ROOT / "config" / "config.yaml"), sha256_file(config)]
    assert print_["suite"]["resolved_config"]["experiments"] == TINY["experiments"]
    assert print_["machine"]["cpu_count"] >= 1 and print_["machine"]["cpu_model"]
    assert {"torch", "snakemake", "numpy"} <= set(print_["machine"])
    assert print_["files"]["runs.csv"] == sha256_file(out / "runs.csv")
    assert "Wall time: 120" in (out / "ENVIRONMENT.md").read_text()


@pytest.mark.parametrize("log, expected", [
    ("SNAKEMAKE\n=========\n  Command: /venv/lib/python3.11/site-packages/snakemake/__main__.py --cores 2 "
     "--configfile tiny.yaml --directory suite\nBuilding DAG of jobs...\nProvided cores: 2\n",
     "- Command (from the suite's Snakemake logs, oldest first): "
     "`snakemake --cores 2 --configfile tiny.yaml --directory suite`"),
    ("Building DAG of jobs...\nProvided cores: 3\n", "--cores 3 --configfile"),  # an older log: cores only
    ("Building DAG of jobs...\n", "`snakemake --cores N --configfile"),  # nothing recorded
])
def test_environment_md_quotes_the_command_the_logs_record(tmp_path, log, expected):
    suite, config = make_suite(tmp_path)
    (suite / ".snakemake" / "log" / "2026-11-27T090240.090239.snakemake.log").write_text(
        log + "[Fri Nov 27 09:02:41 2026]\nElapsed time: 0:01:40.5\n")
    out = tmp_path / "reference"
    done = publish(suite, config, out)
    assert done.returncode == 0, done.stdout + done.stderr
    environment = (out / "ENVIRONMENT.md").read_text()
    assert expected in environment, environment
    assert ("were not recorded" in environment) == ("--cores N" in expected)
    recorded = json.loads((out / "FINGERPRINT.json").read_text())["suite"]["invocations"]
    assert [i["cores"] for i in recorded] == ([] if "--cores N" in expected else [2 if "Command" in log else 3])


def test_publish_refuses_a_suite_with_a_missing_run_and_keeps_the_old_results(tmp_path):
    suite, config = make_suite(tmp_path, drop_seed=1)
    out = tmp_path / "reference"
    out.mkdir()
    (out / "runs.csv").write_text("old")
    done = publish(suite, config, out)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and done.stderr.startswith("cmtkd: error: ")
    assert "2 of 6 runs of the config are not finished" in done.stderr
    assert "qat/digits/alexnet/2/2/none/1" in done.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert (out / "runs.csv").read_text() == "old"


@pytest.mark.parametrize("kind", list(BAD_CSV))
def test_publish_names_a_bad_runs_csv_in_one_line(tmp_path, capsys, kind):
    suite, config = make_suite(tmp_path)
    runs_csv = suite / "results" / "runs.csv"
    runs_csv.unlink()
    if BAD_CSV[kind][0] is not None:
        runs_csv.write_bytes(BAD_CSV[kind][0])
    status = publish_results.main([str(suite), "--configfile", str(config), "--out", str(tmp_path / "reference")])
    one_line_error(status, capsys.readouterr().err, runs_csv, BAD_CSV[kind][1])
    assert not (tmp_path / "reference").exists()


def test_publish_refuses_runs_of_another_config(tmp_path):
    suite, config = make_suite(tmp_path)
    config.write_text(yaml.safe_dump({"experiments": {"tiny": {**TINY["experiments"]["tiny"], "methods": ["qat"]}}}))
    done = publish(suite, config, tmp_path / "reference")
    assert done.returncode == 2 and "does not ask for" in done.stderr and not (tmp_path / "reference").exists()


def test_publish_replaces_the_old_folder_whole_or_not_at_all(tmp_path, monkeypatch):
    suite, config = make_suite(tmp_path)
    out = tmp_path / "reference"
    (out / "tables").mkdir(parents=True)
    (out / "tables" / "stale.csv").write_text("from an older grid")

    copyfile = shutil.copyfile

    def broken_copy(source, target):  # the disk fills up half-way through the copy
        if Path(source).suffix == ".png":
            raise OSError(28, "No space left on device")
        copyfile(source, target)

    monkeypatch.setattr(publish_results.shutil, "copyfile", broken_copy)
    with pytest.raises(OSError):
        publish_results.publish(suite, [str(config)], out, None, "cmd")
    assert sorted(p.name for p in out.rglob("*")) == ["stale.csv", "tables"]  # untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left
    monkeypatch.undo()
    publish_results.publish(suite, [str(config)], out, None, "cmd")
    assert not (out / "tables" / "stale.csv").exists() and (out / "tables" / "main.csv").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~publish_results.UMASK)


# ------------------------------------------------------------------------------- config/reference.yaml
def test_reference_grid_matches_its_header_and_the_dry_run(tmp_path):
    """The run counts config/reference.yaml's header states are the grid's (derived independently in
    test_workflow.expected_runs) and the jobs a dry run plans: one train job per run."""
    text = REFERENCE_YAML.read_text()
    alexnet, resnet18, total = map(int, re.search(r"(\d+) AlexNet runs \+ (\d+) ResNet-18 runs = (\d+) runs",
                                                  text).groups())
    planned = expected_runs(suite_config.layer_suite([REFERENCE_YAML]))  # over config/config.yaml, as the workflow
    assert (sum(r[2] == "alexnet" for r in planned), sum(r[2] == "resnet18" for r in planned)) == (alexnet, resnet18)
    assert len(planned) == total == alexnet + resnet18
    assert {r[6] for r in planned if r[6] < 1000} == {0, 1, 2, 3, 4}
    done = snakemake(tmp_path, "-n", config=REFERENCE_YAML)
    assert done.returncode == 0, done.stdout + done.stderr
    assert job_counts(done.stdout)["train"] == total


# ------------------------------------------------------------------------------- end to end (trains)
def test_publish_then_make_reference_check_reruns_a_cell_identically(tmp_path):
    """The acceptance path at toy size: a 1-epoch suite is run and published, then `make reference-check`
    reruns one of its cells in a fresh working directory and finds it identical, seed for seed."""
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump({"recipe": {"epochs": 1}, "report": False, "experiments": {"toy": {
        "methods": ["qat"], "archs": ["alexnet"], "bits": ["W2A2"], "seeds": [0]}}}))
    assert snakemake(tmp_path / "suite", config=config, timeout=300).returncode == 0
    assert publish(tmp_path / "suite", config, tmp_path / "reference").returncode == 0
    make = ["make", "-C", str(ROOT), "-o", ".venv/.cmtkd-installed", f"BIN={Path(sys.executable).parent}", "CORES=1",
            f"REFERENCE={tmp_path / 'reference'}", f"REFERENCE_CONFIG={config}", f"CHECK_DIR={tmp_path / 'check'}",
            "CELLS=alexnet:W2A2:qat", "reference-check"]
    done = subprocess.run(make, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 cell(s) compared: 1 agree (1 identical" in done.stdout
    rerun = pd.read_csv(tmp_path / "check" / "results" / "runs.csv")
    assert list(rerun["method"]) == ["qat"]  # only the chosen cell was trained
    result = pd.read_csv(tmp_path / "check" / "reference-check" / "reference_check.csv", dtype=str)
    assert list(result["config"]) == ["same"] and list(result["identical seeds"]) == ["1 of 1"]
