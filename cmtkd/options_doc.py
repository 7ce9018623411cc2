"""What each method is, how it gets its teachers, and what its options mean, as plain text: the one
source of ``cmtkd list METHOD`` and of ``docs/methods.md``.

An option's meaning is the end-of-line comment on its field in the method's ``Options`` dataclass
(read from the source with :mod:`tokenize`/:mod:`ast`; inherited fields from the class that declares
them). How the teachers are given comes from the method's catalog line (:mod:`cmtkd.catalog`) plus
the method's ``teachers_help``. Regenerate the Markdown with
``python -m cmtkd.options_doc --write docs/methods.md``.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import re
import sys
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

REGENERATE = "python -m cmtkd.options_doc --write docs/methods.md"

_ROLE = re.compile(r":[\w:]+:`~?([^`]+)`")           # :func:`cmtkd.losses.kd_kl` -> cmtkd.losses.kd_kl
_LITERAL = re.compile(r"``([^`]+)``")               # ``cmtkd`` -> cmtkd
_NAME_PREFIX = re.compile(r"^``[^`]+``:\s*")         # "``kd``: Hinton KD" -> "Hinton KD"


def plain(text: str) -> str:
    """``text`` without reStructuredText markup: roles and double backticks give the bare name."""
    return _LITERAL.sub(r"\1", _ROLE.sub(r"\1", text))


def description(method_cls: type) -> str:
    """The first line of the method's class docstring (else its module's), as plain text, without a
    leading ``name``: label."""
    doc = method_cls.__doc__ or sys.modules[method_cls.__module__].__doc__ or ""
    lines = doc.strip().splitlines()
    return plain(_NAME_PREFIX.sub("", lines[0].strip())) if lines else ""


@dataclass(frozen=True)
class OptionDoc:
    name: str
    type: str          # readable: float, int, bool, str, list[int], one of a|b|c, str or null
    default: str       # as given on the command line (YAML): 4.0, true, "", [8, 6, 4]
    choices: tuple     # the allowed values of a Literal, else ()
    meaning: str       # the field's end-of-line comment ("" when it has none)
    pinned: bool = False  # the method fixes this option at ``default``


def _trailing_comments(cls: type) -> dict[str, str]:
    """Field name -> end-of-line comment, for the fields ``cls`` itself declares."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (an interactive or generated class)
        return {}
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and not tok.line.lstrip().startswith("#"):
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    body = ast.parse(source).body[0].body
    found = {}
    for node in body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            lines = range(node.lineno, node.end_lineno + 1)
            text = [comments[n] for n in lines if n in comments]
            found[node.target.id] = text[-1] if text else ""
    return found


def _type_text(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + "|".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return " or ".join(map(_type_text, rest)) + (" or null" if len(rest) < len(args) else "")
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(map(_type_text, args))}]"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _value_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_value_text, value)) + "]"
    return repr(value)


def option_docs(method_cls: type) -> list[OptionDoc]:
    """One :class:`OptionDoc` per field of ``method_cls.Options``, in declaration order."""
    options = method_cls.Options
    hints = typing.get_type_hints(options)
    meanings: dict[str, str] = {}
    for cls in reversed(options.__mro__):  # a subclass's comment wins over its base's
        if dataclasses.is_dataclass(cls):
            meanings.update({k: v for k, v in _trailing_comments(cls).items() if v or k not in meanings})
    docs = []
    for f in dataclasses.fields(options):
        pinned = f.name in method_cls.pinned
        if pinned:
            default = method_cls.pinned[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        tp = hints[f.name]
        choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else ()
        docs.append(OptionDoc(f.name, _type_text(tp), _value_text(default), choices,
                              plain(meanings.get(f.name, "")), pinned))
    return docs


def teachers_text(name: str) -> str:
    """How method ``name`` gets its teachers, in one line: the option and value syntax (from the
    catalog), then what they must be (the method's ``teachers_help``)."""
    from cmtkd.catalog import method_entry
    from cmtkd.registry import get_method

    entry, cls = method_entry(name), get_method(name)
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    if entry.teachers == "none":
        text = "none"
    elif entry.teachers == "joint":
        which = "one teacher, at the first bit-width" if entry.use == "one" else "one teacher per bit-width"
        text = f"trained jointly in the run from method_args.teacher_bits ({which}; W = A = b bits)"
    else:
        option = entry.path_option
        many = option in fields and "list" in _type_text(typing.get_type_hints(cls.Options)[option])
        text = f"method_args.{option}=" + ("[RUN_DIR1,RUN_DIR2,...]" if many else "RUN_DIR")
        if entry.teachers == "stage":
            text += f": a finished `cmtkd train --method {entry.stage}` run (the same teacher set)"
    help_text = plain(getattr(cls, "teachers_help", "") or "")
    return f"{text}: {help_text}" if help_text else text


def method_text(name: str) -> str:
    """What ``cmtkd list METHOD`` prints."""
    from cmtkd.registry import get_method

    cls = get_method(name)  # UserError (with "did you mean") for an unknown name
    lines = [f"{name}: {description(cls)}", f"teachers: {teachers_text(name)}"]
    docs = option_docs(cls)
    if not docs:
        lines.append("no options")
        return "\n".join(lines)
    lines.append("options (--set method_args.NAME=VALUE):")
    rows = [(d.name, d.type, f"default {d.default}", ("fixed by this method; " if d.pinned else "") + d.meaning)
            for d in docs]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown() -> str:
    """``docs/methods.md``: a section per built-in method (the catalog's order)."""
    from cmtkd.catalog import BUILTIN
    from cmtkd.registry import get_method

    out = ["# Methods and their options", "",
           f"Generated by `{REGENERATE}` from the methods' `Options` dataclasses (the same text "
           "`cmtkd list METHOD` prints); do not edit it by hand. Give an option with "
           "`--set method_args.NAME=VALUE` or under `method_args:` in a config file.", ""]
    for name in BUILTIN:
        cls = get_method(name)
        out += [f"## {name}", "", description(cls), "", f"**Teachers:** {teachers_text(name)}", ""]
        docs = option_docs(cls)
        if not docs:
            out += ["No options.", ""]
            continue
        out += ["| option | type | default | meaning |", "|---|---|---|---|"]
        for d in docs:
            meaning = ("fixed by this method; " if d.pinned else "") + d.meaning
            out.append(f"| `{d.name}` | {_cell(d.type)} | `{_cell(d.default)}` | {_cell(meaning)} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cmtkd.options_doc", description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="PATH", help="write the Markdown there (default: print it)")
    args = parser.parse_args(argv)
    text = render_markdown()
    if args.write:
        Path(args.write).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
