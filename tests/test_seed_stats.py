"""Statistics of the result tables (issue 12): golden values computed by hand, on small fake runs.

Nothing here trains or reads a run directory: the runs are data frames in the columns of
results/runs.csv. Expected numbers come from the closed forms written next to them (for 2 degrees of
freedom the two-sided t tail is 1 − t/√(t² + 2); t(0.975, 1) = 12.7062, t(0.975, 2) = 4.30265 from a
t table), not from the code under test.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "workflow" / "scripts"
sys.path.insert(0, str(SCRIPTS))

import make_tables  # noqa: E402
import seed_stats  # noqa: E402
from test_workflow import build_fixture_tables, fixture_workdir  # noqa: E402, F401  (fixture)

T975_DF2 = 4.30265  # Student t, 97.5 % quantile, 2 degrees of freedom (table value)
T975_DF1 = 12.7062


def two_sided_p_df2(t: float) -> float:
    """Exact two-sided p of a t statistic with 2 degrees of freedom."""
    return 1 - abs(t) / math.sqrt(t * t + 2)


def fake_runs(cells: dict[tuple[str, str], dict[int, float]], not_converged: set = frozenset()) -> pd.DataFrame:
    """runs.csv rows at cifar100/alexnet/W2A2: {(method, teacher_bits): {seed: top1}}; a run is
    converged unless (method, seed) is in ``not_converged``."""
    rows = [{"method": method, "dataset": "cifar100", "arch": "alexnet", "w_bits": 2, "a_bits": 2,
             "teacher_bits": tset, "seed": seed, "role": "grid", "top1": top1, "top5": top1 + 20,
             "converged": (method, seed) not in not_converged}
            for (method, tset), seeds in cells.items() for seed, top1 in seeds.items()]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- cells: mean ± CI
def test_mean_and_t_interval_of_three_seeds():
    cell = seed_stats.spread([93.0, 93.5, 94.0])  # mean 93.5, s = 0.5
    assert cell.n == 3 and cell.mean == pytest.approx(93.5) and cell.std == pytest.approx(0.5)
    assert cell.ci95 == pytest.approx(T975_DF2 * 0.5 / math.sqrt(3), abs=1e-5)  # 1.24207
    assert make_tables.Fmt("md").ours(cell.mean, cell.ci95, cell.n, 3) == "93.50 ± 1.24 (n=3)"
    assert make_tables.Fmt("tex").ours(cell.mean, cell.ci95, cell.n, 3) == r"93.50 $\pm$ 1.24 (n=3)"


def test_one_seed_has_no_interval_and_says_n_1():
    cell = seed_stats.spread([70.0])
    assert (cell.mean, cell.n) == (70.0, 1) and math.isnan(cell.ci95) and math.isnan(cell.std)
    assert make_tables.Fmt("md").ours(cell.mean, cell.ci95, cell.n, 1) == "70.00 (n=1)"
    assert make_tables.Fmt("md").ours(cell.mean, cell.ci95, cell.n, 3) == "70.00 (n=1/3)"


def test_identical_seeds_give_a_zero_interval():
    cell = seed_stats.spread([80.1, 80.1, 80.1])
    assert cell.ci95 == 0.0 and cell.std == 0.0
    assert make_tables.Fmt("md").ours(cell.mean, cell.ci95, cell.n, 3) == "80.10 ± 0.00 (n=3)"


def test_summary_and_csv_columns_carry_mean_ci_std_n():
    runs = fake_runs({("cmtkd", "8-6-4"): {0: 68.91, 1: 69.35}, ("qat", "none"): {0: 63.4}})
    grid = runs.drop(columns=["top1", "top5", "converged"])
    summary = make_tables.summarize(runs, grid, make_tables.read_external([])).set_index("method")
    assert summary.loc["cmtkd", "top1_mean"] == pytest.approx(69.13)
    assert summary.loc["cmtkd", "top1_std"] == pytest.approx(0.44 / math.sqrt(2))  # 0.31113
    assert summary.loc["cmtkd", "top1_ci95"] == pytest.approx(T975_DF1 * 0.22, abs=1e-4)  # t·s/√2 = 2.79536
    assert summary.loc["qat", "n"] == 1 and math.isnan(summary.loc["qat", "top1_ci95"])


# ------------------------------------------------------------------ paired comparison and Holm
def test_holm_adjusts_in_step_down_order():
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 -> raised to 0.06 (monotone)
    assert seed_stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = seed_stats.holm([math.nan, 0.02, 0.04, 0.9])  # NaN: not in the family (m = 3)
    assert math.isnan(adjusted[0]) and adjusted[1:] == pytest.approx([0.06, 0.08, 0.9])
    assert seed_stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    # Raw p-values below alpha that Holm does not reject: 0.03 and 0.04 -> 0.06 and 0.06.
    assert [seed_stats.verdict(1.0, 3, p) for p in seed_stats.holm([0.03, 0.04])] == \
        ["no significant difference"] * 2


def test_pairs_are_the_seeds_both_methods_have():
    paired = seed_stats.paired_difference({0: 70.0, 1: 71.0, 2: 72.5}, {1: 70.0, 2: 71.0, 3: 99.0})
    assert paired.n_pairs == 2 and paired.mean == pytest.approx(1.25)  # seeds 1 and 2: +1.0, +1.5
    t = 1.25 / (math.sqrt(0.125) / math.sqrt(2))  # differences' s = √0.125
    assert paired.p_value == pytest.approx(2 * (0.5 - math.atan(t) / math.pi), abs=1e-9)  # t(1) is Cauchy


def test_ties_give_p_one_and_no_significant_difference():
    paired = seed_stats.paired_difference({0: 70.1, 1: 70.3, 2: 69.9}, {0: 70.1, 1: 70.3, 2: 69.9})
    assert (paired.mean, paired.ci95, paired.std, paired.n_pairs, paired.p_value) == (0.0, 0.0, 0.0, 3, 1.0)
    assert seed_stats.verdict(paired.mean, paired.n_pairs, seed_stats.holm([paired.p_value])[0]) == \
        "no significant difference"


def comparison_fixture() -> pd.DataFrame:
    """CMT-KD and four methods, 3 seeds: clearly better, clearly worse, a tie, one common seed."""
    ref = {0: 70.0, 1: 71.0, 2: 72.0}
    return fake_runs({
        ("cmtkd", "8-6-4"): ref,
        ("cmtkd-noml", "8-6-4"): {s: v - d for (s, v), d in zip(ref.items(), (3.0, 3.2, 2.8))},  # worse
        ("kd", "8"): {s: v + d for (s, v), d in zip(ref.items(), (2.0, 2.1, 1.9))},  # better
        ("qat", "none"): dict(ref),  # tie
        ("cmtkd-avg", "8-6-4"): {2: 75.0, 7: 60.0},  # one seed in common
    }, not_converged={("kd", 1)})


def test_comparison_golden_values_better_worse_tie_too_few():
    table = make_tables.comparisons(comparison_fixture()).set_index("method")
    assert list(table.index) == ["qat", "kd", "cmtkd-noml", "cmtkd-avg"]  # the tables' method order
    p_better = two_sided_p_df2(2.0 / (0.1 / math.sqrt(3)))  # t = 34.641, p = 8.3231e-4
    p_worse = two_sided_p_df2(-3.0 / (0.2 / math.sqrt(3)))  # t = -25.981, p = 1.47825e-3
    assert table.loc["kd", "p_value"] == pytest.approx(p_better, rel=1e-6)
    assert table.loc["cmtkd-noml", "p_value"] == pytest.approx(p_worse, rel=1e-6)
    assert table.loc["qat", "p_value"] == 1.0
    # Holm over the 3 tested rows (too few seeds is not a test): 3·p_better, 2·p_worse, 1·1.
    assert table.loc["kd", "p_holm"] == pytest.approx(3 * p_better, rel=1e-6)  # 2.4969e-3
    assert table.loc["cmtkd-noml", "p_holm"] == pytest.approx(2 * p_worse, rel=1e-6)  # 2.9565e-3
    assert table.loc["qat", "p_holm"] == 1.0 and math.isnan(table.loc["cmtkd-avg", "p_holm"])
    assert table["verdict"].to_dict() == {"qat": "no significant difference", "kd": "better",
                                          "cmtkd-noml": "worse", "cmtkd-avg": "too few seeds"}
    assert table.loc["kd", "diff_mean"] == pytest.approx(2.0)
    assert table.loc["kd", "diff_ci95"] == pytest.approx(T975_DF2 * 0.1 / math.sqrt(3), abs=1e-5)  # 0.24841
    assert table.loc["cmtkd-avg", "n_pairs"] == 1 and table.loc["cmtkd-avg", "diff_mean"] == pytest.approx(3.0)
    assert table.loc["cmtkd-avg", "seeds"] == "2" and table.loc["kd", "seeds"] == "0,1,2"
    assert table["reference_teacher_bits"].tolist() == ["8-6-4"] * 4  # kd's 8 = the set's highest bit-width
    assert table["n_not_converged"].to_dict() == {"qat": 0, "kd": 1, "cmtkd-noml": 0, "cmtkd-avg": 0}


def test_comparison_markdown_shows_the_verdict_column_and_the_dagger():
    display, _, _ = make_tables.comparison_table(comparison_fixture(), fmt := make_tables.Fmt("md"))
    assert display.to_markdown(index=False).splitlines()[2:] == [
        "| cifar100  | alexnet | W2A2  | qat        | —          | 8-6-4             | n=3     "
        "| +0.00 ± 0.00        | 1.0000 | 1.0000     | no significant difference |",
        "| cifar100  | alexnet | W2A2  | kd         | 8          | 8-6-4             | n=3     "
        "| +2.00 ± 0.25 †      | 0.0008 | 0.0025     | better                    |",
        "| cifar100  | alexnet | W2A2  | cmtkd-noml | 8-6-4      | 8-6-4             | n=3     "
        "| -3.00 ± 0.50        | 0.0015 | 0.0030     | worse                     |",
        "| cifar100  | alexnet | W2A2  | cmtkd-avg  | 8-6-4      | 8-6-4             | n=1     "
        "| +3.00               | —      | —          | too few seeds             |",
    ]
    assert fmt.notes() == [("†", make_tables.NOT_CONVERGED_NOTES["cell"])]


def test_one_teacher_and_teacherless_methods_meet_the_matching_cmtkd_sets():
    assert make_tables.reference_sets("8", ["8-6-4", "8-6-5", "6-4-2"]) == ["8-6-4", "8-6-5"]
    assert make_tables.reference_sets("none", ["8-6-4", "6-4-2"]) == ["8-6-4", "6-4-2"]
    assert make_tables.reference_sets("6-4-2", ["8-6-4", "6-4-2"]) == ["6-4-2"]
    assert make_tables.reference_sets("8-4", ["8-6-4"]) == []


# ----------------------------------------------------------------------------- not converged
def history(values: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"epoch": range(1, len(values) + 1), seed_stats.VAL_COLUMN: values})


def test_a_climbing_run_is_not_converged_and_a_flat_one_is():
    climbing = [10, 20, 30, 40, 50, 60, 70, 80, 81, 82]  # E = 10: best at epoch 10 (82) − at epoch 8 (80)
    assert seed_stats.convergence(history(climbing)) == (2.0, False)
    flat = [10, 20, 30, 40, 50, 60, 70, 80, 80.5, 80.3]  # best 80.5 − 80
    assert seed_stats.convergence(history(flat)) == (0.5, True)
    # The best so far, not the last value: a late dip followed by a partial recovery is no gain.
    assert seed_stats.convergence(history([10, 20, 80, 79, 79.5])) == (0.0, True)  # E = 5: epoch 5 vs 4
    # Exactly 1 point (64.1 − 63.1 is 0.99999... in floating point) is not converged.
    assert 64.1 - 63.1 < 1.0
    assert seed_stats.convergence(history([60, 61, 62, 62.5, 63, 63, 63, 63.1, 64.0, 64.1])) == (1.0, False)


def test_short_runs_compare_the_last_epoch_with_the_one_before_and_one_epoch_is_unknown():
    assert seed_stats.convergence(history([50.0, 60.0, 60.5])) == (0.5, True)
    assert seed_stats.convergence(history([50.0, 60.0, 62.0])) == (2.0, False)
    gain, converged = seed_stats.convergence(history([50.0]))
    assert math.isnan(gain) and converged is None
    gain, converged = seed_stats.convergence(pd.DataFrame({"epoch": [1, 2], "loss": [2.0, 1.0]}))  # no val split
    assert math.isnan(gain) and converged is None


def test_a_cell_whose_runs_still_rise_on_average_carries_the_dagger_and_the_table_the_footnote():
    runs = fake_runs({("cmtkd", "8-6-4"): {0: 68.91, 1: 69.35}, ("kd", "8"): {0: 65.02, 1: 64.58},
                      ("qat", "none"): {0: 60.0, 1: 61.0}}, not_converged={("kd", 0), ("kd", 1), ("qat", 1)})
    # kd: both runs rose (mean gain 1.15): marked. qat: one run rose 1.8, the other 0.0 (mean 0.9): not
    # marked under the default "cell" scope, though one run is counted. cmtkd: unknown, no mark.
    runs["val_gain_last20"] = runs["method"].map({"kd": 1.0, "qat": 0.0, "cmtkd": np.nan})
    runs.loc[runs["seed"].eq(1) & runs["method"].eq("kd"), "val_gain_last20"] = 1.3
    runs.loc[runs["seed"].eq(1) & runs["method"].eq("qat"), "val_gain_last20"] = 1.8
    runs["converged"] = runs["converged"].astype(object)
    runs.loc[runs["method"] == "cmtkd", "converged"] = np.nan
    grid = runs.drop(columns=["top1", "top5", "converged", "val_gain_last20"])
    summary = make_tables.summarize(runs, grid, make_tables.read_external([]))
    paper = pd.DataFrame(columns=["method", "dataset", "arch", "w_bits", "a_bits", "top1", "top5", "teacher_bits"])
    display, _, tidy = make_tables.main_table(summary, paper, fmt := make_tables.Fmt("md"))
    cells = dict(zip(display["Method"], display["W2A2"]))
    assert cells == {"qat": "60.50 ± 6.35 (n=2)", "kd": "64.80 ± 2.80 (n=2) †", "cmtkd": "69.13 ± 2.80 (n=2)"}
    by_method = tidy.set_index("method")
    assert by_method["n_not_converged"].to_dict() == {"qat": 1, "kd": 2, "cmtkd": 0}
    assert by_method["not_converged"].to_dict() == {"qat": False, "kd": True, "cmtkd": False}
    assert by_method.loc["kd", "val_gain_mean"] == pytest.approx(1.15)
    assert fmt.notes() == [("†", "not converged: the best validation top-1 of this cell's runs still rose by ≥ 1 pp "
                                  "over their last 20 % of epochs, on average over the runs (ASSUMPTIONS.md W13)")]
    clean = runs.assign(converged=True, val_gain_last20=0.2)
    make_tables.main_table(make_tables.summarize(clean, grid, make_tables.read_external([])), paper,
                           fmt := make_tables.Fmt("md"))
    assert fmt.notes() == []  # nothing marked: no footnote


def test_the_cell_rule_against_the_run_rule_and_rows_without_gains():
    cell = lambda gains, flags: pd.DataFrame({"val_gain_last20": gains, "converged": flags})  # noqa: E731
    mixed = cell([0.0, 1.8, 0.0], [True, False, True])  # one run rose, the mean (0.6) did not
    assert not seed_stats.cell_not_converged(mixed) and seed_stats.cell_not_converged(mixed, scope="run")
    # The mean is rounded before the comparison: 0.9 and 1.1 average to exactly the threshold.
    assert seed_stats.cell_not_converged(cell([0.9, 1.1], [True, False]))
    assert not seed_stats.cell_not_converged(cell([0.9, 1.0999], [True, False]))
    # Rows with no gain (imported results with only `converged`): any run not converged marks the cell.
    assert seed_stats.cell_not_converged(cell([np.nan, np.nan], [True, "False"]))
    assert not seed_stats.cell_not_converged(cell([np.nan, np.nan], [True, np.nan]))
    assert not seed_stats.cell_not_converged(pd.DataFrame({"top1": [50.0]}))  # neither column: unknown
    with pytest.raises(ValueError, match="convergence scope 'seed'"):
        seed_stats.cell_not_converged(mixed, scope="seed")


def test_a_comparison_is_marked_when_either_of_its_paired_cells_is():
    runs = fake_runs({("cmtkd", "8-6-4"): {0: 68.0, 1: 69.0, 2: 70.0}, ("kd", "8"): {0: 66.0, 1: 67.0},
                      ("qat", "none"): {0: 66.0, 1: 66.5}})
    runs["val_gain_last20"] = 0.0
    # cmtkd's seed 2 rose 3 points: over all three seeds its mean gain is 1.0, over the pairs with kd
    # (seeds 0, 1) it is 0.0. Only the seeds a comparison uses decide its mark.
    runs.loc[runs["method"].eq("cmtkd") & runs["seed"].eq(2), ["val_gain_last20", "converged"]] = [3.0, False]
    runs.loc[runs["method"].eq("qat"), ["val_gain_last20", "converged"]] = [1.2, False]
    table = make_tables.comparisons(runs).set_index("method")
    assert table["not_converged"].to_dict() == {"qat": True, "kd": False}
    assert table["n_not_converged"].to_dict() == {"qat": 2, "kd": 0}
    # The reference side alone: cmtkd's seeds 0 and 1 rise on average by 1.0, kd's runs are flat.
    runs.loc[runs["method"].eq("cmtkd") & runs["seed"].isin([0, 1]), "val_gain_last20"] = [0.8, 1.2]
    assert make_tables.comparisons(runs).set_index("method").loc["kd", "not_converged"]


def test_the_run_scope_marks_a_cell_with_one_rising_run_and_says_so(monkeypatch):
    runs = fake_runs({("cmtkd", "8-6-4"): {0: 68.91, 1: 69.35}, ("qat", "none"): {0: 60.0, 1: 61.0}},
                     not_converged={("qat", 1)})
    runs["val_gain_last20"] = runs["seed"].map({0: 0.0, 1: 1.8}).where(runs["method"].eq("qat"), 0.0)
    grid = runs.drop(columns=["top1", "top5", "converged", "val_gain_last20"])
    paper = pd.DataFrame(columns=["method", "dataset", "arch", "w_bits", "a_bits", "top1", "top5", "teacher_bits"])
    marked = {}
    for scope in ("cell", "run"):
        monkeypatch.setattr(seed_stats, "CONVERGENCE_SCOPE", scope)
        summary = make_tables.summarize(runs, grid, make_tables.read_external([]))
        display, _, _ = make_tables.main_table(summary, paper, fmt := make_tables.Fmt("md"))
        marked[scope] = (dict(zip(display["Method"], display["W2A2"]))["qat"], fmt.notes())
    assert marked["cell"] == ("60.50 ± 6.35 (n=2)", [])
    assert marked["run"] == ("60.50 ± 6.35 (n=2) †", [("†", "not converged: the best validation top-1 of at least one "
                                                        "of this cell's runs still rose by ≥ 1 pp over its last 20 % "
                                                        "of epochs (ASSUMPTIONS.md W13)")])


def test_tables_before_any_student_run_has_finished():
    """Only teacher runs (or nothing) in runs.csv: every grid cell is a row with n = 0, nothing marked."""
    runs = fake_runs({("cmtkd", "8-6-4"): {0: 68.91}}).assign(val_gain_last20=0.0)
    grid = runs.drop(columns=["top1", "top5", "converged", "val_gain_last20"])
    for finished in (runs.assign(role="teacher"), runs.iloc[:0]):
        summary = make_tables.summarize(finished, grid, make_tables.read_external([]))
        assert summary[["method", "n", "n_not_converged", "not_converged"]].to_dict("records") == [
            {"method": "cmtkd", "n": 0, "n_not_converged": 0, "not_converged": False}]


def test_collected_runs_record_convergence_from_their_history(fixture_workdir):  # noqa: F811
    runs = pd.read_csv(build_fixture_tables(fixture_workdir) / "runs.csv")
    by_method = runs.groupby("method")["converged"].agg(lambda s: sorted(set(s)))
    # The fixture's cmtkd runs rose 0.3 points in their last epoch, every other run 3 points.
    assert by_method.to_dict() == {"cmtkd": [True], "cmtkd-nofeat": [False], "cmtkd-noml": [False], "fp": [False],
                                   "kd": [False], "qat": [False]}
    assert runs.loc[runs["method"] == "cmtkd", "val_gain_last20"].tolist() == pytest.approx([0.3, 0.3])
