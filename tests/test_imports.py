"""The package's import graph: no cycle, no import that points back up a layer, no top-level
``baselines`` module.

The graph is read with ``ast`` from the source (nothing is imported). Rule: an edge A -> B for every
``import``/``from ... import`` in A that names a module of the package, at module level or inside a
function (a function-level import still runs, just later), except under ``if TYPE_CHECKING:``
(never runs). Importing ``a.b.c`` also runs the ``__init__`` of ``a.b``, so that is an edge too,
unless ``a.b`` is a package the importing module itself belongs to (it is already being imported).

Run as a script (``python tests/test_imports.py [ROOT]``) to print the cycles and upward imports of
a checkout.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Source folder -> the package it installs as (pyproject.toml [tool.setuptools.package-dir]).
PACKAGE_DIRS = {"cmtkd": "cmtkd", "cmtkd.baselines": "baselines"}

# Lowest first. A module may import its own layer and the layers below it.
# A name stands for the module and everything under it, except "cmtkd", which is its __init__ only.
LAYERS = [
    ["cmtkd.errors", "cmtkd.catalog", "cmtkd.typed", "cmtkd.files"],
    ["cmtkd.quant", "cmtkd.losses", "cmtkd.data"],
    ["cmtkd.models"],
    ["cmtkd.checkpoint"],  # model.pt / checkpoint.pt: read by teachers and the engine, written by the engine
    ["cmtkd.teachers", "cmtkd.initialization"],
    ["cmtkd.methods", "cmtkd.baselines"],
    ["cmtkd.registry", "cmtkd.options_doc"],  # options_doc: the method catalog as text (cmtkd list, docs/methods.md)
    ["cmtkd.config"],
    ["cmtkd.engine"],
    ["cmtkd.cli", "cmtkd.onnx_export"],
    # The public face: cmtkd.load_student / load_run (cmtkd/__init__ imports cmtkd.api lazily), python -m cmtkd.
    ["cmtkd", "cmtkd.api", "cmtkd.__main__"],
]

# Upward imports still to be moved (none today: a new one fails the test).
KNOWN_UPWARD: set[tuple[str, str]] = set()


def module_files(root: Path, package_dirs: dict[str, str] = PACKAGE_DIRS) -> dict[str, Path]:
    """Module name -> source file, for every .py file under the package folders."""
    modules = {}
    for package, folder in package_dirs.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_names(tree: ast.Module, module: str, is_package: bool) -> list[str]:
    """Every dotted name the module imports (``from a import b`` gives ``a.b`` and ``a``)."""
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.append(base)
            names.extend(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def import_graph(root: Path, package_dirs: dict[str, str] = PACKAGE_DIRS) -> dict[str, set[str]]:
    files = module_files(root, package_dirs)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        own_packages = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        targets = set()
        for name in imported_names(ast.parse(path.read_text()), module, path.name == "__init__.py"):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # the module and every package on its way
                prefix = ".".join(parts[:i])
                if prefix in files and prefix != module and prefix not in own_packages:
                    targets.add(prefix)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(found)


def layer_of(module: str) -> int:
    best, level = -1, None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            inside = module == prefix or (prefix != "cmtkd" and module.startswith(prefix + "."))
            if inside and len(prefix) > best:
                best, level = len(prefix), i
    if level is None:
        raise KeyError(f"module {module} is in no layer of tests/test_imports.py LAYERS; add it")
    return level


def upward_imports(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(a, b) for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a)}


# ------------------------------------------------------------------------------------------ tests
def test_the_graph_sees_the_package():
    graph = import_graph(REPO_ROOT)
    assert "cmtkd.baselines.kd" in graph and "cmtkd.methods.cmtkd" in graph
    assert "cmtkd.methods.base" in graph["cmtkd.baselines.kd"]  # the analysis finds real edges
    assert "cmtkd.engine" in graph["cmtkd.cli"]  # function-level imports count


def test_cycle_detection_finds_a_planted_cycle(tmp_path):
    pkg = tmp_path / "cmtkd"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cmtkd.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from cmtkd import a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cmtkd import a\n")
    graph = import_graph(tmp_path, {"cmtkd": "cmtkd"})
    assert cycles(graph) == [["cmtkd.a", "cmtkd.b"]]
    assert graph["cmtkd.c"] == set()  # TYPE_CHECKING imports never run


def test_no_import_cycle():
    assert cycles(import_graph(REPO_ROOT)) == []


def test_no_import_points_up_a_layer():
    upward = upward_imports(import_graph(REPO_ROOT))
    assert upward - KNOWN_UPWARD == set(), "imports that point back up a layer (see LAYERS)"


def test_every_module_has_a_layer():
    with pytest.raises(KeyError, match="cmtkd.newthing"):
        layer_of("cmtkd.newthing")
    for module in import_graph(REPO_ROOT):
        layer_of(module)


def test_catalog_and_grid_do_not_import_torch():
    code = ("import sys; sys.path.insert(0, 'workflow/scripts'); import cmtkd.catalog, grid; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3]")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_no_top_level_baselines_module(tmp_path):
    """The baselines/ folder installs as cmtkd.baselines: with the installed package alone (no
    PYTHONPATH, outside the checkout) ``import baselines`` finds nothing and cmtkd.baselines works."""
    code = ("import importlib.util; spec = importlib.util.find_spec('baselines'); "
            "print('none' if spec is None else spec.origin); import cmtkd.baselines.kd")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "none"


def test_every_package_is_installed():
    """pyproject.toml lists the packages explicitly (for the baselines mapping): a new one must be added."""
    tomllib = pytest.importorskip("tomllib")
    setup = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {m for m, path in module_files(REPO_ROOT).items() if path.name == "__init__.py"}
    assert set(setup["packages"]) == packages
    assert setup["package-dir"] == {k: v for k, v in PACKAGE_DIRS.items() if k != v}


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT
    dirs = PACKAGE_DIRS if (root / "baselines").is_dir() and "package-dir" in (root / "pyproject.toml").read_text() \
        else {"cmtkd": "cmtkd", "baselines": "baselines"}
    g = import_graph(root, dirs)
    print(f"{len(g)} modules, {sum(map(len, g.values()))} edges")
    for c in cycles(g):
        print(f"cycle of {len(c)}: {', '.join(c)}")
    LAYERS[4].append("baselines")
    for a, b in sorted(upward_imports(g)):
        print(f"upward: {a} -> {b}")
