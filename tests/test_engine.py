"""The training engine: exact resume after SIGKILL, standalone evaluation, seeding, optimizer groups,
learning-rate schedules, checkpoint validation and the files a run directory holds."""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import stat
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from cmtkd.checkpoint import read_content
from cmtkd.cli import main
from cmtkd.config import build_config
from cmtkd.engine.trainer import CHECKPOINT, MODEL, check_param_groups, lr_factor

TIMING_COLUMNS = ("time_s", "images_per_s")


# ------------------------------------------------------------------------------------- helpers
def read_history(run_dir: Path, drop=TIMING_COLUMNS) -> list[dict]:
    with open(run_dir / "history.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(fh)]


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def load(path: Path):
    return read_content(path)


def assert_tensors_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: different keys"
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: tensor {key} differs"


def assert_nested_equal(a, b, where: str = "") -> None:
    """Structural equality with torch.equal for tensors (optimizer state, rng state, ...)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: different keys"
        for k in a:
            assert_nested_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: different lengths"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_nested_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def train_in_process(tiny_run_args, out: Path, **kwargs) -> dict:
    assert main(["train", *tiny_run_args(**kwargs), "--out", str(out)]) == 0
    return read_metrics(out)


def config(**overrides):
    return build_config([overrides])


# --------------------------------------------------------------------------- exact resume
@pytest.mark.slow
def test_sigkill_then_rerun_is_bit_identical_to_uninterrupted_run(tmp_path, tiny_run_args, cli, cli_popen,
                                                                  reference_run):
    out = tmp_path / "killed"
    args = ["train", *tiny_run_args(), "--out", str(out)]
    proc = cli_popen(*args)
    deadline = time.monotonic() + 240
    while not (out / CHECKPOINT).exists():
        if proc.poll() is not None:
            pytest.fail(f"run exited (rc {proc.returncode}) before writing a checkpoint:\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no checkpoint after 240 s")
        time.sleep(0.02)
    metrics_existed = (out / "metrics.json").exists()
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not metrics_existed, "the run finished before it could be killed"
    assert not (out / "metrics.json").exists()
    assert load(out / CHECKPOINT)["epoch"] < 3

    resumed = cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch" in resumed.stdout

    # The final student, the full method state and the optimizer state match bit for bit.
    model_a, model_b = load(out / MODEL), load(reference_run / MODEL)
    assert model_a["selected_epoch"] == model_b["selected_epoch"]
    assert model_a["arch_config"] == model_b["arch_config"]
    assert_tensors_equal(model_a["state_dict"], model_b["state_dict"], "model.pt")
    ckpt_a, ckpt_b = load(out / CHECKPOINT), load(reference_run / CHECKPOINT)
    assert ckpt_a["epoch"] == ckpt_b["epoch"] == 3
    assert_tensors_equal(ckpt_a["method"], ckpt_b["method"], "checkpoint method state")
    assert_nested_equal(ckpt_a["optimizer"], ckpt_b["optimizer"], "optimizer")
    assert_nested_equal(ckpt_a["scheduler"], ckpt_b["scheduler"], "scheduler")
    assert ckpt_a["best"]["epoch"] == ckpt_b["best"]["epoch"]
    assert_tensors_equal(ckpt_a["best"]["student_state"], ckpt_b["best"]["student_state"], "best student")

    metrics_a, metrics_b = read_metrics(out), read_metrics(reference_run)
    for key in ("top1", "top5", "test_images", "best_val_epoch", "best_val_top1"):
        assert metrics_a[key] == metrics_b[key], key
    assert metrics_a["env"]["config_hash"] == metrics_b["env"]["config_hash"]
    assert read_history(out) == read_history(reference_run)
    assert not list(out.glob(".*.tmp"))


def test_rerun_of_a_complete_run_is_a_no_op(reference_run, copy_run, tiny_run_args):
    run = copy_run(reference_run)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir()}
    t0 = time.perf_counter()
    metrics = train_in_process(tiny_run_args, run)
    assert time.perf_counter() - t0 < 30  # no training happened
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir()}
    assert after == before
    assert metrics == read_metrics(reference_run)


def test_resume_rewrites_a_history_that_lags_the_checkpoint(reference_run, copy_run, tiny_run_args):
    # Killed after the last checkpoint but before history.csv and metrics.json were written.
    run = copy_run(reference_run)
    (run / "metrics.json").unlink()
    full = (run / "history.csv").read_text().splitlines()
    (run / "history.csv").write_text("\n".join(full[:-1]) + "\n")
    metrics = train_in_process(tiny_run_args, run)
    assert (run / "history.csv").read_text().splitlines() == full
    assert metrics["top1"] == read_metrics(reference_run)["top1"]


def test_stale_temp_files_of_a_killed_write_are_removed(reference_run, copy_run, tiny_run_args):
    run = copy_run(reference_run)
    stale = run / ".checkpoint.pt.cmtkd-k1ll3d00.tmp"
    stale.write_bytes(b"half a checkpoint")
    train_in_process(tiny_run_args, run)
    assert not stale.exists()


# ------------------------------------------------------------------------ evaluation & files
def test_evaluate_reproduces_training_metrics(reference_run, copy_run, capsys):
    run = copy_run(reference_run)
    assert main(["evaluate", str(run), "--threads", "1"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    evaluated = json.loads((run / "eval.json").read_text())
    metrics = read_metrics(run)
    assert evaluated["top1"] == printed["top1"] == metrics["top1"]
    assert evaluated["top5"] == metrics["top5"]
    assert evaluated["n"] == metrics["test_images"] == 1000
    assert evaluated["split"] == "test"
    assert evaluated["selected_epoch"] == metrics["best_val_epoch"]


def test_evaluate_a_gpu_run_on_the_cpu(reference_run, copy_run, capsys):
    """A run trained with train.device=cuda: on a machine without CUDA evaluate says how to use the CPU
    (one line, exit 2); with --device cpu it evaluates there and gives the run's own number."""
    run = copy_run(reference_run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["train"]["device"] = "cuda"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    # a GPU run's model.pt carries the hash of its own (cuda) configuration
    from cmtkd import checkpoint
    from cmtkd.config import config_hash, load_run_config
    from cmtkd.files import atomic_write_bytes

    content = checkpoint.read_content(run / MODEL)
    content["config_hash"] = config_hash(load_run_config(run))
    atomic_write_bytes(run / MODEL, checkpoint.encode("model", content))
    if not torch.cuda.is_available():
        assert main(["evaluate", str(run), "--threads", "1"]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("cmtkd: error:") and "--device cpu" in error and "\n" not in error
        assert not (run / "eval.json").exists()
    assert main(["evaluate", str(run), "--threads", "1", "--device", "cpu"]) == 0
    assert json.loads((run / "eval.json").read_text())["top1"] == read_metrics(run)["top1"]


def test_run_directory_contents(reference_run):
    names = {p.name for p in reference_run.iterdir()}
    assert {"config.yaml", "history.csv", CHECKPOINT, MODEL, "metrics.json"} <= names
    assert not [n for n in names if n.startswith(".")], "temp or probe files left behind"

    rows = read_history(reference_run, drop=())
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for row in rows:
        for column in ("loss", "loss_ce", "val_top1_student", "lr", *TIMING_COLUMNS):
            assert row[column] != "", column
            assert math.isfinite(float(row[column])), column
        assert 0.0 <= float(row["val_top1_student"]) <= 100.0
    # lr is the rate each epoch starts with: full rate first, then the cosine decay
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == pytest.approx(0.1) and lrs[0] > lrs[1] > lrs[2] > 0.0

    metrics = read_metrics(reference_run)
    assert metrics["epochs"] == 3 and metrics["w_bits"] == metrics["a_bits"] == 2
    assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 100.0
    assert metrics["best_val_top1"] == pytest.approx(max(float(r["val_top1_student"]) for r in rows), rel=1e-5)
    assert metrics["env"]["threads"] == 1


def test_result_files_get_normal_permissions(reference_run, tmp_path):
    # Results are shared: they must not inherit mkstemp's private 0600 mode.
    plain = tmp_path / "plain"
    plain.write_text("")
    expected = stat.S_IMODE(plain.stat().st_mode)
    for name in ("config.yaml", "history.csv", CHECKPOINT, MODEL, "metrics.json"):
        assert stat.S_IMODE((reference_run / name).stat().st_mode) == expected, name


# ---------------------------------------------------------------------------- checkpoints
def test_truncated_checkpoint_is_a_user_error_naming_the_file(reference_run, copy_run, tiny_run_args, capsys):
    run = copy_run(reference_run)
    ckpt = run / CHECKPOINT
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    assert main(["train", *tiny_run_args(), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "corrupt" in err
    assert "Traceback" not in err


def test_checkpoint_of_a_different_config_is_refused(reference_run, copy_run, tiny_run_args, capsys):
    run = copy_run(reference_run)
    before = (run / CHECKPOINT).read_bytes()
    assert main(["train", *tiny_run_args(seed=2), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and "seed" in err
    assert "optim" not in err  # only the differing key is named
    assert (run / CHECKPOINT).read_bytes() == before


def test_thread_count_may_change_on_resume(reference_run, copy_run, tiny_run_args):
    # train.threads is not a result key: rerunning with other threads finds the run complete.
    run = copy_run(reference_run)
    args = tiny_run_args()
    args[args.index("--threads") + 1] = "2"
    try:
        assert main(["train", *args, "--out", str(run)]) == 0
    finally:
        torch.set_num_threads(1)


# -------------------------------------------------------------------------------- seeding
@pytest.mark.slow
def test_same_seed_same_result_different_seed_different_weights(tmp_path, tiny_run_args):
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        out = tmp_path / name
        runs[name] = (train_in_process(tiny_run_args, out, epochs=1, seed=seed), load(out / MODEL)["state_dict"])
    (metrics_a, weights_a), (metrics_b, weights_b), (_, weights_c) = runs["a"], runs["b"], runs["c"]
    assert_tensors_equal(weights_a, weights_b, "same seed")
    assert (metrics_a["top1"], metrics_a["top5"]) == (metrics_b["top1"], metrics_b["top5"])
    assert read_history(tmp_path / "a") == read_history(tmp_path / "b")
    assert weights_a.keys() == weights_c.keys()
    float_keys = [k for k, v in weights_a.items() if v.is_floating_point()]
    assert any(not torch.equal(weights_a[k], weights_c[k]) for k in float_keys)
    assert not torch.equal(weights_a["stages.stem.0.weight"], weights_c["stages.stem.0.weight"])


# ------------------------------------------------------------------------ optimizer groups
class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)


def test_param_groups_must_cover_every_parameter_exactly_once():
    net = TwoLayers()
    body, head = list(net.body.parameters()), list(net.head.parameters())
    check_param_groups(net, [{"name": "body", "params": body}, {"name": "head", "params": head}])

    with pytest.raises(RuntimeError, match=r"no optimizer group: head\.weight, head\.bias"):
        check_param_groups(net, [{"name": "body", "params": body}])
    with pytest.raises(RuntimeError, match=r"body\.weight is in groups 'body' and 'again'"):
        check_param_groups(net, [{"name": "body", "params": body + head}, {"name": "again", "params": body[:1]}])
    with pytest.raises(RuntimeError, match="not part of the method"):
        check_param_groups(net, [{"name": "all", "params": body + head + [nn.Parameter(torch.zeros(1))]}])

    # Frozen parameters may stay out of every group.
    for p in net.head.parameters():
        p.requires_grad_(False)
    check_param_groups(net, [{"name": "body", "params": body}])


def test_qat_method_groups_cover_its_parameters():
    from cmtkd.data import DataInfo
    from cmtkd.engine.trainer import build_optimizer
    from cmtkd.registry import get_method

    cfg = config(method="qat", w_bits=2, a_bits=2, model={"width": 0.125})
    info = DataInfo("digits", num_classes=10, in_channels=1, image_size=28, variant="cifar",
                    num_train=1, num_val=1, num_test=1)
    method = get_method("qat")(cfg, info)
    optimizer = build_optimizer(method, cfg)
    n_params = sum(1 for p in method.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == n_params
    assert optimizer.param_groups[0]["weight_decay"] == 2.5e-5  # W2A2 -> the 1-2-bit decay


# -------------------------------------------------------------------------- lr schedules
STEPS = 10


def factors(cfg) -> list[float]:
    return [lr_factor(cfg, step, STEPS) for step in range(cfg.epochs * STEPS + 1)]


def test_cosine_schedule_decays_monotonically_to_zero():
    f = factors(config(epochs=4, optim={"schedule": "cosine"}))
    assert f[0] == 1.0
    assert all(a >= b for a, b in zip(f, f[1:]))
    assert f[len(f) // 2] == pytest.approx(0.5)
    assert f[-2] < 0.01  # the last optimizer step runs at almost zero lr
    assert f[-1] == pytest.approx(0.0, abs=1e-12)


def test_step_schedule_drops_by_gamma_at_milestones():
    f = factors(config(epochs=6, optim={"schedule": "step", "milestones": [2, 4], "gamma": 0.1}))
    assert set(f[:2 * STEPS]) == {1.0}
    assert f[2 * STEPS:4 * STEPS] == pytest.approx([0.1] * 2 * STEPS)
    assert f[4 * STEPS:] == pytest.approx([0.01] * (2 * STEPS + 1))


def test_constant_schedule():
    assert set(factors(config(epochs=2, optim={"schedule": "constant"}))) == {1.0}


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
def test_warmup_ramps_linearly_then_hands_over(schedule):
    cfg = config(epochs=5, optim={"schedule": schedule, "milestones": [3], "warmup_epochs": 1})
    f = factors(cfg)
    ramp = f[:STEPS]
    assert ramp == pytest.approx([(s + 1) / STEPS for s in range(STEPS)])
    assert f[STEPS] == pytest.approx(1.0)  # the schedule proper starts at full lr
    if schedule == "cosine":
        assert f[-1] == pytest.approx(0.0, abs=1e-12)
    if schedule == "step":
        assert f[3 * STEPS] == pytest.approx(0.1)


def test_config_diff_fills_defaults_for_keys_added_later():
    from dataclasses import asdict

    from cmtkd.config import RunConfig, config_diff

    old = asdict(RunConfig())
    del old["train"]["compile"]  # a checkpoint written before the key existed
    assert config_diff(old, asdict(RunConfig())) == []
    changed = asdict(RunConfig())
    changed["optim"]["lr"] = 0.5
    changed["train"]["threads"] = 7  # never blocks a resume
    assert config_diff(changed, asdict(RunConfig())) == ["optim.lr"]


def test_export_writes_a_plain_program_equal_to_the_student(reference_run, tmp_path, capsys):
    from cmtkd.cli import main
    from cmtkd.engine.trainer import load_student

    out = tmp_path / "student.pt2"
    assert main(["export", str(reference_run), "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["exported"] == str(out) and info["w_bits"] == 2 and info["input"] == [1, 28, 28]
    program = torch.export.load(out).module()  # no cmtkd classes needed to run it
    model, _ = load_student(reference_run, torch.device("cpu"))
    images = torch.randn(5, 1, 28, 28)  # a batch size other than the export example's
    assert torch.equal(program(images), model.eval()(images))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("deterministic", [True, False])
def test_cudnn_autotunes_only_in_a_cuda_run_without_determinism(monkeypatch, deterministic):
    """cuDNN picks its convolution algorithms by timing them (``cudnn.benchmark``) only where the run need not
    repeat bit for bit; never in a deterministic run, never on CPU. (The device is faked: no GPU needed.)"""
    from cmtkd.config import build_config
    from cmtkd.engine import trainer

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # restored afterwards
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored afterwards
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        for device, expected in (("cuda", not deterministic), ("cpu", False)):
            torch.backends.cudnn.benchmark = not expected  # the opposite beforehand: setup_runtime must set it
            monkeypatch.setattr(trainer, "select_device", lambda name, device=device: torch.device(device))
            trainer.setup_runtime(build_config([{"train": {"deterministic": deterministic}}]))
            assert torch.backends.cudnn.benchmark is expected
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


@pytest.mark.parametrize("tf32", [True, False])
def test_tf32_convolutions_follow_the_config_and_matmuls_never_use_tf32(monkeypatch, tf32):
    """train.tf32 sets cuDNN's TF32 switch for the run (either way, whatever it was before); TF32 matmuls
    are off even where the environment turned them on (ledger W18). The device is faked: no GPU needed."""
    from cmtkd.config import build_config
    from cmtkd.engine import trainer

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    monkeypatch.setattr(trainer, "select_device", lambda name: torch.device("cuda"))
    try:
        torch.backends.cudnn.allow_tf32 = not tf32  # the opposite beforehand: setup_runtime must set it
        torch.backends.cuda.matmul.allow_tf32 = True
        trainer.setup_runtime(build_config([{"train": {"deterministic": False, "tf32": tf32}}]))
        assert torch.backends.cudnn.allow_tf32 is tf32
        assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_tf32_at_its_default_keeps_every_existing_config_hash():
    """train.tf32 came after runs were published: at its default (true) it is left out of the run-config hash."""
    from dataclasses import asdict

    from cmtkd.config import RunConfig, config_hash

    cfg = asdict(RunConfig())
    before = {**cfg, "train": {k: v for k, v in cfg["train"].items() if k != "tf32"}}  # a run written before the key
    assert cfg["train"]["tf32"] is True and config_hash(cfg) == config_hash(before)
    assert config_hash({**cfg, "train": {**cfg["train"], "tf32": False}}) != config_hash(cfg)


def test_deterministic_runtime_without_importing_inductor():
    """Deterministic algorithms are on after setup_runtime, and without torch.compile the process
    never imports torch._inductor (a 2 s import every suite run would pay)."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from cmtkd.config import RunConfig\n"
            "from cmtkd.engine.trainer import setup_runtime\n"
            "cfg = RunConfig()\n"
            "setup_runtime(cfg)\n"
            "assert torch.are_deterministic_algorithms_enabled()\n"
            "assert torch.is_deterministic_algorithms_warn_only_enabled()\n"
            "print('torch._inductor' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
