"""The pre-start check builds every run's method (meta device, no data, no model file read), so an
option that is checked only once the networks exist (CMT-KD's fusion points, the stage-input reading's
refusals) stops the workflow before the first job, naming the run and the config keys."""
from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow" / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import checks  # noqa: E402
import suite_config  # noqa: E402
from test_workflow import tiny_config  # noqa: E402
from test_workflow_inputs import argv_maker, run_key  # noqa: E402

from cmtkd.cli import train_config  # noqa: E402
from cmtkd.engine.footprint import check_method_builds  # noqa: E402
from cmtkd.errors import UserError  # noqa: E402
from cmtkd.registry import get_method, method_names  # noqa: E402

# What each method needs to build at all (its teachers are files the check must not read: none exist).
NEEDS = {"kd": ["--set", "method_args.teacher=/nonexistent/t"], "kd-at": ["--set", "method_args.teacher=/nonexistent/t"],
         "mtkd": ["--set", "method_args.teachers=[/nonexistent/a,/nonexistent/b]"],
         "cmtkd-teachers": ["--w-bits", "32", "--a-bits", "32"],
         "cmtkd-frozen": ["--set", "method_args.teachers_run=/nonexistent/stage"]}


@pytest.mark.parametrize("arch", ["alexnet", "resnet18"])
@pytest.mark.parametrize("method", method_names())
def test_every_method_builds_for_the_check_without_reading_a_file(method, arch):
    extra = NEEDS.get(method, [])
    if method == "kd-at" and arch == "alexnet":
        extra = [*extra, "--set", "method_args.feature_stages=[conv2,conv3,conv4]"]
    check_method_builds(train_config(["--method", method, "--arch", arch, *extra]))


@pytest.mark.parametrize("method, sets, says", [
    ("cmtkd", ["method_args.fusion_points=[conv9]"], "method_args.fusion_points ['conv9'] names unknown points"),
    ("cmtkd-teachers", ["method_args.fusion_points=[conv9]"], "names unknown points ['conv9']"),
    ("cmtkd-frozen", ["method_args.teachers_run=/nonexistent/stage", "method_args.fusion_points=[conv6]"],
     "names unknown points ['conv6']"),
    ("cmtkd", ["method_args.fusion_input=stage-input", "method_args.fusion_points=[stem]"], "has an identity shortcut"),
])
def test_an_option_checked_on_the_networks_fails_the_check_not_a_job(method, sets, says):
    """Before, `cmtkd train --print-config` (what the check runs) accepted these and every job failed."""
    flags = [arg for expr in sets for arg in ("--set", expr)]
    arch = "resnet18" if "stem" in " ".join(sets) else "alexnet"  # (identity shortcuts: ResNet only)
    cfg = train_config(["--method", method, "--arch", arch, *NEEDS.get(method, []), *flags])
    with pytest.raises(UserError, match=says.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        check_method_builds(cfg)


def test_a_bad_fusion_point_stops_the_workflow_with_the_run_and_keys_named():
    """The issue's case: `method_args: {cmtkd: {fusion_points: [conv9]}}` passed the pre-start check."""
    config = tiny_config(methods=["qat", "cmtkd"], seeds=[0, 1])
    config["method_args"] = {"cmtkd": {"fusion_points": ["conv9"]}}
    config = suite_config.check_suite(config, "bad")
    runs = [run_key("cmtkd", seed=0), run_key("cmtkd", seed=1), run_key("qat", tset="none")]
    problems = checks.cmtkd_problems(config, runs, argv_maker(config))
    assert len(problems) == 1, problems
    assert "fusion_points ['conv9'] names unknown points" in problems[0]
    assert "cmtkd digits alexnet W2A2 teachers 8-4 seed 0 and 1 more run(s)" in problems[0]
    assert "method_args.cmtkd" in problems[0]


def _wrong_value(hint) -> str:
    """A value of the wrong kind for an option of type ``hint``, as `--set` would read it."""
    if typing.get_origin(hint) is typing.Literal:
        return "bogus"
    if hint in (float, int):
        return "notanumber"
    if hint is bool:
        return "notabool"
    if hint is str:
        return "[1, 2]"
    if typing.get_origin(hint) is list:
        return "{a: 1}"
    return "[[1]]"


@pytest.mark.parametrize("method", method_names())
def test_one_bad_value_per_option_of_every_method_is_refused_naming_the_option(method):
    cls = get_method(method)
    hints = typing.get_type_hints(cls.Options)
    for field in dataclasses.fields(cls.Options):
        expr = f"method_args.{field.name}={_wrong_value(hints[field.name])}"
        with pytest.raises(UserError, match=f"method_args.{field.name}"):
            check_method_builds(train_config(["--method", method, *NEEDS.get(method, []), "--set", expr]))
