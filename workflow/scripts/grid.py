"""The benchmark grid as data: a suite config (config/*.yaml) -> one row per training run.

Used by the Snakefile (the rows become a Snakemake ``Paramspace``) and by ``estimate_cost.py``.
Pure Python (pandas + PyYAML): importing it must not import torch, so that parsing the workflow
stays fast.

A row is one ``cmtkd train`` run: method x dataset x arch x W/A x teacher set x seed. Teachers that
the distillation methods need are ordinary ``qat`` runs (``fp`` for a 32-bit teacher) at W=A=b,
added to the grid with role ``teacher`` unless the grid already has them. A teacher's seed is
derived from the student run's seed and the teacher's bit-width (:func:`teacher_seed`), so the
teachers of a multi-teacher method differ in initialisation and batch order from each other and from
the student; every (dataset, arch, bits, teacher seed) is trained once and shared by every method of
that student seed that uses it (kd's 8-bit teacher is mtkd's 8-bit teacher). A method whose teachers
come from a teachers-only stage (catalog ``teachers: stage``, e.g. ``cmtkd-frozen``) loads one run of that
stage's method (``cmtkd-teachers``) per (dataset, arch, teacher set, seed), added and shared the same way.

With ``recipe.init: fp`` (an option; the default ``scratch`` is the paper's setting) every run except
the ``fp`` runs starts from one full-precision ``fp`` run per (dataset, arch, student seed) through
``cmtkd train --set model.init_from=<its run directory>`` (:func:`init_runs`); that run is added to
the grid like a teacher and is the grid's own ``fp`` run where the grid has one.
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pandas as pd
import yaml

try:
    from cmtkd.catalog import MethodEntry, catalog
except ImportError:  # a Python without cmtkd installed: this checkout's catalog (torch-free)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from cmtkd.catalog import MethodEntry, catalog

FULL_PRECISION = 32
NO_TEACHERS = "none"
TEACHER_SEED_STRIDE = 1000  # teacher seed = 1000 * bits + student seed; student seeds stay below it
DEFAULT_VAL_FRACTION = 0.1  # cmtkd's data.val_fraction default (held-out part of the training set)
COLUMNS = ("method", "dataset", "arch", "w_bits", "a_bits", "teacher_bits", "seed")  # one run
CELL = [c for c in COLUMNS if c != "seed"]  # one cell of a table: a run's setting across seeds
DATASET_ROOT_FILES = {  # what must exist under data.root (the loaders' layouts)
    "cifar100": ("cifar-100-python/train", "cifar-100-python/test"),
    "imagenet": ("train", "val"),
}


# Every method the workflow can run, and how its teachers are wired: cmtkd's method catalog (built-in
# methods plus those of the CMTKD_METHODS files), read without importing torch. MethodEntry fields:
# teachers (none | pretrained | joint), use (all | one: the highest bit-width of a teacher set),
# path_option (the option given the pretrained teachers' run directories), bits_option (the method
# takes teacher_bits), full_precision (trained at W32A32 only).
METHODS: dict[str, MethodEntry] = catalog()
# method_args keys the workflow sets from the teacher set; a config must not set them itself.
WIRED_ARGS = tuple(sorted({e.path_option for e in METHODS.values() if e.path_option} | {"teacher_bits"}))
# RunConfig keys the grid sets per run; a recipe must not set them.
GRID_KEYS = ("method", "arch", "w_bits", "a_bits", "seed", "data.name", "method_args",
             "train.threads", "train.device")
INIT_KEY = "init"  # recipe.init: how runs start (INIT_CHOICES); read by the grid, not a RunConfig key
INIT_CHOICES = ("scratch", "fp")  # scratch: the paper's default; fp: from the suite's fp run
INIT_METHOD = "fp"  # the method of the run that recipe.init=fp starts the others from


class GridError(ValueError):
    """A config the workflow cannot run; the message names the key and the fix."""


# ------------------------------------------------------------------------------------ helpers
def parse_bits(text: str) -> tuple[int, int]:
    """``'W2A2'`` -> ``(2, 2)``."""
    w, a = text.upper().lstrip("W").split("A")
    return int(w), int(a)


def bits_label(w_bits: int, a_bits: int) -> str:
    return f"W{w_bits}A{a_bits}"


def teacher_label(bits) -> str:
    return "-".join(str(b) for b in bits) if bits else NO_TEACHERS


def teacher_list(label: str) -> list[int]:
    return [] if label in ("", NO_TEACHERS) or pd.isna(label) else [int(b) for b in str(label).split("-")]


def teacher_method(bits: int) -> str:
    return "fp" if bits == FULL_PRECISION else "qat"


def teacher_seed(seed: int, bits: int) -> int:
    """The seed of the frozen ``bits``-bit teacher of student runs with seed ``seed``:
    ``1000 * bits + seed``. Distinct per (seed, bits) and never a student seed (seeds are < 1000,
    the schema's maximum), readable in run directories (``seed~8001``: the 8-bit teacher of seed 1)."""
    if not 0 <= int(seed) < TEACHER_SEED_STRIDE:
        raise GridError(f"seed {seed} is outside 0..{TEACHER_SEED_STRIDE - 1}; teacher seeds are "
                        f"{TEACHER_SEED_STRIDE} * bits + seed, so student seeds must stay below {TEACHER_SEED_STRIDE}")
    return TEACHER_SEED_STRIDE * int(bits) + int(seed)


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested mapping -> dotted keys (``{'optim': {'lr': 0.1}}`` -> ``{'optim.lr': 0.1}``)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def set_value(value) -> str:
    """A value for ``cmtkd train --set key=VALUE`` (parsed there as YAML; JSON is YAML)."""
    if isinstance(value, str):
        return value
    return json.dumps(value)


# ---------------------------------------------------------------------------------- the grid
def check_config(config: dict) -> None:
    """Semantic checks the JSON schema cannot express. Raises GridError naming key and fix."""
    known = ", ".join(METHODS)
    for key in flatten(config.get("recipe", {})):
        if key in GRID_KEYS or key.startswith("method_args"):
            raise GridError(f"config key 'recipe.{key}' is set per run by the grid; remove it "
                            f"(methods, archs, bits, seeds go under 'experiments', dataset under 'dataset', "
                            f"method options under 'method_args.<method>')")
    for arch, recipe in config.get("arch_recipe", {}).items():
        for key in flatten(recipe):
            if key in GRID_KEYS or key.startswith("method_args"):
                raise GridError(f"config key 'arch_recipe.{arch}.{key}' is set per run by the grid; remove it")
            if key == INIT_KEY:
                raise GridError(f"config key 'arch_recipe.{arch}.init': how runs start is set for the whole "
                                f"suite; move it to 'recipe.init'")
    if init_mode(config) not in INIT_CHOICES:
        raise GridError(f"config key 'recipe.init' is {init_mode(config)!r}; use one of {', '.join(INIT_CHOICES)}")
    if init_mode(config) == "fp" and "model.init_from" in flatten(config.get("recipe", {})):
        raise GridError("config key 'recipe.model.init_from' is set per run by the grid when 'recipe.init' is fp; "
                        "remove one of them")
    sections = [("method_args", config.get("method_args", {}))] + [
        (f"arch_method_args.{arch}", options) for arch, options in config.get("arch_method_args", {}).items()]
    for where, section in sections:
        for method, args in section.items():
            if method not in METHODS:
                raise GridError(f"config key '{where}.{method}': unknown method '{method}'; known methods: {known}")
            for key in args:
                if key in WIRED_ARGS:
                    raise GridError(f"config key '{where}.{method}.{key}' is set by the workflow from the "
                                    f"experiment's teacher_sets; remove it and list the bit-widths under "
                                    f"'experiments.<name>.teacher_sets'")
    for name, exp in config["experiments"].items():
        where = f"experiments.{name}"
        for i, method in enumerate(exp["methods"]):
            if method not in METHODS:
                raise GridError(f"config key '{where}.methods[{i}]': unknown method '{method}'; known methods: "
                                f"{known} (a new method is one line in cmtkd/catalog.py, or in a YAML file "
                                f"named by the environment variable CMTKD_METHODS)")
        needs_teachers = [m for m in exp["methods"] if METHODS[m].teachers != NO_TEACHERS]
        teacher_sets = exp.get("teacher_sets") or []
        if needs_teachers and not teacher_sets:
            raise GridError(f"config key '{where}.teacher_sets' is missing, but {', '.join(needs_teachers)} "
                            f"need teachers; add e.g. 'teacher_sets: [[8, 6, 4]]'")
        for i, bits in enumerate(exp["bits"]):
            w_bits, a_bits = parse_bits(bits)
            if not needs_teachers:
                continue
            for j, tset in enumerate(teacher_sets):
                low = [b for b in tset if b <= max(w_bits, a_bits)]
                if low:
                    raise GridError(
                        f"config key '{where}.teacher_sets[{j}]' = {tset}: teacher bit-width(s) {low} are not "
                        f"higher than the student {bits} ('{where}.bits[{i}]'); every teacher must have more "
                        f"bits than the student's weights and activations: use higher teacher bit-widths, or "
                        f"move {bits} into its own experiment with a teacher set above it")


def expand(config: dict) -> pd.DataFrame:
    """All runs of a (schema-valid) suite config, one row each, with a ``role`` column:
    ``grid`` (asked for by an experiment) or ``teacher`` (a pre-trained teacher only)."""
    check_config(config)
    dataset = config["dataset"]["name"]
    rows: dict[tuple, str] = {}
    for exp in config["experiments"].values():
        for method in exp["methods"]:
            spec = METHODS[method]
            bit_settings = ([(FULL_PRECISION, FULL_PRECISION)] if spec.full_precision
                            else [parse_bits(b) for b in exp["bits"]])
            teacher_sets = [NO_TEACHERS] if spec.teachers == NO_TEACHERS else [
                teacher_label([max(t)] if spec.use == "one" else t) for t in exp.get("teacher_sets", [])]
            for arch in exp["archs"]:
                for w_bits, a_bits in bit_settings:
                    for tset in teacher_sets:
                        for seed in exp["seeds"]:
                            rows[(method, dataset, arch, w_bits, a_bits, tset, seed)] = "grid"
    # The frozen teachers the pretrained-teacher methods load: shared, once per (arch, bits, teacher seed).
    for (method, dataset_, arch, _w, _a, tset, seed) in list(rows):
        if METHODS[method].teachers == "pretrained":
            for b in teacher_list(tset):
                rows.setdefault((teacher_method(b), dataset_, arch, b, b, NO_TEACHERS, teacher_seed(seed, b)),
                                "teacher")
    # The teachers-only stages the stage methods load: shared, once per (arch, teacher set, seed).
    for key in list(rows):
        for stage in stage_runs(*key[:3], key[5], key[6]):
            rows.setdefault(tuple(stage[c] for c in COLUMNS), "teacher")
    # recipe.init = fp: the fp run every other run starts from, once per (arch, student seed).
    for key in list(rows):
        for start in init_runs(config, dict(zip(COLUMNS, key))):
            rows.setdefault(tuple(start[c] for c in COLUMNS), "teacher")
    frame = pd.DataFrame([(*key, role) for key, role in rows.items()], columns=[*COLUMNS, "role"])
    frame = frame.astype({"w_bits": int, "a_bits": int, "seed": int, "teacher_bits": str})
    frame = frame.sort_values(list(COLUMNS), kind="stable").reset_index(drop=True)
    frame["epochs"] = [int(recipe_for(config, arch)["epochs"]) for arch in frame["arch"]]
    frame["val_fraction"] = float(config["dataset"].get("val_fraction", DEFAULT_VAL_FRACTION))
    return frame


def recipe_for(config: dict, arch: str) -> dict:
    """The dotted RunConfig keys shared by every run of ``arch``: recipe, then arch_recipe on top."""
    values = flatten(config.get("recipe", {}))
    values.pop(INIT_KEY, None)  # the grid's key (init_runs), not cmtkd train's
    values.update(flatten(config.get("arch_recipe", {}).get(arch, {})))
    return values


def init_mode(config: dict) -> str:
    """``recipe.init``: ``scratch`` (default, the paper's setting) or ``fp``."""
    return config.get("recipe", {}).get(INIT_KEY, "scratch")


def init_runs(config: dict, key: dict) -> list[dict]:
    """Key of the run whose network the run ``key`` starts from (``model.init_from``): with
    ``recipe.init: fp``, the ``fp`` run of its dataset, arch and student seed, for every run but the
    ``fp`` runs themselves (students, frozen qat teachers, teachers-only stages alike; a teacher's
    student seed is its seed modulo 1000, see :func:`teacher_seed`). Empty with ``scratch``."""
    if init_mode(config) != "fp" or key["method"] == INIT_METHOD:
        return []
    return [{"method": INIT_METHOD, "dataset": key["dataset"], "arch": key["arch"], "w_bits": FULL_PRECISION,
             "a_bits": FULL_PRECISION, "teacher_bits": NO_TEACHERS, "seed": int(key["seed"]) % TEACHER_SEED_STRIDE}]


def teacher_runs(method: str, dataset: str, arch: str, teacher_bits: str, seed) -> list[dict]:
    """Keys of the frozen teacher runs a pretrained-teacher run loads (empty for the others); each
    teacher's seed is :func:`teacher_seed` of the run's seed and the teacher's bit-width."""
    if METHODS[method].teachers != "pretrained":
        return []
    return [{"method": teacher_method(b), "dataset": dataset, "arch": arch, "w_bits": b, "a_bits": b,
             "teacher_bits": NO_TEACHERS, "seed": teacher_seed(seed, b)} for b in teacher_list(teacher_bits)]


def stage_runs(method: str, dataset: str, arch: str, teacher_bits: str, seed) -> list[dict]:
    """Key of the teachers-only run a stage-teacher run loads (its catalog ``stage`` method with the
    same teacher set and seed, at W32A32: it has no student); empty for the other methods."""
    spec = METHODS[method]
    if spec.teachers != "stage":
        return []
    return [{"method": spec.stage, "dataset": dataset, "arch": arch, "w_bits": FULL_PRECISION,
             "a_bits": FULL_PRECISION, "teacher_bits": teacher_bits, "seed": int(seed)}]


def loaded_runs(method: str, dataset: str, arch: str, teacher_bits: str, seed) -> list[dict]:
    """Keys of every run whose files the run loads: frozen teacher runs and teachers-only stages."""
    return teacher_runs(method, dataset, arch, teacher_bits, seed) + stage_runs(method, dataset, arch,
                                                                                teacher_bits, seed)


def train_sets(config: dict, method: str, arch: str, teacher_bits: str, teacher_dirs: list[str],
               init_dirs: list[str] = ()) -> list[str]:
    """The ``--set key=value`` overrides of one run: data settings, recipe, per-arch recipe,
    method options, the teacher wiring and the run it starts from (``init_dirs``: at most one)."""
    spec = METHODS[method]
    values = {f"data.{k}": v for k, v in config["dataset"].items() if k != "name"}
    values.update(recipe_for(config, arch))
    options = {**config.get("method_args", {}).get(method, {}),
               **config.get("arch_method_args", {}).get(arch, {}).get(method, {})}
    values.update({f"method_args.{k}": v for k, v in options.items()})
    if spec.bits_option:
        values["method_args.teacher_bits"] = teacher_list(teacher_bits)
    if spec.path_option:
        one = spec.use == "one" or spec.teachers == "stage"  # one run directory, or one per teacher
        values[f"method_args.{spec.path_option}"] = teacher_dirs[0] if one else list(teacher_dirs)
    if init_dirs:
        (values["model.init_from"],) = init_dirs
    return [f"{k}={set_value(v)}" for k, v in values.items()]


def train_argv(config: dict, key: dict, teacher_dirs: list[str], init_dirs: list[str] = ()) -> list[str]:
    """The ``cmtkd train`` arguments of the run ``key`` (its grid cell, the suite's recipe and data
    settings, the method's options, its teachers' run directories and, with ``recipe.init: fp``, the
    run directory it starts from: ``init_dirs``, from :func:`init_runs`). The workflow's train jobs run
    exactly these (plus ``--out`` and ``--threads``), and its pre-start check resolves them."""
    args = ["--method", key["method"], "--arch", key["arch"], "--dataset", key["dataset"],
            "--w-bits", key["w_bits"], "--a-bits", key["a_bits"], "--seed", key["seed"],
            "--device", "cuda" if config.get("gpu") else "cpu", "--set", "train.progress=none"]
    for value in train_sets(config, key["method"], key["arch"], key["teacher_bits"], teacher_dirs, init_dirs):
        args += ["--set", value]
    return [str(a) for a in args]


def shell_join(args: list[str]) -> str:
    return " ".join(shlex.quote(str(a)) for a in args)


def load_config(path: str | Path) -> dict:
    with open(path) as handle:
        return yaml.safe_load(handle) or {}
