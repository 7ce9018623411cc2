"""workflow/scripts/compare_suites.py: two suites on one grid, paired by seed, Holm across cells."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "workflow" / "scripts" / "compare_suites.py"
sys.path.insert(0, str(SCRIPT.parent))
import compare_suites  # noqa: E402


def runs(rows):
    base = dict(dataset="digits", arch="alexnet", a_bits=2, teacher_bits="none", role="grid")
    return pd.DataFrame([{**base, **dict(zip(("method", "w_bits", "seed", "top1"), r))} for r in rows])


def test_paired_differences_holm_and_verdicts():
    a = runs([("qat", 2, 0, 90.0), ("qat", 2, 1, 91.0), ("qat", 2, 2, 92.0),
              ("cmtkd", 2, 0, 95.0), ("cmtkd", 2, 1, 95.0), ("cmtkd", 2, 2, 95.0)])
    # qat: B − A = +2.0, +2.1, +1.9 (clearly higher); cmtkd: identical (a tie); a teacher row is ignored
    b = runs([("qat", 2, 0, 92.0), ("qat", 2, 1, 93.1), ("qat", 2, 2, 93.9),
              ("cmtkd", 2, 0, 95.0), ("cmtkd", 2, 1, 95.0), ("cmtkd", 2, 2, 95.0)])
    b = pd.concat([b, runs([("qat", 8, 8000, 50.0)]).assign(role="teacher")])
    table = compare_suites.compare(a, b, ("A", "B")).set_index("method")
    assert table.loc["qat", "B − A"] == "2.00 ± 0.25"  # t(0.975, 2) * 0.1 / sqrt(3) = 0.248
    assert table.loc["qat", "pairs"] == 3
    assert table.loc["qat", "verdict"] == "B higher"
    # Holm over the two cells: the tie has p = 1, so qat's p is doubled
    p_raw = float(table.loc["qat", "p"])
    assert math.isclose(float(table.loc["qat", "p (Holm)"]), 2 * p_raw, rel_tol=1e-2)
    assert table.loc["cmtkd", "p"] == "1" and table.loc["cmtkd", "verdict"] == "no significant difference"
    assert table.loc["cmtkd", "A"] == "95.00 ± 0.00"


def test_missing_suite_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "nowhere"), str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "compare_suites: error:" in done.stderr and "runs.csv" in done.stderr


@pytest.mark.parametrize("columns", [["method", "top1"]])
def test_not_a_runs_csv_is_one_line(tmp_path, columns):
    for name in ("a.csv", "b.csv"):
        pd.DataFrame([[1] * len(columns)], columns=columns).to_csv(tmp_path / name, index=False)
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "a.csv"), str(tmp_path / "b.csv")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "lacks the columns" in done.stderr
