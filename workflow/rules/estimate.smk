# Cost of a grid before launching it (`snakemake estimate --cores 1 --configfile config/<suite>.yaml`): GPU-hours from measured throughput x epochs x training images x
# networks per step. Same as `python workflow/scripts/estimate_cost.py --config config/<suite>.yaml`.


localrules:
    estimate,


rule estimate:
    """Print the estimated GPU-hours of the grid (trains nothing)."""
    input:
        grid=GRID_CSV,
    params:
        # measured throughput from the config; results/runs.csv's own measurements when it exists
        flags=lambda wildcards: " ".join(
            [f"--images-per-s {arch}={ips}" for arch, ips in config["throughput"].items()]
            + ([f"--runs {RUNS_CSV}"] if Path(RUNS_CSV).exists() else [])
        ),
    log:
        f"{LOGS}/estimate.log",
    conda:
        "../envs/estimate.yaml"  # pandas + tabulate: `--sdm conda` builds no torch environment for it
    shell:
        'python "$CMTKD_SCRIPTS/estimate_cost.py" --grid {input.grid:q} {params.flags}'
        " > {log:q} 2>&1; status=$?; cat {log:q}; exit $status"
