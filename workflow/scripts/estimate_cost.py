"""GPU-hours of a grid before launching it.

    python workflow/scripts/estimate_cost.py --config config/cifar100.yaml [--runs results/runs.csv]
                                             [--images-per-s resnet18=9000 --images-per-s alexnet=20000]
    snakemake estimate --configfile config/cifar100.yaml      (the same, from the workflow)

The suite is layered as the workflow layers it (workflow/scripts/suite_config.py): config/config.yaml,
then every ``--config``/``--configfile`` file in the order given (a file with ``experiments`` brings
its own grid), validated with the schema's defaults filled in; ``--replace-workflow-config`` starts
from nothing instead of config/config.yaml. So ``--config config/sensitivity.yaml``, which sets no
recipe, is priced with the default suite's recipe, as ``snakemake --configfile`` would train it.

For every run of the grid (teachers and sensitivity variants included):

    hours = epochs x training images x networks per step / images per second / 3600

``images per second`` is the training throughput of one single-network QAT run of that
architecture and dataset on the target GPU, taken from (first match wins) ``--images-per-s ARCH=N``,
the config's ``throughput`` key, or the median ``images_per_s`` of finished qat/fp runs of the same
dataset and architecture in ``--runs`` (a runs.csv: run one short QAT job on the target machine,
e.g. ``cmtkd train --method qat --epochs 1 ...``, and pass its results). A method's own measured
throughput in ``--runs`` is used directly when there is one. A ``--runs`` or ``--grid`` file that is
missing or not such a CSV, or an ``--images-per-s`` that is not a number > 0, is one line
``cmtkd: error: ...`` (exit status 2). ``networks per step``: 1 for fp/qat,
1 + n/3 for n frozen teachers (forward only), 1 + n for n jointly trained teachers (CMT-KD, DML, KDCL).
Per-epoch validation adds a few percent and is not counted.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grid as G
from script_io import UserError, error, read_csv

TRAIN_SET_SIZE = {"digits": 4000, "cifar100": 50000, "imagenet": 1281167}  # before the val hold-out


def load_grid(configfiles: str | Sequence[str] | None, grid_csv: str | None, *,
              replace: bool = False) -> tuple[pd.DataFrame, dict]:
    """The runs (one row each, with their role) and the config's ``throughput``: from a grid.csv the
    workflow wrote, or from config files layered as the workflow layers them (module docstring)."""
    if grid_csv:
        return read_csv(grid_csv, columns=["method", "dataset", "arch", "teacher_bits", "seed", "role", "epochs",
                                           "val_fraction"], numbers=["epochs", "val_fraction"],
                        fix="the workflow writes it (snakemake results/runs/grid.csv)", dtype={"teacher_bits": str},
                        keep_default_na=False), {}
    import suite_config  # jsonschema + snakemake's validation: not needed for --grid (the estimate rule)

    files = [configfiles] if isinstance(configfiles, str) else list(configfiles or [])
    try:
        config, _ = suite_config.load_suite(files, replace=replace)
        return G.expand(config), config.get("throughput", {})
    except (suite_config.SuiteConfigError, G.GridError) as exc:
        first, *problems = [line.strip() for line in str(exc).splitlines()]  # one line: problems joined
        raise SystemExit(f"cmtkd: error: {first} {'; '.join(problems)}".rstrip())


def measured(runs_csv: str | None) -> pd.DataFrame:
    columns = ["method", "dataset", "arch", "images_per_s"]
    if not runs_csv:
        return pd.DataFrame(columns=columns)
    runs = read_csv(runs_csv, columns=columns, numbers=["images_per_s"], dtype={"teacher_bits": str},
                    keep_default_na=False, na_values=[""])
    return runs[runs["images_per_s"].notna() & (runs["images_per_s"] > 0)]


def estimate(runs: pd.DataFrame, throughput: dict[str, float], measured_runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for r in runs.to_dict("records"):
        n_teachers = len(G.teacher_list(r["teacher_bits"]))
        factor = G.METHODS[r["method"]].cost(n_teachers)
        same = measured_runs[(measured_runs["dataset"] == r["dataset"]) & (measured_runs["arch"] == r["arch"])]
        own = same[same["method"] == r["method"]]["images_per_s"]
        single = same[same["method"].isin(["qat", "fp"])]["images_per_s"]
        if not own.empty and r["method"] not in ("qat", "fp"):
            ips, basis, factor_used = float(own.median()), "measured (this method)", 1.0
        elif r["arch"] in throughput:
            ips, basis, factor_used = float(throughput[r["arch"]]), "given", factor
        elif not single.empty:
            ips, basis, factor_used = float(single.median()), "measured (qat/fp)", factor
        else:
            ips, basis, factor_used = float("nan"), "unknown", factor
        images = TRAIN_SET_SIZE[r["dataset"]] * (1 - float(r["val_fraction"]))
        hours = r["epochs"] * images * factor_used / ips / 3600
        rows.append({**r, "networks_per_step": factor, "images_per_s": ips, "basis": basis, "gpu_hours": hours})
    return pd.DataFrame(rows)


def report(costs: pd.DataFrame) -> str:
    by_method = costs.groupby(["dataset", "arch", "method"], sort=False).agg(
        runs=("seed", "size"), epochs=("epochs", "max"), networks_per_step=("networks_per_step", "max"),
        images_per_s=("images_per_s", "median"), basis=("basis", "first"),
        gpu_hours=("gpu_hours", lambda hours: hours.sum(min_count=1)),
    ).reset_index()
    order = {m: i for i, m in enumerate(G.METHODS)}
    by_method = by_method.sort_values(["dataset", "arch"], kind="stable").sort_values(
        ["dataset", "arch", "method"], key=lambda c: c.map(order) if c.name == "method" else c, kind="stable")
    lines = ["# Estimated cost of the grid", "", by_method.to_markdown(index=False, floatfmt=".2f"), ""]
    total = costs["gpu_hours"].sum(min_count=1)
    unknown = costs[costs["basis"] == "unknown"]
    n_variants = int((costs["role"] == "variant").sum())
    variants = f", {n_variants} sensitivity variants" if n_variants else ""
    lines.append(f"Runs: {len(costs)} ({(costs['role'] == 'teacher').sum()} teacher-only{variants}).")
    if not unknown.empty:
        archs = ", ".join(sorted(set(unknown["arch"])))
        lines.append(f"No throughput known for {archs} on {', '.join(sorted(set(unknown['dataset'])))}: pass "
                     f"--images-per-s ARCH=N (images/s of one QAT training run on the target GPU), set the "
                     f"config's `throughput`, or --runs a runs.csv with a measured qat run.")
        known = costs["gpu_hours"].sum()
        lines.append(f"Total over the runs with a throughput: {known:.1f} GPU-hours (incomplete).")
    else:
        lines.append(f"Total: {total:.1f} GPU-hours = {total / 24:.1f} GPU-days "
                     f"(wall time ≈ total / number of GPUs when every GPU runs one job at a time).")
    return "\n".join(lines) + "\n"


def parse_throughput(values: list[str]) -> dict[str, float]:
    out = {}
    for value in values:
        arch, _, number = value.partition("=")
        try:
            out[arch] = float(number)
        except ValueError:
            out[arch] = math.nan
        if not (arch and math.isfinite(out[arch]) and out[arch] > 0):
            raise UserError(f"--images-per-s expects ARCH=N with N images/s, a number > 0 (e.g. resnet18=9000), "
                            f"got {value!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", "--configfile", dest="configfiles", nargs="+", action="extend", default=[],
                        metavar="FILE", help="suite config(s) (config/cifar100.yaml, ...), layered in order over "
                                             "config/config.yaml as the workflow does (may repeat)")
    parser.add_argument("--replace-workflow-config", action="store_true",
                        help="layer the config files over nothing instead of config/config.yaml")
    parser.add_argument("--grid", help="results/runs/grid.csv written by the workflow (instead of --config)")
    parser.add_argument("--runs", help="a runs.csv with measured images_per_s")
    parser.add_argument("--images-per-s", action="append", default=[], metavar="ARCH=N",
                        help="training images/s of one QAT run of ARCH on the target GPU (may repeat)")
    args = parser.parse_args(argv)
    if bool(args.grid) == bool(args.configfiles):
        parser.error("give --config FILE... (suite configs) or --grid results/runs/grid.csv, one of the two")
    try:
        throughput = parse_throughput(args.images_per_s)
        runs, config_throughput = load_grid(args.configfiles, args.grid, replace=args.replace_workflow_config)
        measured_runs = measured(args.runs)
    except UserError as exc:
        return error(exc)
    print(report(estimate(runs, {**config_throughput, **throughput}, measured_runs)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
