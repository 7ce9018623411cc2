# The suite's wiring: its config, the grid of runs, paths, and the per-run values the rules use.
# The logic lives in workflow/scripts/ (suite_config, grid, checks, html_report; tested there).
import json
import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import Paramspace

ROOT = Path(workflow.basedir)  # the repository; outputs go to the working directory (normally the same)
SCRIPTS, SCHEMAS = ROOT / "workflow" / "scripts", ROOT / "workflow" / "schemas"
sys.path.insert(0, str(SCRIPTS))
import checks, grid, html_report, suite_config  # noqa: E401,E402

# Jobs find these scripts and this Python (with cmtkd) through the environment, not params: moving
# the checkout or the venv leaves finished runs up to date.
os.environ.update(CMTKD_SCRIPTS=str(SCRIPTS),
                  PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))

# config/config.yaml, then each --configfile layered on top (one with `experiments` brings its own
# grid), then --config overrides read as YAML: see suite_config.py and config/README.md.
try:
    CONFIGFILES, CONFIG_ARGS, REPLACE_CONFIG = suite_config.invocation(workflow)
    _suite, CONFIG_NAME = suite_config.load_suite(CONFIGFILES, CONFIG_ARGS, replace=REPLACE_CONFIG)
    EXTERNAL_CSVS = sorted(str(p) for p in Path("results/external").glob("*.csv"))
    checks.read_external(EXTERNAL_CSVS)  # imported results: valid rows, one row per run
except (suite_config.SuiteConfigError, checks.InputError) as exc:
    raise WorkflowError(str(exc))
config.clear()
config.update(_suite)

RUN_TABLE = grid.expand(config)  # one row per run; role = grid (asked for) | teacher (pre-trained only)
PARAMS = Paramspace(RUN_TABLE[list(grid.COLUMNS)])
RUN = f"results/runs/{{variant}}{PARAMS.wildcard_pattern}"  # variant: "" or variant~<option>=<level>/ (vary)
RUN_TABLE["run_dir"] = grid.run_dirs(RUN_TABLE, PARAMS.instance_patterns)
RUN_DIRS = list(RUN_TABLE["run_dir"])
GRID_CSV, RUNS_CSV, HISTORIES_CSV = "results/runs/grid.csv", "results/runs.csv", "results/runs/histories.csv"
LOGS = "results/runs/logs"  # results/runs/: everything generated per run (git-ignored)
PAPER_CSV = str(ROOT / "results" / "paper" / "reported.csv")
GPU = bool(config["gpu"])
# gpu: true -> every training job claims `gpus_per_job` GPUs of its own from a pool (gpu_slot.py;
# with more than one it runs under torchrun, one process per GPU) and evaluates on them afterwards.
GPUS_PER_JOB = int(config["gpus_per_job"]) if GPU else 1
LAUNCHER = 'python "$CMTKD_SCRIPTS/gpu_slot.py" --' if GPU else ""
TRAIN_LAUNCHER = f'python "$CMTKD_SCRIPTS/gpu_slot.py" --count {GPUS_PER_JOB} --' if GPUS_PER_JOB > 1 else LAUNCHER
TRAIN_GPU_RESOURCES = {"gpu": GPUS_PER_JOB} if GPU else {}  # `--resources gpu=N`: N GPUs in the pool
TABLE_NAMES = ("main", "ablation", "paper_delta", "comparison", "teachers")
PLOT_NAMES = ("accuracy_vs_bits", "training_curves", "importance_weights")
TABLES = [f"results/tables/{name}.{ext}" for name in TABLE_NAMES for ext in ("csv", "md", "tex")]
PLOTS, REPORT_HTML = [f"results/plots/{name}.png" for name in PLOT_NAMES], "results/report.html"


wildcard_constraints:
    method="[a-z0-9][a-z0-9-]*",
    dataset="[a-z0-9]+",
    arch="[a-z0-9]+",
    w_bits="[0-9]+",
    a_bits="[0-9]+",
    teacher_bits="none|[0-9]+(-[0-9]+)*",
    seed="[0-9]+",
    variant="(variant~[^/]+/)?",


def run_dir(key) -> str:
    return f"results/runs/{PARAMS.wildcard_pattern.format(**{c: key[c] for c in grid.COLUMNS})}"


def teacher_dirs(key) -> list[str]:  # the teacher runs (or teachers-only stage) the run `key` loads
    runs = grid.loaded_runs(key["method"], key["dataset"], key["arch"], key["teacher_bits"], key["seed"])
    return [run_dir(t) for t in runs]


def train_argv(key) -> list[str]:  # recipe.init = fp: plus the fp run it starts from (grid.init_runs)
    key = grid.run_key(key)  # with its variant label in a suite with `vary`
    return grid.train_argv(config, key, teacher_dirs(key), [run_dir(r) for r in grid.init_runs(config, key)])


onstart:
    checks.preflight(workflow, config, CONFIG_NAME, RUN_TABLE, train_argv)  # data and `cmtkd train`, per run
