"""Every document the project cites lives inside the repository.

Tables, ``results/paper/reported.csv``, the ledger and docstrings cite sources by file name (and
``docs/method.md §n`` by section). A citation of a file the repository does not contain (such as a
research note kept outside it) is a dead end for a reader, so this test fails on any reference to a
Markdown document that is not tracked here, and on any ``method.md §n`` whose section does not exist.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MD_REFERENCE = re.compile(r"(?<![\w/.:-])([\w./-]*[A-Za-z0-9_-]+\.md)\b")
SECTION_REFERENCE = re.compile(r"method\.md\s*§\s*(\d+)")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".csv", ".tex", ".smk", ".rst", ".cff", ".toml", ".txt", ""}


def tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        files = [REPO / line for line in out.splitlines()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: scan the tree
        files = [p for p in REPO.rglob("*") if ".git" not in p.parts and ".venv" not in p.parts]
    return [p for p in files if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.name == "Snakefile")]


def resolves(reference: str, source: Path, tracked_names: set[str]) -> bool:
    if reference.startswith(("http", "www.")):
        return True
    candidates = [REPO / reference, source.parent / reference]
    if any(c.is_file() for c in candidates):
        return True
    # A bare file name ("ASSUMPTIONS.md") may name a tracked file anywhere in the repository.
    return "/" not in reference and reference in tracked_names


def test_every_cited_markdown_file_exists():
    files = tracked_text_files()
    names = {p.name for p in files}
    dead = []
    for path in files:
        text = path.read_text(errors="replace")
        for match in MD_REFERENCE.finditer(text):
            reference = match.group(1)
            if not resolves(reference, path, names):
                line = text.count("\n", 0, match.start()) + 1
                dead.append(f"{path.relative_to(REPO)}:{line}: {reference}")
    assert not dead, "references to documents the repository does not contain:\n" + "\n".join(dead)


def test_every_cited_method_section_exists():
    method = (REPO / "docs" / "method.md").read_text()
    sections = set(re.findall(r"^## §(\d+)\b", method, flags=re.MULTILINE))
    assert sections, "docs/method.md has no numbered sections"
    dead = []
    for path in tracked_text_files():
        for number in SECTION_REFERENCE.findall(path.read_text(errors="replace")):
            if number not in sections:
                dead.append(f"{path.relative_to(REPO)}: method.md §{number}")
    assert not dead, "citations of sections docs/method.md does not have:\n" + "\n".join(dead)


OUTSIDE_NOTE = "RESEARCH_NOTE" + ".md"  # spelled in two parts: this file must not cite a missing file itself


@pytest.mark.parametrize("text, expected", [
    (f"see {OUTSIDE_NOTE} §6", [OUTSIDE_NOTE]),
    ("(docs/method.md §2) and ASSUMPTIONS.md", ["docs/method.md", "ASSUMPTIONS.md"]),
    ("https://example.org/x.md and http://a/b.md", []),
])
def test_reference_pattern(text, expected):
    assert MD_REFERENCE.findall(text) == expected
