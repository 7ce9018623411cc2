"""benchmarks/gpu_check.py (``make gpu-check``) checked on CPU, so the GPU session finds no bugs in it:
the plan, the synthetic cifar-100-python writer, the CSV record, the projection arithmetic, installing
from a folder of wheels without an index, and (slow) its phases end to end at toy sizes."""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402
from synthetic_cifar import write_synthetic_cifar100  # noqa: E402

from cmtkd.data import DataConfig, build_data  # noqa: E402


def run_script(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_dry_run_prints_the_plan_and_the_wheel_install():
    done = run_script("--dry-run", "--wheels", "/some/wheels")
    assert done.returncode == 0, done.stderr
    for phase in gpu_check.PHASES:
        assert f"  {phase}: at most" in done.stdout
    assert "--no-index --find-links /some/wheels" in done.stdout
    assert "resnet18/cmtkd/bf16+cl+compile" in done.stdout and "alexnet/qat/bf16+cl" in done.stdout


def test_unknown_phase_is_refused():
    done = run_script("--phases", "env,warp")
    assert done.returncode == 2 and "unknown phase(s) warp" in done.stderr


def test_synthetic_cifar_is_read_by_the_real_loader(tmp_path):
    root = write_synthetic_cifar100(tmp_path, train=1000, test=200, seed=1)
    data = build_data(DataConfig(name="cifar100", root=str(root), batch_size=100))
    assert (data.info.num_classes, data.info.num_train, data.info.num_val, data.info.num_test) == (100, 900, 100, 200)
    images, labels = next(data.train_batches(0, 0))
    assert images.shape == (100, 3, 32, 32) and images.dtype == torch.float32 and labels.max() < 100
    with open(root / "cifar-100-python" / "meta", "rb") as fh:
        import pickle

        assert len(pickle.load(fh, encoding="latin1")[b"fine_label_names"]) == 100


def test_record_writes_every_row_at_once_with_the_fingerprint(tmp_path):
    path = tmp_path / "out" / "gpu.csv"
    record = gpu_check.Record(path, {"device": "cuda", "device_name": "GPU X", "torch": "2.11.0", "date": "d"})
    record.add("throughput", "case", 123.456, "img/s", note="n")
    rows = list(csv.DictReader(open(path)))  # readable before close: flushed row by row
    assert tuple(rows[0]) == gpu_check.CSV_COLUMNS
    assert rows[0]["value"] == "123.456" and rows[0]["device_name"] == "GPU X" and rows[0]["torch"] == "2.11.0"
    record.close()
    assert gpu_check.verdict_at_least(0.30, 0.35) == ("missed", "14 % below the target")
    assert gpu_check.verdict_at_least(0.40, 0.35) == ("met", "")
    assert gpu_check.verdict_at_most(1.5, 1.0) == ("missed", "1.50x the target")
    assert gpu_check.default_csv_path({"device_name": "NVIDIA H100 80GB HBM3", "date": "2026-11-27T03:00:00Z"}).name \
        == "gpu-nvidia-h100-80gb-hbm3-2026-11-27.csv"


FINGERPRINT = {"device": "cuda", "device_name": "GPU X", "torch": "2.11.0", "date": "d"}


def _results(scale: float) -> dict:
    rows = {}
    for arch, base in (("resnet18", 10000.0), ("alexnet", 30000.0)):
        for label, factor in (("fp", 1.1), ("qat", 1.0), ("cmtkd", 0.25)):
            rows[f"{arch}/{label}"] = {"arch": arch, "label": label, "img_s": scale * base * factor, "amp": "bf16",
                                       "channels_last": True, "compile": False, "deterministic": False}
    return rows


def test_projection_arithmetic():
    run_hours, grid_hours, note = gpu_check.project(_results(1.0))
    assert run_hours == pytest.approx(200 * 45000 / 2500 / 3600)  # 1.0 h at 2500 img/s
    # The note counts the CIFAR-100 grid's runs, derived here from the suite config itself.
    sys.path.insert(0, str(ROOT / "workflow" / "scripts"))
    import grid

    runs = len(grid.expand(grid.load_config(ROOT / "config" / "cifar100.yaml")))
    assert f"{runs} runs" in note
    faster = gpu_check.project(_results(2.0))
    assert faster[0] == pytest.approx(run_hours / 2) and faster[1] == pytest.approx(grid_hours / 2)
    assert gpu_check.project({})[:2] == (None, None)
    assert "NOT in the suite's train settings: resnet18/qat/bf16+cl, " in note


def test_projection_uses_the_cases_timed_in_the_suites_settings(tmp_path):
    """A faster case timed otherwise (no determinism, compiled) does not make the projection optimistic."""
    results = _results(1.0)
    suite = {key: {**row, "deterministic": True, "suite": True, "img_s": row["img_s"] / 2}
             for key, row in results.items()}
    both = {**results, **{key + "+det": row for key, row in suite.items()}}
    run_hours, grid_hours, note = gpu_check.project(both)
    assert run_hours == pytest.approx(gpu_check.project(suite)[0]) == pytest.approx(200 * 45000 / 1250 / 3600)
    assert grid_hours == pytest.approx(2 * gpu_check.project(results)[1])
    assert note.endswith("every case in the suite's train settings")
    record = gpu_check.Record(tmp_path / "check.csv", FINGERPRINT)
    assert gpu_check.phase_projection(record, both)
    record.close()
    assert "x 200 epochs at resnet18/cmtkd/bf16+cl+det" in record.rows[0]["note"]
    record = gpu_check.Record(tmp_path / "other.csv", FINGERPRINT)
    gpu_check.phase_projection(record, results)
    record.close()
    assert "at resnet18/cmtkd/bf16+cl (NOT the suite settings)" in record.rows[0]["note"]


def test_throughput_cases_time_the_suite_first():
    cases = gpu_check.throughput_cases(gpu_check.Sizes(), "cuda")
    names = [gpu_check.case_name(c) for c in cases]
    suite = {arch: gpu_check.suite_train_settings(arch) for arch in ("resnet18", "alexnet")}
    assert suite["resnet18"] == {"amp": "bf16", "channels_last": True, "compile": False, "deterministic": True,
                                 "tf32": True}
    assert names[:6] == [f"{arch}/{label}/bf16+cl+det" for arch in ("resnet18", "alexnet")
                         for label in ("fp", "qat", "cmtkd")]
    assert all(c["suite"] for c in cases[:6]) and not any(c["suite"] for c in cases[6:])
    assert names[6:] == ["resnet18/cmtkd/bf16+cl", "resnet18/qat/bf16+cl+det+lossy", "resnet18/qat/bf16+cl+det+notf32",
                         "resnet18/fp/bf16+cl+compile", "resnet18/qat/bf16+cl+compile", "resnet18/cmtkd/bf16+cl+compile"]
    lossy, strict = cases[7], cases[8]
    for case, key in ((lossy, "exact"), (strict, "tf32")):  # each the suite's QAT with one change
        assert {k: v for k, v in case.items() if k not in (key, "suite")} \
            == {k: v for k, v in cases[1].items() if k not in (key, "suite")}
        assert case[key] is False and cases[1][key] is True
    tiny = [gpu_check.case_name(c) for c in gpu_check.throughput_cases(gpu_check.Sizes.tiny(), "cpu")]
    assert tiny == [f"{arch}/{label}/fp32+det" for arch in ("resnet18", "alexnet") for label in ("fp", "qat", "cmtkd")] \
        + ["resnet18/cmtkd/fp32"]


def test_a_suite_case_that_equals_a_diagnostic_one_stays_the_suites(monkeypatch):
    """Were the suite to train without determinism, its ResNet-18 CMT-KD case and the diagnostic one would
    be the same case: timed once, and still the suite's (so the projection and the targets use it)."""
    monkeypatch.setattr(gpu_check, "suite_train_settings", lambda arch: {
        "amp": "bf16", "channels_last": True, "compile": False, "deterministic": False})
    cases = gpu_check.throughput_cases(gpu_check.Sizes(), "cuda")
    names = [gpu_check.case_name(c) for c in cases]
    assert names.count("resnet18/cmtkd/bf16+cl") == 1
    assert cases[names.index("resnet18/cmtkd/bf16+cl")]["suite"]


def write_wheel(folder: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """A pure-Python wheel written by hand (a zip with METADATA, WHEEL and RECORD): no build backend needed,
    so the test does not depend on the environment's setuptools/wheel versions."""
    import zipfile

    dist = f"{name.replace('-', '_')}-{version}"
    files = {**files, f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: cmtkd-tests\nRoot-Is-Purelib: true\n"
                                        "Tag: py3-none-any\n"}
    record = "".join(f"{path},,\n" for path in files) + f"{dist}.dist-info/RECORD,,\n"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in {**files, f"{dist}.dist-info/RECORD": record}.items():
            archive.writestr(member, text)
    return path


def test_wheel_folder_install_uses_no_index(tmp_path):
    wheels = tmp_path / "wheels"
    write_wheel(wheels, "cmtkd-wheel-probe", "1.0", {"cmtkd_wheel_probe/__init__.py": "VALUE = 42\n"})
    assert not gpu_check.requirement_met("cmtkd-wheel-probe")
    assert gpu_check.requirement_met("pytest>=1")
    command = gpu_check.install_command(wheels, ["cmtkd-wheel-probe"])
    assert command[command.index("--find-links") + 1] == str(wheels) and "--no-index" in command
    site = tmp_path / "site"
    saved = list(sys.path), dict(__import__("os").environ)
    try:
        installed, where = gpu_check.install_missing(wheels, ["cmtkd-wheel-probe", "pytest>=1"], target=site,
                                                     into_env=False)
        assert installed == ["cmtkd-wheel-probe"] and where == str(site)
        import cmtkd_wheel_probe

        assert cmtkd_wheel_probe.VALUE == 42 and Path(cmtkd_wheel_probe.__file__).is_relative_to(site)
    finally:
        sys.path[:] = saved[0]
        __import__("os").environ.clear()
        __import__("os").environ.update(saved[1])
        sys.modules.pop("cmtkd_wheel_probe", None)
    with pytest.raises(SystemExit, match="no such folder"):
        gpu_check.install_missing(tmp_path / "missing")


def test_foreign_wheels_are_dropped(tmp_path):
    names = ["a-1.0-py3-none-any.whl", "b-1.0-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
             "c-1.0-cp311-cp311-manylinux_2_17_x86_64.whl", "d-1.0-cp36-abi3-manylinux_2_28_x86_64.whl",
             "e-1.0-cp312-cp312-macosx_11_0_arm64.whl"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert gpu_check.drop_foreign_wheels(tmp_path, "3.12") == [names[2], names[4]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names[0], names[1], names[3]])


@pytest.mark.slow
def test_throughput_and_projection_phases_at_toy_size_on_cpu(tmp_path):
    out = tmp_path / "check.csv"
    done = run_script("--device", "cpu", "--tiny", "--phases", "env,throughput,projection", "--cases",
                      "resnet18/qat,resnet18/cmtkd,alexnet/qat", "--csv", str(out), "--work", str(tmp_path / "w"))
    rows = {r["name"]: r for r in csv.DictReader(open(out))}
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert float(rows["matmul_peak_bf16"]["value"]) > 0
    for name in ("resnet18/qat/fp32+det", "resnet18/cmtkd/fp32+det", "alexnet/qat/fp32+det"):
        assert float(rows[name]["value"]) > 0 and "GFLOP/img" in rows[name]["note"]
    assert rows["target_cmtkd_peak_fraction"]["verdict"] in ("met", "missed")
    assert float(rows["cmtkd_200_epochs"]["value"]) > 0 and float(rows["cifar100_grid"]["value"]) > 0
    assert rows["wall_time"]["device"] == "cpu"
    assert "# gpu-check summary" in done.stdout


@pytest.mark.slow
def test_grid_phase_trains_through_snakemake_on_the_synthetic_dataset(tmp_path):
    out = tmp_path / "check.csv"
    done = run_script("--device", "cpu", "--tiny", "--phases", "grid", "--csv", str(out), "--work", str(tmp_path / "w"))
    rows = {r["name"]: r for r in csv.DictReader(open(out))}
    assert done.returncode == 0, rows.get("snakemake_grid", {}).get("note", "") + done.stderr[-2000:]
    assert rows["snakemake_grid"]["verdict"] == "passed" and "devices ['cpu']" in rows["snakemake_grid"]["note"]
    assert (tmp_path / "w" / "grid" / "results" / "tables" / "main.csv").exists()


def test_background_compilation_yields_to_the_checks_beside_it(tmp_path, monkeypatch):
    """The prewarm process runs at the lowest CPU priority with a quarter of the cores for Inductor's compile
    workers, so the time-limited tests and grid beside it keep the machine."""
    started = {}

    class FakePopen:
        def __init__(self, command, **kwargs):
            started.update(command=command, **kwargs)

    monkeypatch.setattr(gpu_check.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(gpu_check.os, "cpu_count", lambda: 16)
    args = argparse.Namespace(phases=["throughput"], device="cuda", cases=None, work=tmp_path, tiny=False)
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: None)  # a machine without nice: started as is
    gpu_check.start_prewarm(args, gpu_check.Sizes())[1].close()
    assert started["command"][0] == sys.executable
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: "/usr/bin/" + name)
    process, handle, log, _ = gpu_check.start_prewarm(args, gpu_check.Sizes())
    handle.close()
    assert started["command"][:3] == ["nice", "-n", "19"] and started["command"][3] == sys.executable
    assert started["env"]["TORCHINDUCTOR_COMPILE_THREADS"] == "4"
    payload = json.loads(started["command"][started["command"].index("--child") + 1])
    assert [gpu_check.case_name(c) for c in payload["payload"]["cases"]] == [
        "resnet18/fp/bf16+cl+compile", "resnet18/qat/bf16+cl+compile", "resnet18/cmtkd/bf16+cl+compile"]
