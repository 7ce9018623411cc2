"""The suite config of a workflow invocation: layers, ``--config`` overrides, validation messages.

    suite_config.py [--configfile FILE ...] [--replace-workflow-config] [--config KEY=VALUE ...]

prints the layered, validated suite (defaults filled in) as YAML, or the problems, one per line.

Layers, lowest first (what ``snakemake`` does with a ``configfile:`` directive):

1. ``config/config.yaml``, the default suite (skipped with ``--replace-workflow-config``);
2. every ``--configfile``, in order, merged key by key (nested mappings merge, other values
   replace). One exception: a file that defines ``experiments`` brings its own grid, which replaces
   the experiments of the layers below it (``--configfile config/cifar100.yaml`` runs the CIFAR-100
   grid only, not the default suite's experiments as well);
3. ``--config KEY=VALUE`` overrides, merged key by key. Each VALUE is read as YAML (as
   ``cmtkd train --set`` reads its values): ``gpu=true``, ``recipe='{epochs: 1}'``,
   ``experiments='{comparison: {seeds: [0]}}'``. A key the schema declares a string keeps its text.

Pure Python (PyYAML, jsonschema, Snakemake's validation for the defaults); never imports torch.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import jsonschema
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grid  # noqa: E402
from cmtkd.errors import UserError  # noqa: E402  (cmtkd.errors and cmtkd.files import no torch)
from cmtkd.files import YamlRefused, load_yaml_text, read_yaml_mapping  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SUITE = ROOT / "config" / "config.yaml"
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
GRID_KEY = "experiments"  # replaced, not merged, by a config file that defines it
# Schema keywords whose value maps names (of properties, definitions) to schemas, not a schema itself.
NAME_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}


class SuiteConfigError(ValueError):
    """A suite config the workflow cannot run; the message lists every problem with its key and fix."""


# ------------------------------------------------------------------------------------- layers
merge = grid.merge  # config layers merge as arch_recipe merges into recipe (grid.recipe_for)


def read_yaml(path: str | Path) -> dict:
    """A suite config file, read by the library's strict reader (cmtkd.files.read_yaml_mapping): a
    regular UTF-8 file of at most 1 MiB, no repeated key, no anchor/alias, each a one-line error."""
    try:
        return read_yaml_mapping(path, "config file", missing=f"config file {path} does not exist",
                                 not_mapping=f"config file {path} must hold a mapping of config keys")
    except UserError as exc:
        raise SuiteConfigError(str(exc)) from None


def schema_type(schema: dict, path: Sequence[str]) -> str | None:
    """The JSON-schema ``type`` of the config key at ``path`` (None when the schema leaves it open)."""
    node = schema
    for part in path:
        properties = node.get("properties", {})
        if part in properties:
            node = properties[part]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            return None
    return node.get("type")


def parse_overrides(args: Iterable[str], schema: dict) -> dict:
    """``--config KEY=VALUE`` arguments -> a mapping; VALUE read as YAML unless the key is a string."""
    out: dict = {}
    for arg in args:
        key, sep, text = str(arg).partition("=")
        if not sep or not key:
            raise SuiteConfigError(f"--config {arg!r}: expected KEY=VALUE, e.g. --config gpu=true")
        if text == "":
            value = None
        elif schema_type(schema, [key]) == "string":
            value = text
        else:
            try:
                value = load_yaml_text(text)
            except YamlRefused as exc:
                raise SuiteConfigError(f"--config {key}: {exc}") from None
            except yaml.YAMLError:
                value = text
        out = merge(out, {key: value})
    return out


def layer_suite(configfiles: Sequence[str | Path] = (), overrides: dict | None = None, *,
                default: str | Path | None = DEFAULT_SUITE) -> dict:
    """The suite config: ``default`` (None: none), then each config file, then ``overrides``."""
    suite = read_yaml(default) if default is not None else {}
    for path in configfiles:
        layer = read_yaml(path)
        if GRID_KEY in layer:
            suite.pop(GRID_KEY, None)
        suite = merge(suite, layer, layer_order=True)
    return merge(suite, overrides or {})


# --------------------------------------------------------------------------------- validation
def key_name(path: Iterable) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def schema_hint(schema: dict, schema_path: Iterable) -> str | None:
    """The innermost ``description`` of a schema along ``schema_path`` (a failing error's path)."""
    hint, node, in_names = None, schema, False
    for step in schema_path:
        if not isinstance(node, (dict, list)):
            break
        node = node[step]
        # `properties` etc. map names to schemas: that mapping is not a schema (its key
        # "description" may be a property called description), the next step picks a schema from it.
        names = step in NAME_MAPS and not in_names
        if not names and isinstance(node, dict) and isinstance(node.get("description"), str):
            hint = " ".join(node["description"].split())
        in_names = names
    return hint


def schema_problems(instance: dict, schema: dict) -> list[str]:
    """Every schema violation as "config key 'a.b[1]': what is wrong (expected: description)"."""
    problems = []
    validator = jsonschema.Draft202012Validator(schema)
    for error in sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.absolute_path]):
        where = key_name(error.absolute_path)
        if error.validator == "additionalProperties":
            allowed = ", ".join(error.schema.get("properties", {})) or "none"
            problems.append(f"config key '{where}': {error.message}; allowed keys here: {allowed}")
            continue
        hint = schema_hint(schema, error.absolute_schema_path)
        problems.append(f"config key '{where}': {error.message}" + (f" (expected: {hint})" if hint else ""))
    return problems


def check_suite(config: dict, name: str, schema_path: str | Path = SCHEMA) -> dict:
    """Validate ``config`` in place (schema defaults filled in) and return it; SuiteConfigError lists
    every problem, each naming its key, and where the keys are documented."""
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    schema = yaml.safe_load(Path(schema_path).read_text())
    try:
        validate(config, str(schema_path))  # also fills in the schema's defaults
    except WorkflowError:
        problems = schema_problems(config, schema) or [f"does not match {schema_path}"]
        raise SuiteConfigError(f"invalid suite config {name}:\n  " + "\n  ".join(problems)
                               + "\nFix the key(s) above; every key is described in config/README.md.") from None
    try:
        grid.check_config(config)
    except grid.GridError as exc:
        raise SuiteConfigError(f"invalid suite config {name}: {exc}") from None
    return config


def load_suite(configfiles: Sequence[str | Path] = (), config_args: Iterable[str] = (), *,
               replace: bool = False, schema_path: str | Path = SCHEMA) -> tuple[dict, str]:
    """The validated suite of a workflow invocation and a name for messages."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    overrides = parse_overrides(config_args, schema)
    default = None if replace else DEFAULT_SUITE
    name = ", ".join(str(p) for p in ([] if replace else [DEFAULT_SUITE]) + list(configfiles)) or "(none)"
    if overrides:
        name += " + --config " + " ".join(str(a) for a in config_args)
    config = layer_suite(configfiles, overrides, default=default)
    return check_suite(config, name, schema_path), name


def invocation(workflow) -> tuple[list[str], list[str], bool]:
    """A Snakemake workflow's ``--configfile`` files, raw ``--config`` arguments and
    ``--replace-workflow-config`` flag (from the parsed overrides where the raw ones are not kept)."""
    settings = workflow.config_settings
    args = getattr(settings, "config_args", None)
    if args is None:
        args = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in settings.config.items()]
    return [str(p) for p in settings.configfiles], [str(a) for a in args], bool(
        getattr(settings, "replace_workflow_config", False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n")[0])
    parser.add_argument("--configfile", nargs="+", default=[], help="config files layered over the default suite")
    parser.add_argument("--config", nargs="+", default=[], metavar="KEY=VALUE", help="overrides on top")
    parser.add_argument("--replace-workflow-config", action="store_true",
                        help="do not start from config/config.yaml")
    args = parser.parse_args(argv)
    try:
        config, _ = load_suite(args.configfile, args.config, replace=args.replace_workflow_config)
    except SuiteConfigError as exc:
        print(f"cmtkd workflow: error: {exc}", file=sys.stderr)
        return 1
    print(yaml.safe_dump(config, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
