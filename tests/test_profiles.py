"""The Snakemake profiles: what a SLURM cluster is asked for (sbatch arguments as the executor plugin
renders them, where it is installed) and the local-GPU profile's settings."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def profile(name: str) -> dict:
    return yaml.safe_load((ROOT / "profiles" / name / "config.yaml").read_text())


def job_resources(config: dict, rule: str, gpus: int) -> dict:
    """What Snakemake hands the executor for a job of ``rule``: default-resources, then the rule's
    set-resources, then the rule's own ``gpu`` resource (workflow/rules/common.smk: gpu=gpus_per_job)."""
    return {**config.get("default-resources", {}), **config.get("set-resources", {}).get(rule, {}), "gpu": gpus}


def test_slurm_profile_leaves_the_account_to_the_plugin_and_asks_one_task_per_job():
    config = profile("slurm")
    for section in [config.get("default-resources", {}), *config.get("set-resources", {}).values()]:
        assert "slurm_account" not in section, "a placeholder account stops the plugin from detecting the real one"
    resources = job_resources(config, "train", 8)
    assert resources["tasks_per_gpu"] == 0 and "tasks" not in resources
    assert resources["nodes"] == 1


class _Resources(dict):
    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class _Job:
    def __init__(self, resources: dict, threads: int):
        self.resources = _Resources(resources)
        self.threads = threads


@pytest.mark.parametrize("rule,gpus", [("train", 1), ("train", 8), ("evaluate", 1)])
def test_slurm_sbatch_arguments_rendered_by_the_plugin(rule, gpus):
    submit = pytest.importorskip("snakemake_executor_plugin_slurm.submit_string",
                                 reason="snakemake-executor-plugin-slurm is not installed")
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    config = profile("slurm")
    job = _Job(job_resources(config, rule, gpus), threads=config["set-threads"][rule])
    params = {"run_uuid": "uuid", "slurm_logfile": "log", "comment_str": "rule_train", "account": "",
              "partition": f"-p {job.resources['slurm_partition']}", "workdir": "/work"}
    call = submit.get_submit_command(job, params) + set_gres_string(job)
    args = call.split()
    assert f"--gpus={gpus}" in args
    assert not any(a.startswith(("--ntasks", "--ntasks-per-gpu")) for a in args), call  # one task (SLURM's default)
    assert "-A" not in args  # the plugin detects the account at submission
    assert f"--cpus-per-task={config['set-resources'][rule]['cpus_per_task']}" in args
    if rule == "train":
        assert "--nodes=1" in args  # all GPUs of a torchrun job on one node


def test_local_gpu_profile_counts_gpus_as_a_resource():
    config = profile("local-gpu")
    assert any(str(r).startswith("gpu=") for r in config["resources"])


# ------------------------------------------------------------------ the Snakemake environment
# torch unimportable, and cmtkd not installed (its editable-install finder removed): the workflow may
# read only the checkout's own torch-free method catalog (cmtkd/catalog.py, through grid.py's fallback).
BLOCK_TORCH = ("import sys; sys.modules['torch'] = None; "
               "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]; "
               "from snakemake.cli import main; sys.argv = ['snakemake'] + sys.argv[1:]; main()")


def _snakemake_without_torch(workdir: Path, *args: str):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # cmtkd not importable from the checkout
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH, "--snakefile", str(ROOT / "Snakefile"),
                           "--directory", str(workdir), *args], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=300)


def test_snakemake_itself_needs_neither_torch_nor_cmtkd(tmp_path):
    """What `--sdm conda` relies on: the workflow parses and plans the paper grid with torch unimportable
    and cmtkd not installed in Snakemake's own environment (the jobs run in workflow/envs/cmtkd.yaml)."""
    done = _snakemake_without_torch(tmp_path, "-n", "--cores", "1", "--configfile", str(ROOT / "config" / "cifar100.yaml"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "train" in done.stdout


def test_readme_estimate_command_works_as_written(tmp_path):
    import re
    import shlex

    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"`(snakemake estimate [^`]+)`", readme)
    assert commands, "the README shows a `snakemake estimate ...` command"
    for command in commands:
        args = shlex.split(command)[1:]
        args = [str(ROOT / a) if a.startswith("config/") else a for a in args]
        done = _snakemake_without_torch(tmp_path, *args)
        assert done.returncode == 0, f"{command}: {done.stderr[-2000:]}"
        assert "Estimated cost of the grid" in done.stdout + done.stderr
