# Standalone evaluation: rebuild the selected student from model.pt and evaluate it on the test
# split. This eval.json, not the number logged during training, is what goes into the tables.


rule evaluate:
    """Evaluate one trained run on the test split -> eval.json."""
    input:
        model=f"{RUN}/model.pt",
        metrics=f"{RUN}/metrics.json",
    output:
        f"{RUN}/eval.json",
    log:
        f"{RUN}/evaluate.log",
    params:
        run_dir=lambda wildcards, input: os.path.dirname(input.model),
        launcher=LAUNCHER,
    threads: 1
    resources:
        **GPU_RESOURCES,
    conda:
        "../envs/cmtkd.yaml"
    shell:
        "{params.launcher} python -m cmtkd.cli evaluate {params.run_dir:q} --threads {threads} > {log:q} 2>&1"
