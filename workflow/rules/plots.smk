# results/plots/: accuracy vs bit-width, training curves, CMT-KD importance weights.


localrules:
    plots,


rule plots:
    """Accuracy vs bit-width per method, validation curves, importance-weight trajectories."""
    input:
        runs=RUNS_CSV,
        histories=HISTORIES_CSV,
    output:
        **{
            name: report(f"results/plots/{name}.png", caption=f"../report/{name}.rst", category="Plots")
            for name in PLOT_NAMES
        },
        # the same figures as vector PDFs, for papers
        **{f"{name}_pdf": f"results/plots/{name}.pdf" for name in PLOT_NAMES},
    log:
        f"{LOGS}/plots.log",
    conda:
        "../envs/cmtkd.yaml"
    script:
        "../scripts/plots.py"
