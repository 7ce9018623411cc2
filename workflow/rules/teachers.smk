# Frozen teachers. kd, kd-at and mtkd distil from teachers trained beforehand: a `qat`
# run at W=A=b for each teacher bit-width b (`fp` for b=32), with the student's dataset,
# architecture and recipe, and a seed of its own: 1000 * b + the student's seed (grid.teacher_seed), so
# the teachers of one student differ from each other and from it. They are ordinary runs of the grid
# (role "teacher"), so each (dataset, arch, bits, teacher seed) is trained exactly once and shared by
# every student of that seed that loads it (`train` takes them as input: teacher_dirs in common.smk).
# dml, kdcl and the cmtkd* methods train their teachers jointly with the student: no pre-training.
# cmtkd-frozen is the exception: its teachers and theta come from a teachers-only stage, one
# `cmtkd-teachers` run (the n teachers trained together with fusion, no student; W32A32 in its path)
# per (dataset, arch, teacher set, seed), added and shared the same way (grid.stage_runs).
TEACHER_DIRS = sorted({d for row in RUN_TABLE.to_dict("records") for d in teacher_dirs(row)})


rule teachers:
    """Pre-train (and evaluate) only the frozen teachers the grid needs."""
    input:
        [f"{d}/eval.json" for d in TEACHER_DIRS],
