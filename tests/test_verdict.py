"""The verdict study driver (workflow/scripts/verdict.py): levels of config/verdict.yaml, their
suites and grids, bad study files, and the study's tables on hand-made runs (golden numbers below).
Nothing here trains."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow" / "scripts"))

import grid  # noqa: E402
import verdict  # noqa: E402

STUDY = ROOT / "config" / "verdict.yaml"


def test_the_study_file_gives_one_suite_per_level_and_shares_the_base_point(tmp_path):
    suite, study = verdict.read_study(STUDY)
    table = verdict.levels(suite, study)
    assert set(table["axis"]) == {"reading", "init", "length"}
    assert (table.groupby("axis")["suite"].apply(lambda s: (s == verdict.BASE).sum()) == 1).all()
    paths = verdict.write_suites(table, tmp_path)
    assert list(paths)[0] == verdict.BASE and len(paths) == 7
    runs = {name: verdict.expanded(path) for name, path in paths.items()}
    base = runs[verdict.BASE]
    grid_runs = base[base["role"] == "grid"]
    assert sorted(set(zip(grid_runs["method"], grid_runs["teacher_bits"]))) == sorted(
        {("qat", "none"), ("kd", "8"), ("kd", "32"), ("mtkd", "8-6-4"), ("dml", "8-6-4"), ("kdcl", "8-6-4"),
         ("cmtkd", "8-6-4"), ("cmtkd-frozen", "8-6-4")})
    # kd's full-precision teacher is an fp run of its own seed 32000 + s
    assert set(base[(base["method"] == "fp")]["seed"]) == {32000 + s for s in range(5)}
    assert set(runs["length~4x"]["epochs"]) == {52} and set(base["epochs"]) == {13}
    assert sorted(set(runs["reading~stage-input"]["method"])) == ["cmtkd", "cmtkd-frozen", "cmtkd-teachers"]
    written = yaml.safe_load(paths["reading~stage-input"].read_text())
    assert {written["method_args"][m]["fusion_input"] for m in ("cmtkd", "cmtkd-frozen", "cmtkd-teachers")} == \
        {"stage-input"}
    fp = runs["init~fp"]
    assert len(fp) == len(base) + 5  # plus the fp run of each seed that every other run starts from
    assert set(fp[fp["method"] == "fp"]["seed"]) == set(range(5)) | {32000 + s for s in range(5)}


@pytest.mark.parametrize("study, message", [
    ({}, "needs 'study"),
    ({"axes": {"a": {"x": {}}}}, "at least two"),
    ({"axes": {"a": {"x": {"set": {}}, "y": {"set": {}}}}}, "exactly one level"),
    ({"axes": {"a": {"x": {}, "y": {"sets": {}}}}}, "unknown key"),
    ({"axes": {"a": {"x": {}, "y z": {"set": {}}}}}, "names a folder"),
])
def test_bad_study_files_are_one_line_naming_the_key(tmp_path, study, message):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"experiments": {}, **({"study": study} if study else {})}))
    with pytest.raises(verdict.StudyError, match=message):
        verdict.read_study(path)


def runs_frame(rows):
    frame = pd.DataFrame(rows, columns=["method", "teacher_bits", "w_bits", "seed", "top1", "role"])
    return frame.assign(dataset="digits", arch="resnet18", a_bits=frame["w_bits"],
                        run_dir=[f"r{i}" for i in range(len(frame))], epochs=13)


def test_tables_pair_by_seed_take_baselines_from_the_base_point_and_compare_teachers():
    base = runs_frame([
        *[("cmtkd", "8-6-4", 2, s, 90.0 + s, "grid") for s in range(3)],
        *[("kd", "8", 2, s, 91.0 + s + 0.5 * (s == 2), "grid") for s in range(3)],  # diffs -1, -1, -1.5
        *[("kd", "32", 2, s, 89.0 + s, "grid") for s in range(3)],  # +1 each
        *[("qat", "none", 8, 8000 + s, 95.0, "teacher") for s in range(3)],
    ])
    level = runs_frame([*[("cmtkd", "8-6-4", 2, s, 92.0 + s, "grid") for s in range(3)]])  # +1 on kd (8)
    table = pd.DataFrame([
        {"axis": "reading", "level": "residual", "suite": "base", "methods": None, "config": {}},
        {"axis": "reading", "level": "stage-input", "suite": "lvl", "methods": ["cmtkd"], "config": {}}])
    runs = verdict.level_runs(table, {"base": base, "lvl": level})
    assert set(runs[runs["level"] == "stage-input"]["label"]) == {"cmtkd (8-6-4)", "kd (8)", "kd (FP teacher)"}
    tidy = verdict.verdict_table(runs).set_index(["level", "baseline"])
    row = tidy.loc[("residual", "kd (8)")]
    assert row["difference"] == pytest.approx(-7 / 6) and row["n_pairs"] == 3
    assert row["ci95"] == pytest.approx(4.302653 * math.sqrt(1 / 12) / math.sqrt(3), rel=1e-5)
    assert tidy.loc[("residual", "kd (FP teacher)")]["difference"] == 1.0
    assert tidy.loc[("residual", "kd (FP teacher)")]["p_value"] == 0.0  # constant non-zero differences
    assert tidy.loc[("stage-input", "kd (8)")]["difference"] == pytest.approx(2 - 7 / 6)
    assert (tidy["p_holm"] >= tidy["p_value"]).all()
    hist = pd.DataFrame([
        *[{**dict(method="cmtkd", dataset="digits", arch="resnet18", w_bits=2, a_bits=2, teacher_bits="8-6-4",
                  seed=s), "epoch": e, "val_top1_teacher0_w8a8": 80.0 + e + s} for s in range(3) for e in (1, 2)],
        *[{**dict(method="qat", dataset="digits", arch="resnet18", w_bits=8, a_bits=8, teacher_bits="none",
                  seed=8000 + s), "epoch": e, "val_top1_student": 79.0 + e} for s in range(3) for e in (1, 2)]])
    teachers = verdict.teachers_table(table.iloc[:1], {"base": base}, {"base": hist})
    row = teachers[teachers["teacher_bits"] == 8].iloc[0]
    assert row["joint"] == 83.0 and row["alone"] == 81.0  # last epoch: 82 + s (mean 83), 81
    assert row["joint_minus_alone"] == 2.0 and row["n_pairs"] == 3
    assert math.isnan(teachers[teachers["teacher_bits"] == 6].iloc[0]["alone"])  # no 6-bit column or run


def test_importance_table_reads_the_last_epochs_pi_of_cmtkd():
    key = dict(method="cmtkd", dataset="digits", arch="resnet18", w_bits=2, a_bits=2, teacher_bits="8-4")
    hist = pd.DataFrame([{**key, "seed": s, "epoch": e, "pi_layer1_0": 0.5 + 0.1 * (e == 2) * (s + 1),
                          "pi_layer1_1": 0.5 - 0.1 * (e == 2) * (s + 1)} for s in range(2) for e in (1, 2)])
    table = pd.DataFrame([{"axis": "reading", "level": "residual", "suite": "base", "methods": None}])
    pi = verdict.importance_table(table, {"base": hist}).iloc[0]
    assert pi["pi_layer1_0"] == pytest.approx(0.65) and pi["seeds"] == 2
    assert pi["max_deviation"] == pytest.approx(0.2)


def test_suite_teachers_table_shows_joint_stage_and_alone_with_fp_labels():
    import make_tables

    key = dict(dataset="digits", arch="resnet18", a_bits=2, teacher_bits="8-4")
    runs = pd.DataFrame([{**key, "method": "cmtkd", "w_bits": 2, "seed": s, "top1": 90.0, "role": "grid"}
                         for s in range(2)])
    hist = pd.DataFrame(
        [{**key, "method": "cmtkd", "w_bits": 2, "seed": s, "epoch": 3, "val_top1_teacher0_w8a8": 90.0 + s,
          "val_top1_teacher1_w4a4": 88.0, "val_top1_teachers": 93.0} for s in range(2)]
        + [{**key, "method": "cmtkd-teachers", "w_bits": 32, "a_bits": 32, "seed": s, "epoch": 3,
            "val_top1_teacher0_w8a8": 91.0, "val_top1_teacher1_w4a4": 89.0, "val_top1_student": 94.0 + s}
           for s in range(2)]
        + [{"dataset": "digits", "arch": "resnet18", "method": "qat", "w_bits": b, "a_bits": b, "teacher_bits": "none",
            "seed": 1000 * b + s, "epoch": 3, "val_top1_student": 92.0 - s} for b in (8, 4) for s in range(2)])
    display, _, tidy = make_tables.teachers_table(runs, hist, make_tables.Fmt("md"))
    eight = tidy[tidy["teacher_bits"] == 8].iloc[0]
    assert (eight["joint"], eight["stage"], eight["alone"]) == (90.5, 91.0, 91.5)
    assert eight["joint_minus_alone"] == -1.0 and eight["n_pairs"] == 2  # -2 and 0
    assert (eight["joint_ensemble"], eight["stage_ensemble"]) == (93.0, 94.5)  # z_T jointly and in the stage
    assert list(display["Teacher"]) == ["W8A8", "W4A4"] and display["Student"].iloc[0] == "W2A2"
    assert display["Joint − alone"].iloc[0].startswith("-1.00 ±")
    empty = make_tables.teachers_table(runs, None, make_tables.Fmt("md"))[0]
    assert set(empty["Joint (CMT-KD)"]) == {"—"}  # no histories: no numbers, no error


def test_wide_verdict_has_a_row_per_level_and_a_column_per_baseline():
    v = pd.DataFrame({"axis": ["a", "a", "a"], "level": ["x", "x", "y"], "baseline": ["kd (8)", "qat", "kd (8)"],
                      "cmtkd_top1": [90.0, 90.0, 91.0], "difference": [-1.0, 0.5, 2.0], "ci95": [0.5, 1.0, 1.0],
                      "p_holm": [0.01, 0.5, math.nan]})
    wide = verdict.wide_verdict(v)
    assert list(wide.columns) == ["axis", "level", "CMT-KD top-1", "kd (8)", "qat"]
    assert wide.iloc[0]["kd (8)"] == "-1.00 ± 0.50*" and wide.iloc[0]["qat"] == "+0.50 ± 1.00"
    assert wide.iloc[1]["CMT-KD top-1"] == "91.00" and pd.isna(wide.iloc[1]["qat"])


def test_level_effect_compares_each_retrained_method_with_itself_at_the_base_point():
    base = runs_frame([*[("cmtkd", "8-6-4", 2, s, 90.0 + s, "grid") for s in range(3)],
                       *[("qat", "none", 2, s, 91.0, "grid") for s in range(3)]])
    level = runs_frame([*[("cmtkd", "8-6-4", 2, s, 91.0 + s + (s == 1), "grid") for s in range(3)]])  # +1, +2, +1
    table = pd.DataFrame([
        {"axis": "reading", "level": "residual", "suite": "base", "methods": None, "config": {}},
        {"axis": "reading", "level": "stage-input", "suite": "lvl", "methods": ["cmtkd"], "config": {}}])
    runs = verdict.level_runs(table, {"base": base, "lvl": level})
    effect = verdict.level_effect_table(runs, table)
    assert list(effect["method"]) == ["cmtkd (8-6-4)"]  # qat is the base point's run at both levels
    assert effect["difference"].iloc[0] == pytest.approx(4 / 3) and effect["n_pairs"].iloc[0] == 3
    assert effect["base_level"].iloc[0] == "residual" and effect["p_holm"].iloc[0] >= effect["p_value"].iloc[0]
