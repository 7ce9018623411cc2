# One `cmtkd train` run per grid cell, into results/runs/method~../dataset~../.../seed~../, then the
# standalone evaluation of its saved student on the test split (`cmtkd evaluate` -> eval.json, the
# number the tables use), in the same job: train_run.py --evaluate.
#
# Only metrics.json, model.pt, history.csv and eval.json are declared outputs: Snakemake deletes declared
# outputs before (re)running a job and leaves checkpoint.pt alone, so a run interrupted mid-way
# (Ctrl-C, a killed cluster job; rerun with --rerun-incomplete) resumes from its last finished
# epoch. train_run.py discards a checkpoint only when the run's configuration has changed.
#
# With `gpu: true` a job claims `gpus_per_job` GPUs (resources gpu=N, gpu_slot.py --count N); with
# N > 1 its args end in `--nproc_per_node N` and train_run.py starts the training through torchrun,
# one process per GPU. (With N = 1 the command and params are those of before, so finished runs stay
# up to date.)
#
# Before the first job (onstart in common.smk) each job's `cmtkd train` arguments are resolved by
# cmtkd itself (workflow/scripts/checks.py), so a bad method option stops the workflow, not a job.


rule train:
    """Train one run (any method) of the grid and evaluate its saved student on the test split."""
    input:
        teachers=lambda wildcards: [f"{d}/model.pt" for d in teacher_dirs(wildcards)],
        init=lambda wildcards: [f"{run_dir(r)}/model.pt" for r in grid.init_runs(config, wildcards)],  # recipe.init: fp
    output:
        metrics=f"{RUN}/metrics.json",
        model=f"{RUN}/model.pt",
        history=f"{RUN}/history.csv",
        evaluation=f"{RUN}/eval.json",
    log:
        f"{RUN}/train.log",
    params:
        run_dir=lambda wildcards, output: os.path.dirname(output.metrics),
        # `cmtkd train` flags (grid.train_argv; train_run.py takes `--nproc_per_node N` off for torchrun)
        args=lambda wildcards: grid.shell_join(
            train_argv(wildcards) + (["--nproc_per_node", str(GPUS_PER_JOB)] if GPUS_PER_JOB > 1 else [])
        ),
        launcher=TRAIN_LAUNCHER,
    threads: 1
    resources:
        **TRAIN_GPU_RESOURCES,
    conda:
        "../envs/cmtkd.yaml"
    shell:
        '{params.launcher} python "$CMTKD_SCRIPTS/train_run.py" train --out {params.run_dir:q} {params.args}'
        " --threads {threads} --evaluate > {log:q} 2>&1"
