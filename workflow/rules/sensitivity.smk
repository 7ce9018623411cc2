# Sensitivity studies: a suite whose experiments have `vary` (config/sensitivity.yaml). Each factor's
# levels against its default level, paired by seed (workflow/scripts/sensitivity.py):
# results/tables/sensitivity.{csv,md,tex}, results/plots/sensitivity.png (accuracy per level) and
# sensitivity_pi.png (CMT-KD's importance weights per epoch). Other suites have none of these jobs.
SENSITIVITY = grid.has_variants(config)
SENSITIVITY_TABLE = "results/tables/sensitivity"  # .csv, .md, .tex
LEVELS_CSV = "results/runs/sensitivity_levels.csv"  # every (factor, level) and the run cell holding it
SENSITIVITY_PLOTS = ("sensitivity", "sensitivity_pi")
SENSITIVITY_OUTPUTS = (
    [f"results/tables/sensitivity.{ext}" for ext in ("csv", "md", "tex")]
    + [f"results/plots/{name}.png" for name in SENSITIVITY_PLOTS]
    if SENSITIVITY
    else []
)


localrules:
    sensitivity_levels,
    sensitivity,


rule sensitivity_levels:
    """The factors and levels of the suite's `vary` keys, one row per level and cell."""
    output:
        LEVELS_CSV,
    log:
        f"{LOGS}/sensitivity_levels.log",
    params:
        rows=grid.sensitivity_levels(config).to_dict("records"),
        columns=list(grid.SENSITIVITY_COLUMNS),
    run:
        import pandas as pd

        pd.DataFrame(params.rows, columns=params.columns).to_csv(output[0], index=False)


rule sensitivity:
    """Top-1 per factor and level against the default level (paired by seed, Holm per factor), plots."""
    input:
        runs=RUNS_CSV,
        histories=HISTORIES_CSV,
        levels=LEVELS_CSV,
    output:
        table_csv=report(f"{SENSITIVITY_TABLE}.csv", caption="../report/sensitivity_table.rst", category="Tables"),
        table_md=f"{SENSITIVITY_TABLE}.md",
        table_tex=f"{SENSITIVITY_TABLE}.tex",
        **{
            name: report(f"results/plots/{name}.png", caption=f"../report/{name}.rst", category="Plots")
            for name in SENSITIVITY_PLOTS
        },
        **{f"{name}_pdf": f"results/plots/{name}.pdf" for name in SENSITIVITY_PLOTS},
    log:
        f"{LOGS}/sensitivity.log",
    conda:
        "../envs/cmtkd.yaml"
    script:
        "../scripts/sensitivity.py"
