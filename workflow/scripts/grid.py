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

Sensitivity studies: an experiment's ``vary`` maps method options to levels (``{gamma: [0, 1, 10]}``),
one factor at a time around the suite's ``method_args`` (which must state each varied option: that
value is the factor's default level). A level other than the default is a *variant* run: the
experiment's run with that one option overridden, in ``results/runs/variant~<option>=<level>/``
(:func:`variant_dir`) and with role ``variant``; the default level of every factor is the experiment's
own run, trained once. ``vary: {teacher_sets: [[8], [8, 6], ...]}`` varies the teacher set instead
(ordinary run directories). Frozen teachers, stages and fp starts carry no variant: they are shared.
Only a suite with ``vary`` has the ``variant`` column; the other suites' runs, directories and
commands do not change. :func:`sensitivity_levels` lists every (factor, level) with its runs.
"""
from __future__ import annotations

import copy
import json
import re
import shlex
import sys
from pathlib import Path

import pandas as pd

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
VARIANT = "variant"  # grid column of a suite with `vary`: the run's option override as "<option>=<level>"; "" = none
VARIANT_DIR = "variant~"  # a variant run's directory: results/runs/variant~<label>/method~.../seed~<s>
TEACHER_SETS = "teacher_sets"  # the `vary` key that varies the experiment's teacher set (not a method option)
LEVEL_TEXT = re.compile(r"^[A-Za-z0-9._+,-]+$")  # a level as written into a run directory's name
SENSITIVITY_COLUMNS = ("experiment", "factor", "level", "value", "default", *COLUMNS[:-1], VARIANT, "n_seeds")


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
        if needs_teachers:
            check_teacher_sets(exp, where, f"{where}.teacher_sets", teacher_sets)
        if "vary" in exp:
            check_vary(config, name, exp, needs_teachers)


def check_teacher_sets(exp: dict, experiment: str, where: str, teacher_sets: list) -> None:
    """Every teacher of every set above the student's bits (``where``: the key of the sets)."""
    for i, bits in enumerate(exp["bits"]):
        w_bits, a_bits = parse_bits(bits)
        for j, tset in enumerate(teacher_sets):
            low = [b for b in tset if b <= max(w_bits, a_bits)]
            if low:
                raise GridError(
                    f"config key '{where}[{j}]' = {tset}: teacher bit-width(s) {low} are not "
                    f"higher than the student {bits} ('{experiment}.bits[{i}]'); every teacher must "
                    f"have more bits than the student's weights and activations: use higher teacher bit-widths, or "
                    f"move {bits} into its own experiment with a teacher set above it")


def check_vary(config: dict, name: str, exp: dict, needs_teachers: list[str]) -> None:
    """An experiment's ``vary``: options the workflow does not wire, levels that can name a directory,
    and a default level (the suite's method_args value) among the levels of each factor."""
    where = f"experiments.{name}.vary"
    for option, levels in exp["vary"].items():
        if option in WIRED_ARGS:
            raise GridError(f"config key '{where}.{option}' is set by the workflow from the teacher set; vary "
                            f"'{where}.{TEACHER_SETS}' instead (a list of teacher sets)")
        for j, level in enumerate(levels):
            if not LEVEL_TEXT.match(level_text(level)):
                raise GridError(f"config key '{where}.{option}[{j}]' = {level!r}: a level must be a number, a word "
                                f"or a list of them (letters, digits, . _ + -), as it names the run's directory")
        if option == TEACHER_SETS:
            if not needs_teachers or len(exp.get("teacher_sets") or []) != 1:
                raise GridError(f"config key '{where}.{TEACHER_SETS}': give the experiment exactly one teacher set "
                                f"(its default level) under 'experiments.{name}.teacher_sets', and methods that "
                                f"use teachers")
            check_teacher_sets(exp, f"experiments.{name}", f"{where}.{TEACHER_SETS}", levels)
            if exp["teacher_sets"][0] not in levels:
                raise GridError(f"config key '{where}.{TEACHER_SETS}' = {levels}: add the default level "
                                f"{exp['teacher_sets'][0]} (experiments.{name}.teacher_sets), the point every level "
                                f"is compared with")
            continue
        for method in exp["methods"]:
            for arch in exp["archs"]:
                options = method_options(config, method, arch)
                if option not in options:
                    raise GridError(f"config key '{where}.{option}': state the default level in "
                                    f"'method_args.{method}.{option}' (the value every other factor is held at; "
                                    f"cmtkd's default: `cmtkd train --method {method} --print-config`)")
                if options[option] not in levels:
                    raise GridError(f"config key '{where}.{option}' = {levels}: add the default level "
                                    f"{options[option]!r} (method_args.{method}.{option}), the point every level "
                                    f"is compared with")


def has_variants(config: dict) -> bool:
    """Whether the suite is a sensitivity study (an experiment with ``vary``): its grid has a variant column."""
    return any("vary" in exp for exp in config["experiments"].values())


def level_text(value) -> str:
    """A level as tables and directory names show it: ``0.5``, ``1000``, ``stage-ends``; a list
    joined by commas (``conv2,conv4``)."""
    if isinstance(value, (list, tuple)):
        return ",".join(level_text(v) for v in value)
    if isinstance(value, str):
        return value
    return json.dumps(value)  # numbers as YAML writes them; true/false


def variant_label(option: str, value) -> str:
    """``gamma=10``: the variant of a run with ``method_args.<option>`` set to ``value``."""
    return f"{option}={level_text(value)}"


def variant_dir(label: str) -> str:
    """The part of a run directory naming its variant: ``variant~gamma=10/``, empty for no variant."""
    return f"{VARIANT_DIR}{label}/" if label else ""


def variant_overrides(config: dict) -> dict[str, dict]:
    """Every variant label of the suite -> the method options it overrides."""
    out = {}
    for exp in config["experiments"].values():
        for option, levels in exp.get("vary", {}).items():
            if option != TEACHER_SETS:
                out.update({variant_label(option, v): {option: v} for v in levels})
    return out


def run_key(key) -> dict:
    """The grid key of a run from a grid row or a job's wildcards, with its variant label when the
    suite has variants (the ``variant`` wildcard holds the directory part, ``variant~<label>/``)."""
    out = {c: key[c] for c in COLUMNS}
    variant = key.get(VARIANT)
    if variant is not None:
        # NaN: an empty variant read back from a CSV
        out[VARIANT] = "" if pd.isna(variant) else str(variant).removeprefix(VARIANT_DIR).removesuffix("/")
    return out


def method_options(config: dict, method: str, arch: str) -> dict:
    """``method_args.<method>`` with ``arch_method_args.<arch>.<method>`` on top."""
    return {**config.get("method_args", {}).get(method, {}),
            **config.get("arch_method_args", {}).get(arch, {}).get(method, {})}


def experiment_cells(config: dict, exp: dict, teacher_sets: list | None = None) -> list[dict]:
    """The cells (runs without their seed) of one experiment: method x arch x W/A x teacher set."""
    dataset = config["dataset"]["name"]
    cells = []
    for method in exp["methods"]:
        spec = METHODS[method]
        bit_settings = ([(FULL_PRECISION, FULL_PRECISION)] if spec.full_precision
                        else [parse_bits(b) for b in exp["bits"]])
        sets = exp.get("teacher_sets", []) if teacher_sets is None else teacher_sets
        tsets = [NO_TEACHERS] if spec.teachers == NO_TEACHERS else list(dict.fromkeys(
            teacher_label([max(t)] if spec.use == "one" else t) for t in sets))
        cells += [{"method": method, "dataset": dataset, "arch": arch, "w_bits": w, "a_bits": a, "teacher_bits": t}
                  for arch in exp["archs"] for w, a in bit_settings for t in tsets]
    return cells


def sensitivity_levels(config: dict) -> pd.DataFrame:
    """One row per (experiment, factor, level, cell) of the suite's ``vary`` keys: the level's text and
    value (JSON), whether it is the default, the run cell holding it (its variant label, "" for the
    default level and for teacher-set levels) and the experiment's number of seeds. Empty without ``vary``."""
    rows = []
    for name, exp in config["experiments"].items():
        for option, levels in exp.get("vary", {}).items():
            for value in levels:
                if option == TEACHER_SETS:
                    cells = [c for c in experiment_cells(config, exp, [value]) if c["teacher_bits"] != NO_TEACHERS]
                    rows += [{"experiment": name, "factor": option, "level": teacher_label(value),
                              "value": json.dumps(value), "default": value == exp["teacher_sets"][0], **c,
                              VARIANT: "", "n_seeds": len(exp["seeds"])} for c in cells]
                    continue
                for cell in experiment_cells(config, exp):
                    default = method_options(config, cell["method"], cell["arch"]).get(option) == value
                    rows.append({"experiment": name, "factor": option, "level": level_text(value),
                                 "value": json.dumps(value), "default": default, **cell,
                                 VARIANT: "" if default else variant_label(option, value),
                                 "n_seeds": len(exp["seeds"])})
    return pd.DataFrame(rows, columns=list(SENSITIVITY_COLUMNS))


def expand(config: dict) -> pd.DataFrame:
    """All runs of a (schema-valid) suite config, one row each, with a ``role`` column:
    ``grid`` (asked for by an experiment), ``variant`` (a level of a ``vary`` factor other than the
    default) or ``teacher`` (a pre-trained teacher only). A suite with ``vary`` also has the
    ``variant`` column (:data:`VARIANT`)."""
    check_config(config)
    rows: dict[tuple, str] = {}  # (*COLUMNS, variant label) -> role
    for exp in config["experiments"].values():
        for cell in experiment_cells(config, exp):
            for seed in exp["seeds"]:
                rows[(*cell.values(), seed, "")] = "grid"
    for level in sensitivity_levels(config).to_dict("records"):
        for seed in config["experiments"][level["experiment"]]["seeds"]:
            rows.setdefault((*(level[c] for c in COLUMNS[:-1]), seed, level[VARIANT]), "variant")
    # The frozen teachers the pretrained-teacher methods load: shared, once per (arch, bits, teacher seed).
    for (method, dataset_, arch, _w, _a, tset, seed, _v) in list(rows):
        if METHODS[method].teachers == "pretrained":
            for b in teacher_list(tset):
                rows.setdefault((teacher_method(b), dataset_, arch, b, b, NO_TEACHERS, teacher_seed(seed, b), ""),
                                "teacher")
    # The teachers-only stages the stage methods load: shared, once per (arch, teacher set, seed).
    for key in list(rows):
        for stage in stage_runs(*key[:3], key[5], key[6]):
            rows.setdefault((*(stage[c] for c in COLUMNS), ""), "teacher")
    # recipe.init = fp: the fp run every other run starts from, once per (arch, student seed).
    for key in list(rows):
        for start in init_runs(config, dict(zip(COLUMNS, key))):
            rows.setdefault((*(start[c] for c in COLUMNS), ""), "teacher")
    frame = pd.DataFrame([(*key, role) for key, role in rows.items()], columns=[*COLUMNS, VARIANT, "role"])
    frame = frame.astype({"w_bits": int, "a_bits": int, "seed": int, "teacher_bits": str})
    frame = frame.sort_values([*COLUMNS, VARIANT], kind="stable").reset_index(drop=True)
    if not has_variants(config):
        frame = frame.drop(columns=VARIANT)  # the other suites' grid.csv stays as it was
    recipes = {arch: recipe_for(config, arch) for arch in frame["arch"].unique()}
    frame["epochs"] = [int(recipes[arch]["epochs"]) for arch in frame["arch"]]
    # as train_sets passes it to the run: the recipe's data.val_fraction over dataset.val_fraction
    held_out = float(config["dataset"].get("val_fraction", DEFAULT_VAL_FRACTION))
    frame["val_fraction"] = [float(recipes[arch].get("data.val_fraction", held_out)) for arch in frame["arch"]]
    return frame


def run_dirs(table: pd.DataFrame, patterns: list[str]) -> list[str]:
    """Run directories of the grid's rows from their Paramspace instance patterns (``method~../seed~..``):
    ``results/runs/<pattern>``, a variant run under ``results/runs/variant~<label>/``."""
    variants = table[VARIANT] if VARIANT in table else [""] * len(table)
    return [f"results/runs/{variant_dir(v)}{p}" for v, p in zip(variants, patterns)]


def merge(base: dict, layer: dict, layer_order: bool = False) -> dict:
    """``layer`` over ``base``: nested mappings merge key by key, anything else replaces
    (snakemake.utils.update_config, without modifying either argument). Keys keep the order of
    ``base`` (new ones last), or with ``layer_order`` the order of ``layer`` (base-only ones last).
    The order matters: it is the order of each run's ``--set`` flags, i.e. of the train jobs'
    params, so a suite file gives the same jobs layered as alone (finished runs stay up to date)."""
    out = {key: copy.deepcopy(value) for key, value in base.items() if not (layer_order and key in layer)}
    merged = {}
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = merge(base[key], value, layer_order)
        else:
            merged[key] = copy.deepcopy(value)
    if layer_order:
        return {**merged, **out}
    out.update(merged)
    return out


def recipe_for(config: dict, arch: str) -> dict:
    """The dotted RunConfig keys shared by every run of ``arch``: recipe, then arch_recipe merged on top
    (a key it adds is listed with its section's keys: the command line, hence Snakemake's params, is
    the one a suite with that key in its recipe writes)."""
    values = flatten(merge(config.get("recipe", {}), config.get("arch_recipe", {}).get(arch, {})))
    values.pop(INIT_KEY, None)  # the grid's key (init_runs), not cmtkd train's
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
               init_dirs: list[str] = (), variant: str = "") -> list[str]:
    """The ``--set key=value`` overrides of one run: data settings, recipe, per-arch recipe,
    method options (a variant's override on top), the teacher wiring and the run it starts from
    (``init_dirs``: at most one)."""
    spec = METHODS[method]
    values = {f"data.{k}": v for k, v in config["dataset"].items() if k != "name"}
    values.update(recipe_for(config, arch))
    options = method_options(config, method, arch)
    if variant:
        overrides = variant_overrides(config)
        if variant not in overrides:
            raise GridError(f"run variant '{variant}' is not a level of any 'experiments.*.vary' key of this suite")
        options.update(overrides[variant])
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
    run directory it starts from: ``init_dirs``, from :func:`init_runs`; a ``variant`` key: the option
    it overrides). The workflow's train jobs run exactly these (plus ``--out`` and ``--threads``), and
    its pre-start check resolves them."""
    args = ["--method", key["method"], "--arch", key["arch"], "--dataset", key["dataset"],
            "--w-bits", key["w_bits"], "--a-bits", key["a_bits"], "--seed", key["seed"],
            "--device", "cuda" if config.get("gpu") else "cpu", "--set", "train.progress=none"]
    for value in train_sets(config, key["method"], key["arch"], key["teacher_bits"], teacher_dirs, init_dirs,
                            key.get(VARIANT) or ""):
        args += ["--set", value]
    return [str(a) for a in args]


def shell_join(args: list[str]) -> str:
    return " ".join(shlex.quote(str(a)) for a in args)


def load_config(path: str | Path) -> dict:
    """A suite config file, read as strictly as every config (cmtkd.files.read_yaml_mapping)."""
    from cmtkd.files import read_yaml_mapping

    return read_yaml_mapping(path, "config file", missing=f"config file {path} does not exist",
                             not_mapping=f"config file {path} must hold a mapping of config keys")
