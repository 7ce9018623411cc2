"""Options that explain themselves (issue 26.3): `cmtkd list` prints plain text, `cmtkd list METHOD`
shows how the method's teachers are given and every option with its type, default and meaning (the
field's end-of-line comment), and docs/methods.md is the same text, kept current."""
from __future__ import annotations

from pathlib import Path

import pytest

from cmtkd.catalog import BUILTIN
from cmtkd.cli import main
from cmtkd.options_doc import REGENERATE, option_docs, plain, render_markdown
from cmtkd.registry import get_method

ROOT = Path(__file__).resolve().parents[1]


def listing(capsys, *argv: str) -> str:
    assert main(["list", *argv]) == 0
    return capsys.readouterr().out


def test_list_prints_plain_text(capsys):
    out = listing(capsys)
    assert "``" not in out and ":func:" not in out and ":mod:" not in out
    assert "  kd             Hinton KD from one frozen pre-trained teacher" in out


def test_plain_strips_roles_and_literals():
    assert plain("``kd``: see :func:`cmtkd.losses.kd_kl` and :class:`~x.Y`") == "kd: see cmtkd.losses.kd_kl and x.Y"


def test_list_kd_names_its_teacher_option_and_every_option_with_its_meaning(capsys):
    out = listing(capsys, "kd")
    assert "teachers: method_args.teacher=RUN_DIR: a finished `cmtkd train --method fp|qat` run" in out
    assert "run directory (or its model.pt) of the pre-trained teacher" in out
    temperature = next(line for line in out.splitlines() if line.strip().startswith("temperature"))
    assert temperature.split()[1:4] == ["float", "default", "4.0"] and "softmax temperature" in temperature
    assert "``" not in out


def test_list_shows_literal_choices_inherited_meanings_and_pins(capsys):
    at = listing(capsys, "kd-at")
    assert "of the pre-trained teacher" in at  # a field of KD.Options, inherited
    assert "one of mean|sum" in at
    avg = next(line for line in listing(capsys, "cmtkd-avg").splitlines() if line.strip().startswith("learn_theta"))
    assert "default false" in avg and "fixed by this method" in avg


@pytest.mark.parametrize("method, says", [
    ("mtkd", "teachers: method_args.teachers=[RUN_DIR1,RUN_DIR2,...]"),
    ("cmtkd", "teachers: trained jointly in the run from method_args.teacher_bits"),
    ("cmtkd-frozen", "teachers: method_args.teachers_run=RUN_DIR: a finished `cmtkd train --method cmtkd-teachers` run"),
    ("qat", "teachers: none"),
])
def test_list_method_says_how_its_teachers_are_given(capsys, method, says):
    assert says in listing(capsys, method)


@pytest.mark.parametrize("method", ["qat", "fp"])
def test_a_method_without_options_says_so(capsys, method):
    assert listing(capsys, method).splitlines()[-1] == "no options"


def test_an_unknown_method_is_a_one_line_error(capsys):
    assert main(["list", "kdd"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "unknown method 'kdd' (did you mean 'kd'?)" in err[0]


@pytest.mark.parametrize("method", list(BUILTIN))
def test_every_option_of_every_builtin_method_has_a_meaning(method):
    missing = [d.name for d in option_docs(get_method(method)) if not d.meaning]
    assert not missing, (f"method {method}: option(s) {', '.join(missing)} have no end-of-line comment on their "
                         f"Options field; add one (it is what `cmtkd list {method}` and docs/methods.md show)")


def test_docs_methods_md_is_current():
    assert (ROOT / "docs" / "methods.md").read_text() == render_markdown(), \
        f"docs/methods.md is out of date: {REGENERATE}"
