"""The method catalog: every training method by name, as plain data.

One line per method says where its class lives (``"module:Class"``, imported only when the method is
used) and how its teachers are wired: none, pre-trained frozen teacher runs (and which option takes
their run directories, one or all of a teacher set), teachers trained jointly inside the run (then
``teacher_bits`` gives their bit-widths), or the teacher set of one run of another method, a
teachers-only stage (``stage``: that method; the option takes its run directory). Both the library
(:mod:`cmtkd.registry`: name -> class) and the workflow (``workflow/scripts/grid.py``: which teacher
runs a run needs) read it, so this module must stay importable without torch.

A method outside this package: put the same line in a YAML file and name the file in the
environment variable ``CMTKD_METHODS`` (several files separated by ``os.pathsep``)::

    my-kd:
      target: my_kd.py:MyKD    # a module name, or a .py file (relative to this YAML file)
      teachers: pretrained     # none | pretrained | joint | stage
      use: one                 # all | one (the highest bit-width of a teacher set)
      path_option: teacher     # pretrained: the option that receives the teacher run directories
      bits_option: false       # true: the method takes teacher_bits
      # stage: cmtkd-teachers  # teachers: stage only: the method of the run path_option receives

``cmtkd train --method my-kd`` and a workflow grid listing ``my-kd`` then find it.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cmtkd.errors import UserError, did_you_mean
from cmtkd.files import read_yaml_mapping

ENV_VAR = "CMTKD_METHODS"
TeacherWiring = Literal["none", "pretrained", "joint", "stage"]
TeacherUse = Literal["all", "one"]


@dataclass(frozen=True)
class MethodEntry:
    """One catalog line. ``target`` is ``"package.module:Class"`` or ``"path/file.py:Class"``."""

    target: str
    teachers: TeacherWiring = "none"
    use: TeacherUse = "all"
    path_option: str | None = None   # pretrained/stage: the Options field given the teacher run directories
    bits_option: bool = False        # the Options field teacher_bits gets the teacher set's bit-widths
    full_precision: bool = False     # W32A32 only (fp; a run without a student): the grid gives it no bit-widths
    stage: str | None = None         # teachers=stage: the method whose run (same teacher set) it loads

    def __post_init__(self):
        problems = []
        if ":" not in self.target:
            problems.append(f"target {self.target!r} is not 'module:Class'")
        for name in ("teachers", "use"):
            allowed = typing.get_args(typing.get_type_hints(MethodEntry)[name])
            if getattr(self, name) not in allowed:
                problems.append(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if (self.teachers in ("pretrained", "stage")) != (self.path_option is not None):
            problems.append("path_option is given exactly when teachers is pretrained or stage")
        if (self.teachers == "stage") != (self.stage is not None):
            problems.append("stage (the teachers-only method) is given exactly when teachers is stage")
        if self.teachers == "none" and self.bits_option:
            problems.append("bits_option needs teachers (pretrained or joint)")
        if problems:
            raise ValueError("; ".join(problems))

    def cost(self, n_teachers: int) -> float:
        """Networks per training step, in single-network QAT steps (forward + backward = 1, a frozen
        teacher's forward ~ 1/3). For cost estimates only."""
        if self.teachers == "none":
            return 1.0
        if self.teachers in ("pretrained", "stage"):
            return 1.0 + n_teachers / 3.0
        return 1.0 + n_teachers


_JOINT = dict(teachers="joint", use="all", bits_option=True)

# The methods of this package, in the order tables list them. A new method: one file, one line here.
BUILTIN: dict[str, MethodEntry] = {
    "fp": MethodEntry("cmtkd.baselines.fp:FullPrecision", full_precision=True),
    "qat": MethodEntry("cmtkd.baselines.qat:QAT"),
    "kd": MethodEntry("cmtkd.baselines.kd:KD", teachers="pretrained", use="one", path_option="teacher"),
    "kd-at": MethodEntry("cmtkd.baselines.kd_at:KDAT", teachers="pretrained", use="one", path_option="teacher"),
    "mtkd": MethodEntry("cmtkd.baselines.mtkd:MTKD", teachers="pretrained", path_option="teachers"),
    "dml": MethodEntry("cmtkd.baselines.dml:DML", **_JOINT),
    "kdcl": MethodEntry("cmtkd.baselines.kdcl:KDCL", **_JOINT),
    "cmtkd": MethodEntry("cmtkd.methods.cmtkd:CMTKD", **_JOINT),
    "cmtkd-noml": MethodEntry("cmtkd.methods.cmtkd:CMTKDNoML", **_JOINT),
    "cmtkd-avg": MethodEntry("cmtkd.methods.cmtkd:CMTKDAverage", **_JOINT),
    "cmtkd-nofeat": MethodEntry("cmtkd.methods.cmtkd:CMTKDNoFeat", **_JOINT),
    "cmtkd-1t": MethodEntry("cmtkd.methods.cmtkd:CMTKDOneTeacher", teachers="joint", use="one", bits_option=True),
    "cmtkd-frozen": MethodEntry("cmtkd.methods.cmtkd:CMTKDFrozen", teachers="stage", path_option="teachers_run",
                                bits_option=True, stage="cmtkd-teachers"),
    "cmtkd-teachers": MethodEntry("cmtkd.methods.cmtkd:CMTKDTeachers", **_JOINT, full_precision=True),
}


def _read_user_file(path: Path) -> dict[str, MethodEntry]:
    data = read_yaml_mapping(
        path, "method catalog",
        missing=f"{ENV_VAR} names {path}, which does not exist; point it at a YAML method catalog",
        not_mapping=f"method catalog {path} must map method names to entries (target, teachers, ...)")
    fields = [f.name for f in dataclasses.fields(MethodEntry)]
    entries = {}
    for name, spec in data.items():
        where = f"method catalog {path}, method '{name}'"
        if not isinstance(spec, dict) or "target" not in spec:
            raise UserError(f"{where}: give at least 'target: module:Class'")
        unknown = sorted(set(spec) - set(fields))
        if unknown:
            raise UserError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; valid keys: {', '.join(fields)}")
        module, _, cls = str(spec["target"]).rpartition(":")
        if module.endswith(".py") and not Path(module).is_absolute():
            spec = {**spec, "target": f"{path.parent / module}:{cls}"}  # relative to the catalog file
        try:
            entries[str(name)] = MethodEntry(**spec)
        except ValueError as exc:
            raise UserError(f"{where}: {exc}") from None
    return entries


def catalog() -> dict[str, MethodEntry]:
    """The built-in methods plus those of the ``CMTKD_METHODS`` files (read on every call, so a
    changed environment is seen)."""
    entries = dict(BUILTIN)
    for item in filter(None, os.environ.get(ENV_VAR, "").split(os.pathsep)):
        for name, entry in _read_user_file(Path(item).expanduser()).items():
            if name in entries:
                raise UserError(f"method catalog {item}: method '{name}' already exists; pick another name")
            entries[name] = entry
    return entries


def method_entry(name: str) -> MethodEntry:
    entries = catalog()
    if name not in entries:
        raise UserError(f"unknown method '{name}'{did_you_mean(name, entries)}; choose one of: {', '.join(sorted(entries))} "
                        f"(methods of your own: see {ENV_VAR} in README.md)")
    return entries[name]
