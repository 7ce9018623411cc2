# results/runs.csv (one row per evaluated run) -> results/tables/ (CSV, Markdown, LaTeX), next to the
# paper's numbers (results/paper/reported.csv) and imported results (results/external/*.csv).


localrules:
    grid_table,
    collect_runs,
    make_tables,
    tables,


rule grid_table:
    """The runs the config asks for (and the teachers they need), one row each, with the config hash each
    is trained with; beside it the resolved suite config itself (results/runs/suite.yaml)."""
    output:
        GRID_CSV,
        suite="results/runs/suite.yaml",
    log:
        f"{LOGS}/grid_table.log",
    params:
        rows=RUN_TABLE.to_dict("records"),
        suite=json.dumps(config, sort_keys=True, default=str),  # another suite (recipe): another grid.csv
    run:
        # each run's config hash as this suite trains it: collect_runs leaves out a run directory of
        # another suite (e.g. a 1-epoch smoke run at the same path) instead of averaging it in
        checks.write_grid(params.rows, train_argv, output[0], output.suite, config, CONFIG_NAME)


rule collect_runs:
    """Every run's eval.json and metrics.json -> results/runs.csv; history.csv files -> histories.csv."""
    input:
        grid=GRID_CSV,
        evals=[f"{d}/eval.json" for d in RUN_DIRS],
        histories=[f"{d}/history.csv" for d in RUN_DIRS],
    output:
        runs=report(RUNS_CSV, caption="../report/runs.rst", category="Runs"),
        histories=HISTORIES_CSV,
    log:
        f"{LOGS}/collect_runs.log",
    conda:
        "../envs/cmtkd.yaml"
    script:
        "../scripts/collect_runs.py"


rule make_tables:
    """Main comparison, ablation (the paper's Table 1), difference-to-paper, paired comparison-with-CMT-KD and
    CMT-KD's-teachers tables."""
    input:
        runs=RUNS_CSV,
        grid=GRID_CSV,
        histories=HISTORIES_CSV,  # the teachers table
        paper=PAPER_CSV,
        external=EXTERNAL_CSVS,
        schema=SCHEMAS / "runs.schema.yaml",
    output:
        **{
            f"{name}_{ext}": (
                report(f"results/tables/{name}.csv", caption=f"../report/{name}.rst", category="Tables")
                if ext == "csv"
                else f"results/tables/{name}.{ext}"
            )
            for name in TABLE_NAMES
            for ext in ("csv", "md", "tex")
        },
    log:
        f"{LOGS}/make_tables.log",
    conda:
        "../envs/cmtkd.yaml"
    script:
        "../scripts/make_tables.py"


rule tables:
    """Rebuild runs.csv, tables and plots from the runs that have finished; never trains."""
    input:
        grid=GRID_CSV,
        paper=PAPER_CSV,
        external=EXTERNAL_CSVS,
        levels=lambda wildcards: [LEVELS_CSV] if SENSITIVITY else [],  # sensitivity.smk
    params:
        runs=RUNS_CSV,
        histories=HISTORIES_CSV,
        # a sensitivity study (experiments with `vary`) also rebuilds its table and plots
        sensitivity=lambda wildcards, input: (
            f' && python "$CMTKD_SCRIPTS/sensitivity.py" --runs {RUNS_CSV} --histories {HISTORIES_CSV}'
            f" --levels {input.levels[0]} --tables results/tables --plots results/plots"
            if SENSITIVITY
            else ""
        ),
    log:
        f"{LOGS}/tables.log",
    conda:
        "../envs/cmtkd.yaml"
    shell:
        '(python "$CMTKD_SCRIPTS/collect_runs.py" --grid {input.grid:q} --finished-only --out {params.runs:q}'
        " --histories {params.histories:q}"
        ' && python "$CMTKD_SCRIPTS/make_tables.py" --runs {params.runs:q} --grid {input.grid:q}'
        " --paper {input.paper:q} --external {input.external:q} --histories {params.histories:q}"
        " --out-dir results/tables"
        ' && python "$CMTKD_SCRIPTS/plots.py" --runs {params.runs:q} --histories {params.histories:q}'
        " --out-dir results/plots{params.sensitivity}) > {log:q} 2>&1; status=$?; cat {log:q}; exit $status"
