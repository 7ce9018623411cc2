"""The method catalog and typed method options: every catalog entry imports and declares option names
its ``Options`` has; options are coerced and checked once, with one error format; ablations pin
options without changing the caller's config; the README's "Adding your own method" example runs
through ``cmtkd train`` and a one-cell workflow grid."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import typing
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cmtkd.catalog import BUILTIN, ENV_VAR, MethodEntry, catalog
from cmtkd.cli import main, train_config
from cmtkd.config import RunConfig, config_from_flags, config_hash, from_dict, resolve
from cmtkd.errors import UserError
from cmtkd.methods.base import Method
from cmtkd.registry import get_method, method_names

from conftest import REPO_ROOT, cli_env

SCRIPTS = REPO_ROOT / "workflow" / "scripts"


def option_types(cls: type) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls.Options)


# ------------------------------------------------------------------------------------ the catalog
@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_every_entry_imports_and_matches_its_options(name):
    entry = BUILTIN[name]
    cls = get_method(name)
    assert issubclass(cls, Method) and dataclasses.is_dataclass(cls.Options)
    types = option_types(cls)
    if entry.path_option:
        assert entry.path_option in types, f"{name}: path_option {entry.path_option} is not an option"
        one = entry.use == "one" or entry.teachers == "stage"  # one run directory, or a list of them
        expected = str if one else list[str]
        assert types[entry.path_option] == expected, (name, types[entry.path_option])
    if entry.teachers == "stage":  # a teachers-only method of the catalog, with the same teacher set
        stage = BUILTIN[entry.stage]
        assert stage.teachers == "joint" and stage.use == "all" and stage.bits_option, name
    assert ("teacher_bits" in types) == entry.bits_option, name
    if entry.bits_option:
        assert types["teacher_bits"] == list[int]
    assert set(cls.pinned) <= set(types), name
    assert (cls.default_bits == 32) == entry.full_precision, name


def test_the_workflow_reads_the_same_catalog():
    sys.path.insert(0, str(SCRIPTS))
    try:
        import grid
    finally:
        sys.path.remove(str(SCRIPTS))
    assert grid.METHODS == BUILTIN and list(grid.METHODS) == list(BUILTIN)  # table order too
    assert method_names() == sorted(BUILTIN)


def test_catalog_entries_are_checked():
    with pytest.raises(ValueError, match="path_option"):
        MethodEntry("m:C", teachers="pretrained")
    with pytest.raises(ValueError, match="teachers must be one of none, pretrained, joint, stage"):
        MethodEntry("m:C", teachers="frozen")
    with pytest.raises(ValueError, match="stage .* is given exactly when teachers is stage"):
        MethodEntry("m:C", teachers="stage", path_option="run")
    with pytest.raises(ValueError, match="stage .* is given exactly when teachers is stage"):
        MethodEntry("m:C", teachers="pretrained", path_option="run", stage="cmtkd-teachers")
    with pytest.raises(ValueError, match="module:Class"):
        MethodEntry("m.C")


@pytest.mark.parametrize("text, needle", [
    ("my-kd: [1, 2]", "give at least 'target: module:Class'"),
    ("my-kd: {target: 'x:Y', teacher: pretrained}", "unknown key(s) teacher"),
    ("my-kd: {target: 'x:Y', teachers: pretrained}", "path_option is given exactly when"),
    ("qat: {target: 'x:Y'}", "method 'qat' already exists"),
    ("a: [", "not valid YAML"),
])
def test_bad_user_catalog_is_one_error_line(tmp_path, monkeypatch, capsys, text, needle):
    path = tmp_path / "methods.yaml"
    path.write_text(text)
    monkeypatch.setenv(ENV_VAR, str(path))
    assert main(["train", "--method", "qat", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("cmtkd: error:") == 1 and needle in err and str(path) in err and "Traceback" not in err


def test_user_method_that_does_not_import_is_one_error_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "methods.yaml").write_text("mine: {target: 'missing.py:Mine'}\nyours: {target: 'os:path'}\n")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "methods.yaml"))
    assert main(["train", "--method", "mine", "--print-config"]) == 2
    assert "method 'mine': cannot import" in capsys.readouterr().err
    assert main(["train", "--method", "yours", "--print-config"]) == 2
    assert "not a subclass of cmtkd.methods.base.Method" in capsys.readouterr().err


# ------------------------------------------------------------------------------- typed options
@pytest.mark.parametrize("method, key, value, allowed", [
    ("cmtkd", "theta_init", "gaussian", "uniform, random"),
    ("cmtkd", "at_reduction", "max", "mean, sum"),
    ("cmtkd", "teacher_logit", "median", "mean, all"),
    ("cmtkd", "teacher_loss", "both", "combined, per_teacher"),
    ("cmtkd", "teacher_init", "imagenet", "scratch, checkpoints"),
    ("kd-at", "attention_reduction", "max", "mean, sum"),
    ("mtkd", "aggregation", "max", "avg_probs, avg_kl, confidence"),
    ("kdcl", "teacher_reduction", "max", "sum, mean"),
])
def test_a_choice_is_checked_with_one_error_format(method, key, value, allowed):
    with pytest.raises(UserError) as info:
        config_from_flags(method=method, sets=[f"method_args.{key}={value}"])  # types before other checks
    assert str(info.value) == f"config key 'method_args.{key}' must be one of {allowed}; got '{value}'"


def test_run_config_choices_use_the_same_format():
    with pytest.raises(UserError) as info:
        config_from_flags(sets=["train.amp=fp8"])
    assert str(info.value) == "config key 'train.amp' must be one of none, bf16, fp16; got 'fp8'"


def test_literal_does_not_confuse_bool_and_int():
    @dataclasses.dataclass
    class Options:
        level: typing.Literal[1, 2] = 1

    assert from_dict(Options, {"level": 2}).level == 2
    with pytest.raises(UserError, match="must be one of 1, 2; got True"):
        from_dict(Options, {"level": True})


@pytest.mark.parametrize("method, pinned, conflict", [
    ("cmtkd-avg", {"learn_theta": False, "theta_init": "uniform"}, ("theta_init", "random")),
    ("cmtkd-noml", {"beta": 0.0}, ("beta", 0.25)),
    ("cmtkd-nofeat", {"gamma": 0.0}, ("gamma", 10.0)),
    ("cmtkd-frozen", {"freeze_teachers": True, "learn_theta": False}, None),  # their only other values: defaults
])
def test_ablations_pin_options_without_changing_the_callers_config(method, pinned, conflict):
    assert get_method(method).pinned == pinned
    given = {"teachers_run": "runs/teachers"} if method == "cmtkd-frozen" else {}
    cfg = RunConfig(method=method, method_args=copy.deepcopy(given))
    before = asdict(cfg)
    resolved = resolve(cfg)
    assert asdict(cfg) == before  # the caller's config is untouched
    assert {k: resolved.method_args[k] for k in pinned} == pinned
    defaults = asdict(get_method("cmtkd").Options())
    # the default and the pinned value are accepted (and the pin wins), anything else is an error
    for key in pinned:
        assert resolve(RunConfig(method=method, method_args={**given, key: defaults[key]})).method_args[key] == \
            pinned[key]
    if conflict:
        key, value = conflict
        with pytest.raises(UserError, match=f"method {method} fixes method_args.{key}="):
            resolve(RunConfig(method=method, method_args={**given, key: value}))


def test_one_teacher_ablation_derives_its_options():
    cfg = RunConfig(method="cmtkd-1t", method_args={"teacher_bits": [8, 6, 4]})
    resolved = resolve(cfg)
    assert resolved.method_args["teacher_bits"] == [8] and cfg.method_args == {"teacher_bits": [8, 6, 4]}


# --------------------------------------------------------------------------- the public config API
def test_config_from_flags_is_what_the_cli_resolves(capsys, tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("optim: {lr: 0.05}\nepochs: 3\n")
    flags = ["--method", "kd", "--arch", "alexnet", "--dataset", "digits", "--w-bits", "4", "--seed", "2",
             "--threads", "1", "--config", str(file), "--set", "method_args.teacher=runs/t", "--set", "epochs=4"]
    assert main(["train", *flags, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    cfg = config_from_flags(config_files=[file], method="kd", arch="alexnet", dataset="digits", w_bits=4, seed=2,
                            threads=1, sets=["method_args.teacher=runs/t", "epochs=4"])
    assert asdict(cfg) == printed == asdict(train_config(flags))
    assert config_hash(cfg) == config_hash(printed)
    assert cfg.epochs == 4 and cfg.optim.lr == 0.05 and cfg.a_bits == 2 and cfg.method_args["teacher"] == "runs/t"


# ------------------------------------------------------------------- adding a method (README example)
def readme_block(language: str, first_line: str) -> str:
    """The fenced block of README.md's "Adding your own method" that starts with ``first_line``."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Adding your own method", 1)[1].split("\n## ", 1)[0]
    for block in re.findall(rf"```{language}\n(.*?)```", section, flags=re.S):
        if block.startswith(first_line):
            return block
    raise AssertionError(f"README.md 'Adding your own method' has no {language} block starting {first_line!r}")


def run(cmd: list[str], cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_readme_method_in_a_temporary_file_runs_through_cli_and_a_one_cell_grid(tmp_path):
    """A method added outside the package (one file + one catalog line, README.md) is trained by
    ``cmtkd train`` and by a one-cell Snakemake grid, which wires its pre-trained teacher."""
    methods = tmp_path / "methods"
    methods.mkdir()
    (methods / "my_kd.py").write_text(readme_block("python", "# my_kd.py"))
    (methods / "methods.yaml").write_text(readme_block("yaml", "# methods.yaml"))
    env = {**cli_env(), ENV_VAR: str(methods / "methods.yaml")}
    cmtkd = [sys.executable, "-m", "cmtkd.cli"]
    tiny = ["--arch", "alexnet", "--dataset", "digits", "--epochs", "1", "--threads", "1",
            "--set", "model.width=0.0625", "--set", "train.progress=none"]

    assert "my-kd" in run([*cmtkd, "list"], tmp_path, env).stdout
    bad = subprocess.run([*cmtkd, "train", "--method", "my-kd", *tiny, "--set", "method_args.distance=l1",
                          "--out", str(tmp_path / "bad")], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and not (tmp_path / "bad").exists()
    assert bad.stderr.strip() == "cmtkd: error: config key 'method_args.distance' must be one of kl, mse; got 'l1'"

    # cmtkd train: a W8A8 teacher, then the new method distilling from it.
    run([*cmtkd, "train", "--method", "qat", "--w-bits", "8", "--a-bits", "8", *tiny, "--out", "teacher"], tmp_path, env)
    run([*cmtkd, "train", "--method", "my-kd", *tiny, "--set", "method_args.teacher=teacher",
         "--set", "method_args.distance=mse", "--out", "student"], tmp_path, env)
    history = pd.read_csv(tmp_path / "student" / "history.csv")
    assert {"loss_ce", "loss_distill"} <= set(history.columns) and len(history) == 1
    metrics = json.loads((tmp_path / "student" / "metrics.json").read_text())
    assert metrics["method"] == "my-kd"
    teacher_model = (tmp_path / "teacher" / "model.pt").resolve()
    assert json.dumps(metrics).count(hashlib.sha256(teacher_model.read_bytes()).hexdigest()) == 1  # metadata()

    # A one-cell grid: the workflow learns from the catalog that my-kd needs one pre-trained teacher.
    work = tmp_path / "grid"
    work.mkdir()
    config = {"dataset": {"name": "digits"}, "recipe": {"epochs": 1, "model": {"width": 0.0625}},
              "method_args": {"my-kd": {"distance": "mse"}},
              "experiments": {"mine": {"methods": ["my-kd"], "archs": ["alexnet"], "bits": ["W2A2"],
                                       "teacher_sets": [[8]], "seeds": [0]}}}
    (work / "suite.yaml").write_text(yaml.safe_dump(config))
    run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO_ROOT / "Snakefile"), "--directory", str(work),
         "--cores", "2", "--configfile", str(work / "suite.yaml")], work, env, timeout=600)
    runs = pd.read_csv(work / "results" / "runs.csv", dtype={"teacher_bits": str})
    row = runs.set_index("method").loc["my-kd"]
    assert 0 <= row["top1"] <= 100 and row["teacher_bits"] == "8"
    assert isinstance(row["teacher_hashes"], str) and row["teacher_hashes"]  # from metadata(): the teacher's SHA-256
    saved = yaml.safe_load((work / row["run_dir"] / "config.yaml").read_text())
    teacher_dir = "results/runs/method~qat/dataset~digits/arch~alexnet/w_bits~8/a_bits~8/teacher_bits~none/seed~8000"  # 1000 * bits + seed
    assert saved["method_args"] == {"teacher": teacher_dir, "distance": "mse", "weight": 1.0, "temperature": 4.0}
    assert (work / teacher_dir / "model.pt").exists()
    assert "my-kd" in (work / "results" / "tables" / "main.md").read_text()


def test_environment_is_read_at_call_time(tmp_path, monkeypatch):
    (tmp_path / "m.yaml").write_text("joint-thing: {target: 'cmtkd.baselines.kdcl:KDCL', teachers: joint, bits_option: true}\n")
    assert "joint-thing" not in catalog()
    monkeypatch.setenv(ENV_VAR, os.pathsep.join([str(tmp_path / "m.yaml")]))
    assert catalog()["joint-thing"].teachers == "joint" and get_method("joint-thing").__name__ == "KDCL"


def test_workflow_discards_a_checkpoint_only_when_the_config_changed(tmp_path, capsys):
    """train_run.py compares the run directory's config.yaml with the config the flags resolve to
    (the public train_config, no --print-config round trip)."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        import train_run
    finally:
        sys.path.remove(str(SCRIPTS))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    argv = ["train", "--out", str(run_dir), "--method", "cmtkd-noml", "--arch", "alexnet",
            "--set", "method_args.teacher_bits=[8,4]"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(asdict(train_config(argv[1:]))))
    (run_dir / "checkpoint.pt").write_bytes(b"stand-in")
    assert train_run.discard_stale_checkpoint(argv) == 0 and (run_dir / "checkpoint.pt").exists()
    assert train_run.discard_stale_checkpoint([*argv, "--set", "optim.lr=0.05"]) == 0
    assert not (run_dir / "checkpoint.pt").exists() and "optim.lr" in capsys.readouterr().err
    (run_dir / "checkpoint.pt").write_bytes(b"stand-in")
    assert train_run.discard_stale_checkpoint([*argv, "--set", "method_args.beta=0.3"]) == 2
    assert "cmtkd: error: config key 'method_args.beta'" in capsys.readouterr().err
    assert (run_dir / "checkpoint.pt").exists()
