"""`make all` ends by comparing its runs with the committed default suite (issue 26.6): the very command
line of the Makefile's `all` recipe, run in a working directory whose results are the committed ones
(identical), the committed ones plus seed-sized noise (within the intervals) or shifted (not)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "results" / "default-suite"


def compare_line() -> str:
    """The `all` recipe's comparison, with the Makefile's variables filled in."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nall:", 1)[1].split("\n\n", 1)[0]
    line = next(line.strip() for line in recipe.splitlines() if "reference_check.py compare" in line)
    return (line.replace("$(BIN)/python", sys.executable).replace("$(COMMITTED_SUITE)", str(COMMITTED))
            .replace("workflow/scripts/", f"{ROOT}/workflow/scripts/").replace("$$", "$"))


@pytest.mark.parametrize("change, verdict", [
    (lambda top1, seed: top1, r"9 agree \(9 identical seed for seed\), 0 do not"),
    (lambda top1, seed: top1 + (0.05 if seed % 2 else -0.05), r"9 agree \(0 identical seed for seed\), 0 do not"),
    (lambda top1, seed: top1 - 6.0, r"0 agree .*9 do not"),
])
def test_make_all_ends_with_a_one_line_verdict_against_the_committed_suite(tmp_path, change, verdict):
    runs = pd.read_csv(COMMITTED / "runs.csv")
    runs["top1"] = [change(t, s) for t, s in zip(runs["top1"], runs["seed"])]
    (tmp_path / "results").mkdir()
    runs.to_csv(tmp_path / "results" / "runs.csv", index=False)
    done = subprocess.run(["bash", "-c", compare_line()], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr  # a verdict, not a failed `make all`
    last = done.stdout.strip().splitlines()[-1]
    assert re.search(verdict, last), last
    assert (tmp_path / "results" / "against-committed" / "reference_check.csv").is_file()
