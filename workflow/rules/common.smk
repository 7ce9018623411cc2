# The suite config, its validation, the grid of runs, and the helper functions of all rules.
import json
import os
import shlex
import sys
from pathlib import Path

import jsonschema
import pandas as pd
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import Paramspace, update_config, validate

ROOT = Path(workflow.basedir)  # the repository; outputs go to the working directory (normally the same)
SCRIPTS = ROOT / "workflow" / "scripts"
SCHEMAS = ROOT / "workflow" / "schemas"
sys.path.insert(0, str(SCRIPTS))
import grid  # noqa: E402  (workflow/scripts/grid.py: the grid as data, shared with estimate_cost.py)

# Jobs find this workflow's scripts and the Python that runs Snakemake (which has cmtkd installed)
# through the environment rather than through params, so that moving the checkout or the virtual
# environment does not make every finished run look outdated. A conda env (--sdm conda) still wins.
os.environ.update(CMTKD_SCRIPTS=str(SCRIPTS),
                  PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


# ------------------------------------------------------------------------------ the suite config
# `--configfile` replaces the default suite; without it config/config.yaml is read (and `--config`
# overrides apply on top). A `configfile:` directive would instead merge the two files.
if workflow.config_settings.configfiles:
    CONFIG_NAME = ", ".join(str(p) for p in workflow.config_settings.configfiles)
else:
    CONFIG_NAME = str(ROOT / "config" / "config.yaml")
    _suite = grid.load_config(CONFIG_NAME)
    update_config(_suite, dict(config))
    config.clear()
    config.update(_suite)


def _key(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def schema_problems(instance: dict, schema: dict) -> list[str]:
    """Every schema violation as "config key 'a.b[1]': what is wrong (what is expected)"."""
    problems = []
    validator = jsonschema.Draft202012Validator(schema)
    for error in sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.absolute_path]):
        where = _key(error.absolute_path)
        if error.validator == "additionalProperties":
            allowed = ", ".join(error.schema.get("properties", {})) or "none"
            problems.append(f"config key '{where}': {error.message}; allowed keys here: {allowed}")
            continue
        hint = None
        node = schema
        for step in error.absolute_schema_path:  # the innermost description along the failing path
            node = node[step] if isinstance(node, (dict, list)) else None
            if isinstance(node, dict) and "description" in node:
                hint = node["description"]
        problems.append(f"config key '{where}': {error.message}" + (f" (expected: {hint})" if hint else ""))
    return problems


def check_suite_config() -> None:
    schema_path = SCHEMAS / "config.schema.yaml"
    try:
        validate(config, str(schema_path))
    except WorkflowError:
        schema = yaml.safe_load(schema_path.read_text())
        problems = schema_problems(config, schema) or ["does not match workflow/schemas/config.schema.yaml"]
        raise WorkflowError(f"invalid suite config {CONFIG_NAME}:\n  " + "\n  ".join(problems)
                            + "\nFix the key(s) above; every key is documented in workflow/schemas/config.schema.yaml.")
    try:
        grid.check_config(config)
    except grid.GridError as exc:
        raise WorkflowError(f"invalid suite config {CONFIG_NAME}: {exc}")


check_suite_config()


# ---------------------------------------------------------------------------------------- the grid
RUN_TABLE = grid.expand(config)  # one row per run; role = grid (asked for) | teacher (pre-trained only)
PARAMS = Paramspace(RUN_TABLE[list(grid.COLUMNS)])
RUN = f"results/runs/{PARAMS.wildcard_pattern}"
RUN_TABLE["run_dir"] = [f"results/runs/{p}" for p in PARAMS.instance_patterns]
RUN_DIRS = list(RUN_TABLE["run_dir"])
GRID_CSV = "results/runs/grid.csv"  # results/runs/ holds everything generated per run (git-ignored)
RUNS_CSV = "results/runs.csv"
HISTORIES_CSV = "results/runs/histories.csv"
LOGS = "results/runs/logs"
PAPER_CSV = str(ROOT / "results" / "paper" / "reported.csv")
EXTERNAL_CSVS = sorted(str(p) for p in Path("results/external").glob("*.csv"))
GPU = bool(config["gpu"])
# On a local multi-GPU machine every job claims GPUs of its own (CUDA_VISIBLE_DEVICES) from a pool:
# evaluation one, training `gpus_per_job` (then run under torchrun, one process per GPU).
GPUS_PER_JOB = int(config.get("gpus_per_job", 1)) if GPU else 1
LAUNCHER = 'python "$CMTKD_SCRIPTS/gpu_slot.py" --' if GPU else ""
GPU_RESOURCES = {"gpu": 1} if GPU else {}  # `--resources gpu=N` then runs N jobs at once
TRAIN_LAUNCHER = f'python "$CMTKD_SCRIPTS/gpu_slot.py" --count {GPUS_PER_JOB} --' if GPUS_PER_JOB > 1 else LAUNCHER
TRAIN_GPU_RESOURCES = {"gpu": GPUS_PER_JOB} if GPU else {}
TABLE_NAMES = ("main", "ablation", "paper_delta")
TABLES = [f"results/tables/{name}.{ext}" for name in TABLE_NAMES for ext in ("csv", "md", "tex")]
PLOT_NAMES = ("accuracy_vs_bits", "training_curves", "importance_weights")
PLOTS = [f"results/plots/{name}.png" for name in PLOT_NAMES]
REPORT_HTML = "results/report.html"


wildcard_constraints:
    method="[a-z0-9][a-z0-9-]*",
    dataset="[a-z0-9]+",
    arch="[a-z0-9]+",
    w_bits="[0-9]+",
    a_bits="[0-9]+",
    teacher_bits="none|[0-9]+(-[0-9]+)*",
    seed="[0-9]+",


def run_dir(key: dict) -> str:
    return f"results/runs/{PARAMS.wildcard_pattern.format(**key)}"


def wildcard_key(wildcards) -> dict:
    return {c: wildcards[c] for c in grid.COLUMNS}


# ------------------------------------------------------------------------------------ teachers
def teacher_keys(wildcards) -> list[dict]:
    return grid.teacher_runs(wildcards.method, wildcards.dataset, wildcards.arch, wildcards.teacher_bits,
                             wildcards.seed)


def teacher_models(wildcards) -> list[str]:
    """model.pt of every frozen teacher that the run of `wildcards` loads (none for most methods)."""
    return [f"{run_dir(key)}/model.pt" for key in teacher_keys(wildcards)]


TEACHER_DIRS = sorted({
    run_dir(key)
    for row in RUN_TABLE.itertuples()
    for key in grid.teacher_runs(row.method, row.dataset, row.arch, row.teacher_bits, row.seed)
})


# --------------------------------------------------------------------------------------- train
def train_args(wildcards) -> str:
    """`cmtkd train` flags of one run: its grid cell, the suite's recipe and data settings, the
    method's options and its teachers (and train_run.py's `--nproc_per_node N` for multi-GPU jobs)."""
    key = wildcard_key(wildcards)
    teacher_dirs = [run_dir(k) for k in teacher_keys(wildcards)]
    args = ["--method", key["method"], "--arch", key["arch"], "--dataset", key["dataset"],
            "--w-bits", key["w_bits"], "--a-bits", key["a_bits"], "--seed", key["seed"],
            "--device", "cuda" if GPU else "cpu", "--set", "train.progress=none"]
    for value in grid.train_sets(config, key["method"], key["arch"], key["teacher_bits"], teacher_dirs):
        args += ["--set", value]
    if GPUS_PER_JOB > 1:  # train_run.py takes this off and runs `cmtkd train` under torchrun
        args += ["--nproc_per_node", str(GPUS_PER_JOB)]
    return grid.shell_join(args)


# ---------------------------------------------------------------------------- tables and plots
def check_external_csvs() -> None:
    """Imported results must follow the runs.csv schema; say which file, row and column is wrong."""
    for path in EXTERNAL_CSVS:
        try:
            validate(pd.read_csv(path, dtype={"teacher_bits": str}), str(SCHEMAS / "runs.schema.yaml"))
        except WorkflowError as exc:
            cause = exc.args[1] if len(exc.args) > 1 else exc
            raise WorkflowError(f"{path}: {exc.args[0]} {getattr(cause, 'message', cause)}; imported result "
                                f"files use the columns of results/runs.csv (workflow/schemas/runs.schema.yaml): "
                                f"method, dataset, arch, w_bits, a_bits and top1 are required, source recommended")
        except (ValueError, OSError) as exc:
            raise WorkflowError(f"{path}: not a readable CSV ({exc})")


check_external_csvs()


def estimate_flags(wildcards) -> str:
    flags = [f"--images-per-s {arch}={ips}" for arch, ips in config["throughput"].items()]
    if Path(RUNS_CSV).exists():
        flags.append(f"--runs {RUNS_CSV}")
    return " ".join(flags)


# ------------------------------------------------------------------------- checks before any job
def needed_runs() -> list[dict]:
    """Wildcards of the train/evaluate jobs this invocation will run (all runs if unknown)."""
    try:
        jobs = [job for job in workflow.dag.needrun_jobs() if job.rule.name in ("train", "evaluate")]
        return [{c: job.wildcards_dict[c] for c in grid.COLUMNS} for job in jobs]
    except Exception:  # internal API; fall back to checking every run of the grid
        return RUN_TABLE[list(grid.COLUMNS)].astype(str).to_dict("records")


def dataset_problem() -> str | None:
    data = config["dataset"]
    name, root = data["name"], Path(data.get("root", "data")).expanduser()
    if name not in grid.DATASET_ROOT_FILES or os.environ.get("CMTKD_SKIP_DATA_CHECK"):
        return None
    missing = [root / f for f in grid.DATASET_ROOT_FILES[name] if not (root / f).exists()]
    if not missing or (name == "cifar100" and data.get("download")):
        return None
    layout = {"cifar100": "cifar-100-python/{train,test} (the python version of CIFAR-100)",
              "imagenet": "train/<class>/*.JPEG and val/<class>/*.JPEG (ImageFolder layout)"}[name]
    return (f"config key 'dataset.root' = '{data.get('root', 'data')}': the {name} dataset is not there "
            f"(missing {missing[0]}). Fix: set dataset.root in {CONFIG_NAME} to the folder holding {layout}"
            + (", or set dataset.download: true" if name == "cifar100" else "")
            + ". (Data visible only on the compute nodes? export CMTKD_SKIP_DATA_CHECK=1.)")


def uses_conda() -> bool:
    """`--sdm conda`: jobs run in workflow/envs/cmtkd.yaml, and Snakemake's own environment needs neither
    torch nor cmtkd (pandas, pyyaml and jsonschema suffice)."""
    from snakemake.settings.types import DeploymentMethod

    return DeploymentMethod.CONDA in (workflow.deployment_settings.deployment_method or ())


def cmtkd_problems(runs: list[dict]) -> list[str]:
    """What the installed cmtkd itself rejects: unregistered methods, bad recipe keys or method options."""
    try:
        from cmtkd.config import build_config, from_dict, nest, parse_set
        from cmtkd.errors import UserError
        from cmtkd.registry import get_method, method_names
    except ImportError as exc:
        if uses_conda():
            return []  # the jobs' own environment has cmtkd: each `cmtkd train` checks its config at start
        return [f"cannot import cmtkd with {sys.executable} ({exc}); install the project (`make install`) and "
                f"run the Snakemake of that environment (.venv/bin/snakemake), or use --sdm conda"]
    problems = []
    registered = set(method_names())
    for method in sorted({r["method"] for r in runs} - registered):
        problems.append(f"method '{method}' (config key 'experiments.*.methods') is not registered in the "
                        f"installed cmtkd (`cmtkd list`: {', '.join(sorted(registered))}); update cmtkd or "
                        f"remove the method from the config")
    for arch in sorted({r["arch"] for r in runs}):
        sets = grid.train_sets(config, "qat", arch, grid.NO_TEACHERS, [])
        overrides = [{"method": "qat", "arch": arch, "data": {"name": config["dataset"]["name"]}}]
        try:
            build_config(overrides + [nest(*parse_set(s)) for s in sets])
        except UserError as exc:
            problems.append(f"config keys 'recipe' / 'arch_recipe.{arch}' / 'dataset': {exc}")
    for arch in sorted({r["arch"] for r in runs}):
        per_arch = config["arch_method_args"].get(arch, {})
        for method in sorted((set(config["method_args"]) | set(per_arch)) & registered):
            args = {**config["method_args"].get(method, {}), **per_arch.get(method, {})}
            try:
                from_dict(get_method(method).Options, args, prefix="method_args")
            except UserError as exc:
                problems.append(f"config key 'method_args.{method}' / 'arch_method_args.{arch}.{method}': {exc}")
    return problems


def preflight() -> None:
    """After the DAG is built and before the first job (never on a dry run): the checks a dry run
    cannot make without the data or without importing torch."""
    if workflow.touch:
        return
    runs = needed_runs()
    if not runs:
        return
    problems = [p for p in [dataset_problem()] if p] + cmtkd_problems(runs)
    if problems:
        print(f"cmtkd workflow: cannot start ({CONFIG_NAME}):\n  - " + "\n  - ".join(problems), file=sys.stderr)
        raise SystemExit(1)


onstart:
    preflight()


# -------------------------------------------------------------------------------------- report
def report_command() -> str:
    """`snakemake --report` for this same workflow, config files and --config overrides."""
    args = [sys.executable, "-m", "snakemake", "--snakefile", str(workflow.main_snakefile),
            "--directory", os.getcwd(), "--report", REPORT_HTML]
    for path in workflow.config_settings.configfiles:
        args += ["--configfile", str(path)]
    overrides = [f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}"
                 for k, v in workflow.config_settings.config.items()]
    if overrides:
        args += ["--config", *overrides]
    return shlex.join(str(a) for a in args)


def report_outdated() -> bool:
    outputs = [Path(p) for p in [*TABLES, *PLOTS, RUNS_CSV]]
    if not config["report"] or not all(p.exists() for p in outputs):
        return False
    html = Path(REPORT_HTML)
    return not html.exists() or html.stat().st_mtime < max(p.stat().st_mtime for p in outputs)


def write_report() -> None:
    import subprocess

    Path(LOGS).mkdir(parents=True, exist_ok=True)
    with open(f"{LOGS}/report.log", "w") as log:
        done = subprocess.run(report_command(), shell=True, stdout=log, stderr=subprocess.STDOUT)
    print(f"Report: {REPORT_HTML}" if done.returncode == 0 else
          f"Writing {REPORT_HTML} failed; see {LOGS}/report.log", file=sys.stderr)
