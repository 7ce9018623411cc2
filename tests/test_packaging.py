"""Packaging: the licence file, dependency ranges that never downgrade torch, a complete CITATION.cff,
``python -m cmtkd`` and ``cmtkd --version``."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from conftest import REPO_ROOT, cli_env

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None


@pytest.fixture(scope="module")
def pyproject() -> dict:
    if tomllib is None:
        pytest.skip("tomllib needs Python >= 3.11")
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def requirement(pyproject: dict, name: str) -> Requirement:
    for spec in pyproject["project"]["dependencies"]:
        req = Requirement(spec)
        if req.name == name:
            return req
    raise AssertionError(f"{name} is not a dependency")


def test_license_file_is_the_mit_licence_pyproject_and_citation_declare(pyproject):
    text = (REPO_ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert pyproject["project"]["license"] == {"text": "MIT"}
    assert yaml.safe_load((REPO_ROOT / "CITATION.cff").read_text())["license"] == "MIT"


@pytest.mark.parametrize("name,admitted,refused", [
    # 2.11: the GPU machines; 2.14.1: here; 3.0: a future release pip must not downgrade.
    ("torch", ["2.3.0", "2.11.0", "2.14.1", "3.0.0"], ["2.2.2"]),
    ("torchvision", ["0.18.0", "0.26.0", "0.29.1", "1.0.0"], ["0.17.2"]),
])
def test_torch_ranges_have_a_lower_bound_and_no_cap(pyproject, name, admitted, refused):
    spec = requirement(pyproject, name).specifier
    for version in admitted:
        assert spec.contains(version), (name, version, str(spec))
    for version in refused:
        assert not spec.contains(version), (name, version, str(spec))
    assert not any(s.operator in ("<", "<=", "==", "~=") for s in spec), f"{name} is capped: {spec}"


def test_installed_torch_is_within_the_stated_range(pyproject):
    installed = Version(torch.__version__.split("+")[0])
    assert requirement(pyproject, "torch").specifier.contains(installed)


def test_no_dependency_has_an_upper_cap(pyproject):
    deps = list(pyproject["project"]["dependencies"])
    for extra in pyproject["project"]["optional-dependencies"].values():
        deps += extra
    capped = [d for d in deps if any(s.operator in ("<", "<=", "~=") for s in Requirement(d).specifier)]
    assert not capped, capped


def test_optional_extras_exist_for_tracking_and_export(pyproject):
    extras = pyproject["project"]["optional-dependencies"]
    assert {"tensorboard", "wandb", "onnx"} <= set(extras)
    test = {Requirement(r).name for r in extras["test"]}
    assert {"tensorboard", "onnx", "onnxruntime", "onnxscript"} <= test


def test_citation_cff_is_complete_and_consistent(pyproject):
    cff = yaml.safe_load((REPO_ROOT / "CITATION.cff").read_text())
    for key in ("cff-version", "message", "title", "authors", "version", "date-released", "repository-code",
                "license"):
        assert cff.get(key), f"CITATION.cff lacks {key}"
    assert str(cff["version"]) == pyproject["project"]["version"]
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(cff["date-released"]))
    assert cff["repository-code"] == pyproject["project"]["urls"]["Repository"]


@pytest.mark.skipif(importlib.util.find_spec("cffconvert") is None,
                    reason="cffconvert is not installed (it pins jsonschema<4, so it is not in the test extra): "
                           "pip install cffconvert")
def test_citation_cff_validates_against_the_cff_schema_and_gives_a_bibtex_with_url_and_year():
    import json

    import jsonschema

    import cffconvert

    schema_file = Path(cffconvert.__file__).parent / "schemas" / "1.2.0" / "schema.json"
    cff = yaml.safe_load((REPO_ROOT / "CITATION.cff").read_text())
    cff["date-released"] = str(cff["date-released"])  # YAML reads a date; the schema wants the string
    jsonschema.validate(cff, json.loads(schema_file.read_text()))
    from cffconvert import Citation

    bibtex = Citation(cffstr=(REPO_ROOT / "CITATION.cff").read_text()).as_bibtex()
    assert "url = {https://" in bibtex and re.search(r"year = \{\d{4}\}", bibtex), bibtex


def test_python_m_cmtkd_and_version():
    import cmtkd

    for argv in (["-m", "cmtkd", "--version"], ["-m", "cmtkd.cli", "--version"]):
        proc = subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, env=cli_env(), capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"cmtkd {cmtkd.__version__}"
    proc = subprocess.run([sys.executable, "-m", "cmtkd", "list"], cwd=REPO_ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "methods:" in proc.stdout, proc.stderr


def test_package_version_is_pyprojects(pyproject):
    import cmtkd

    assert cmtkd.__version__ == pyproject["project"]["version"]


def test_conda_environment_installs_the_project_with_its_test_extra():
    """environment.yml names no dependency list of its own (it drifted: tensorboard and onnx were missing):
    its pip step installs the checkout with the same extra `make install` uses."""
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip = [step["pip"] for step in env["dependencies"] if isinstance(step, dict) and "pip" in step]
    assert pip == [['-e ".[test]"']]
    assert "pip install -e '.[test]'" in (REPO_ROOT / "README.md").read_text()


# The files a checkout has at its root; a stray file (a test's leftover, a hostile pickle) fails here.
ROOT_FILES = {".gitignore", ".snakemake-workflow-catalog.yml", "ASSUMPTIONS.md", "CITATION.cff", "LICENSE",
              "Makefile", "README.md", "Snakefile", "environment.yml", "hubconf.py", "pyproject.toml"}


def test_no_stray_tracked_file_at_the_repository_root():
    import subprocess

    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    at_root = {name for name in tracked if "/" not in name}
    assert at_root <= ROOT_FILES, f"tracked files at the root outside the allow-list: {sorted(at_root - ROOT_FILES)}"
