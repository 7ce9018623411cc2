"""Typed dataclasses from plain mappings (YAML files, ``--set key=value``): the one place where a
config value is coerced to its field's annotation and checked, with one error format naming the key.

Annotations understood: ``bool``, ``int``, ``float`` (ints and ``1e-3`` strings accepted), ``str``,
``Literal[...]`` (one of the listed values), ``list[T]``, ``dict``, ``X | None``, ``Any`` and nested
dataclasses. Used for the run config (:mod:`cmtkd.config`) and every method's ``Options``.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal

from cmtkd.errors import UserError, did_you_mean

# PyYAML (YAML 1.1) reads exponent floats without a dot (``1e-3``) as strings; accept them for floats.
_EXPONENT_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(map(repr, typing.get_args(tp)))
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        # `type(a) is type(value)`: True is not the literal 1, nor 1 the literal 1.0
        if any(value == a and type(value) is type(a) for a in allowed):
            return value
        raise UserError(f"config key '{key}' must be one of {', '.join(map(str, allowed))}; got {value!r}")
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return coerce(value, option, key)
            except UserError as exc:
                errors.append(exc)
        raise UserError(f"config key '{key}' expects {' or '.join(_type_name(a) for a in typing.get_args(tp))}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise UserError(f"config key '{key}' expects null, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            example = f"[{value}]" if isinstance(value, str) and "," in value else "[a, b, c]"
            raise UserError(f"config key '{key}' expects a list, got {value!r}; write it in brackets, e.g. "
                            f"--set {key}={example} (in YAML: {key.rpartition('.')[2]}: {example})")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}' expects a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=key)
    raise UserError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")


def from_dict(cls, data: Any, prefix: str = "", base=None):
    """Build dataclass ``cls`` from a (partial) mapping, starting from ``base`` or the defaults."""
    if not isinstance(data, dict):
        raise UserError(f"config section '{prefix or 'top level'}' must be a mapping, got {data!r}")
    obj = base if base is not None else cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            if not names:  # e.g. the Options of a method that has none
                raise UserError(f"unknown config key '{full}': '{prefix}' takes no keys here"
                                + (" (this method has no options; remove it)" if prefix == "method_args" else ""))
            raise UserError(f"unknown config key '{full}'{did_you_mean(key, names)}; valid keys here: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            value = from_dict(tp, value, prefix=full, base=getattr(obj, key))
        else:
            value = coerce(value, tp, full)
        setattr(obj, key, value)
    return obj


