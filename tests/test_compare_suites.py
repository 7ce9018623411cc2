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
from test_workflow_inputs import BAD_CSV, bad_csv, one_line_error  # noqa: E402


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
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("cmtkd: error: ") and "runs.csv" in done.stderr


@pytest.mark.parametrize("columns", [["method", "top1"]])
def test_not_a_runs_csv_is_one_line(tmp_path, columns):
    for name in ("a.csv", "b.csv"):
        pd.DataFrame([[1] * len(columns)], columns=columns).to_csv(tmp_path / name, index=False)
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "a.csv"), str(tmp_path / "b.csv")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "lacks the columns" in done.stderr


def sensitivity_runs(rows):
    """A sensitivity suite's rows (variant, role, seed, top1): cmtkd W2A2 with teachers 8-6-4."""
    base = dict(method="cmtkd", dataset="digits", arch="alexnet", w_bits=2, a_bits=2, teacher_bits="8-6-4")
    return pd.DataFrame([{**base, **dict(zip(("variant", "role", "seed", "top1"), r))} for r in rows])


def test_variants_are_cells_of_their_own(tmp_path):
    """A variant run is compared with the same variant of the other suite, never merged into the default
    point; the default point is an empty variant in the CSV; teacher rows stay out."""
    a = sensitivity_runs([("", "grid", 0, 90.0), ("", "grid", 1, 91.0), ("", "grid", 2, 92.0),
                          ("gamma=10", "variant", 0, 80.0), ("gamma=10", "variant", 1, 80.0),
                          ("gamma=10", "variant", 2, 80.0)])
    b = sensitivity_runs([("", "grid", 0, 90.0), ("", "grid", 1, 91.0), ("", "grid", 2, 92.0),
                          ("gamma=10", "variant", 0, 82.0), ("gamma=10", "variant", 1, 82.1),
                          ("gamma=10", "variant", 2, 81.9), ("", "teacher", 8000, 10.0)])
    for frame, name in ((a, "a.csv"), (b, "b.csv")):
        frame.to_csv(tmp_path / name, index=False)  # "" is written empty and read back as NaN
    assert compare_suites.read_runs(str(tmp_path / "a.csv"))["variant"].isna().sum() == 3
    table = compare_suites.compare(compare_suites.read_runs(str(tmp_path / "a.csv")),
                                   compare_suites.read_runs(str(tmp_path / "b.csv")), ("A", "B"))
    assert list(table["variant"]) == ["–", "gamma=10"]
    assert list(table.columns[:7]) == [*compare_suites.CELL, "variant"]
    default, gamma = table.iloc[0], table.iloc[1]
    assert (default["A"], default["n A"], default["n B"], default["B − A"]) == ("91.00 ± 2.48", 3, 3, "0.00 ± 0.00")
    assert (gamma["A"], gamma["n A"], gamma["n B"], gamma["B − A"]) == ("80.00 ± 0.00", 3, 3, "2.00 ± 0.25")
    assert gamma["verdict"] == "B higher" and default["verdict"] == "no significant difference"
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "a.csv"), str(tmp_path / "b.csv")],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "gamma=10" in done.stdout, done.stderr


def test_a_suite_without_variants_meets_the_default_point():
    """Suite A has no variant column (all its runs are the default point); suite B's variant is a cell
    A lacks, shown as such rather than dropped."""
    a = sensitivity_runs([("", "grid", s, 90.0 + s) for s in range(3)]).drop(columns="variant")
    b = sensitivity_runs([(float("nan"), "grid", s, 91.0 + s) for s in range(3)]
                         + [("beta=0", "variant", s, 70.0) for s in range(3)])
    table = compare_suites.compare(a, b, ("A", "B")).set_index("variant")
    assert table.loc["–", "B − A"] == "1.00 ± 0.00" and table.loc["–", "pairs"] == 3
    assert (table.loc["beta=0", "n A"], table.loc["beta=0", "n B"]) == (0, 3)
    assert table.loc["beta=0", "verdict"] == "only in B" and table.loc["beta=0", "A"] == "–"


def test_two_rows_for_one_run_are_an_error(tmp_path):
    """Without the variant in the cell, a variant run and the default run of a seed would be one run:
    two rows for one (cell, variant, seed) are refused, naming the file."""
    same = sensitivity_runs([("", "grid", 0, 90.0), (float("nan"), "variant", 0, 80.0)])
    same.to_csv(tmp_path / "a.csv", index=False)
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "a.csv"), str(tmp_path / "a.csv")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "a.csv has 2 rows for one run" in done.stderr and "seed=0" in done.stderr


def test_the_sensitivity_suite_keeps_every_level():
    """The committed sensitivity runs: 16 cells (the default point, 11 option levels, 3 other teacher
    sets), 3 seeds each, compared with themselves."""
    runs = compare_suites.read_runs(str(ROOT / "results" / "sensitivity" / "runs.csv"))
    table = compare_suites.compare(runs, runs, ("A", "B"))
    assert len(table) == 16 and (table["n A"] == 3).all() and (table["pairs"] == 3).all()
    assert (table["variant"] == "–").sum() == 4 and "gamma=1000" in set(table["variant"])


@pytest.mark.parametrize("kind", list(BAD_CSV))
def test_a_bad_runs_csv_is_one_line_naming_it(tmp_path, capsys, kind):
    """Empty, garbage, unparsable, not a runs.csv, or missing, as suite A or B: one line that names the file."""
    good, bad = tmp_path / "good.csv", bad_csv(tmp_path, kind)
    runs([("qat", 2, 0, 90.0)]).to_csv(good, index=False)
    for argv in ([bad, good], [good, bad]):
        status = compare_suites.main([*map(str, argv), "--out", str(tmp_path / "out" / "table.csv")])
        out, err = capsys.readouterr()
        one_line_error(status, err, bad, BAD_CSV[kind][1])
        assert out == "" and not (tmp_path / "out").exists()


def test_a_top1_that_is_not_a_number_is_one_line(tmp_path, capsys):
    a = tmp_path / "a.csv"
    runs([("qat", 2, 0, 90.0), ("qat", 2, 1, "abc")]).to_csv(a, index=False)
    status = compare_suites.main([str(a), str(a)])
    one_line_error(status, capsys.readouterr().err, a, "column top1, data row 2 (line 3): 'abc' is not a number")


def test_an_unwritable_out_is_one_line_and_prints_no_table(tmp_path, capsys):
    a, blocked = tmp_path / "a.csv", tmp_path / "blocked"
    runs([("qat", 2, 0, 90.0)]).to_csv(a, index=False)
    blocked.write_text("a file where the folder should be")
    status = compare_suites.main([str(a), str(a), "--out", str(blocked / "table.csv")])
    out, err = capsys.readouterr()
    one_line_error(status, err, blocked, "cannot create")
    assert out == "" and blocked.read_text() == "a file where the folder should be"
