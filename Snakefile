# CMT-KD benchmark suite: the experimental section of Pham, Hoang & Do, "Collaborative Multi-Teacher
# Knowledge Distillation for Learning Low Bit-width Deep Neural Networks" (WACV 2023), as a workflow.
#
#   snakemake --cores 2                                    default suite (digits, CPU, ~9 min)
#   snakemake --cores 2 --configfile config/cifar100.yaml  the paper's CIFAR-100 grid
#   snakemake --cores 2 --config recipe='{epochs: 1}'      any key overridden (config/README.md)
#   snakemake tables --cores 1                             tables + plots from finished runs, no training
#   snakemake estimate --cores 1 --configfile config/imagenet.yaml   GPU-hours before a paper grid
#
# The grid (config/*.yaml layered over config/config.yaml, validated against
# workflow/schemas/config.schema.yaml) is a Paramspace of method x dataset x arch x W/A x teacher
# set x seed; before the first job cmtkd itself resolves every run's `cmtkd train` command line.
# Every run is trained once, evaluated on its own (eval.json is the number that counts), collected
# into results/runs.csv and turned into tables, plots and an HTML report next to the paper's numbers
# (results/paper/) and any imported results (results/external/*.csv).
from snakemake.utils import min_version

min_version("8.0")


include: "workflow/rules/common.smk"  # suite config, the grid, checks before any job
include: "workflow/rules/teachers.smk"  # frozen teachers the distillation baselines load
include: "workflow/rules/train.smk"  # one `cmtkd train` + `cmtkd evaluate` per grid cell
include: "workflow/rules/tables.smk"  # results/runs.csv -> results/tables/
include: "workflow/rules/plots.smk"  # results/plots/
include: "workflow/rules/sensitivity.smk"  # sensitivity studies (experiments with `vary`)
include: "workflow/rules/report.smk"  # results/report.html
include: "workflow/rules/estimate.smk"  # GPU-hours of a grid


report: "workflow/report/workflow.rst"


rule all:
    """Train and evaluate the whole grid, then build tables and plots (and the HTML report)."""
    default_target: True
    input:
        # Every run is a target itself: a deleted run directory is retrained (with what depends on
        # it) even though the tables built from it still exist.
        [f"{d}/eval.json" for d in RUN_DIRS],
        TABLES,
        PLOTS,
        SENSITIVITY_OUTPUTS,  # a suite with `vary` only
