"""The GPU path (pytest marker ``cuda``): skipped, with the reason, where no CUDA device is present.

What runs on a GPU machine (``make gpu-check`` runs these first; ``pytest -m cuda`` alone works too):

* every registered method trains an epoch on CUDA (synthetic data in the real cifar-100-python format);
* no host synchronisation inside a training step (``torch.cuda.set_sync_debug_mode("error")``);
* same seed twice -> bit-identical runs under the deterministic settings (the engine sets
  ``torch.use_deterministic_algorithms`` and ``CUBLAS_WORKSPACE_CONFIG``); a run killed with SIGKILL
  and rerun finishes bit-identical to an uninterrupted one;
* bf16 autocast + channels_last + torch.compile matches the fp32 step within the tolerances below;
* a quantized conv under bf16 autocast is exact with ``train.tf32: false`` and within TF32's rounding with
  it (ledger W18);
* the GPU-resident CIFAR pipeline yields exactly the CPU pipeline's batches for the same (seed, epoch);
* ``torchrun --nproc_per_node 1`` equals a plain run, and DDP over a one-process NCCL group takes
  exactly the plain steps.

``CMTKD_CUDA_TESTS_DEVICE=cpu`` runs the device-independent part on CPU at smaller sizes (a check of
these tests themselves, for machines without a GPU; the CUDA-only checks stay skipped).
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cmtkd.catalog import method_entry
from cmtkd.cli import main
from cmtkd.config import build_config
from cmtkd.data import DataConfig, DataInfo, build_data
from cmtkd.engine import distributed
from cmtkd.engine.trainer import (CHECKPOINT, build_optimizer, load_student, seed_everything, setup_runtime,
                                  train_step)
from cmtkd.registry import get_method, method_names

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from synthetic_cifar import write_synthetic_cifar100  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else os.environ.get("CMTKD_CUDA_TESTS_DEVICE", "")
ON_CUDA = DEVICE == "cuda"
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not DEVICE, reason="no CUDA device: the GPU path is checked by `make gpu-check` on a GPU machine"),
]
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="no CUDA device: this check needs CUDA itself (make gpu-check)")

# Sizes: CUDA runs are still small (seconds each); the CPU self-check is smaller.
SIZES = {"train": 5000, "test": 1000, "width": 0.25, "batch": 256} if ON_CUDA else \
        {"train": 1200, "test": 200, "width": 0.125, "batch": 128}
TIMING = ("time_s", "images_per_s")

# The fast path against the fp32 step (TF32 off) on the same weights and batch, ResNet-18 (CIFAR stem),
# at initialisation. bf16 keeps 8 mantissa bits (relative rounding 2^-9), accumulated in fp32.
# Measured on CPU (bf16 autocast; width 0.25, batch 32): fp logits 1.2 %, loss 2e-5, gradient cosine 0.957
# (BatchNorm parameters' gradients are the noisiest, cosine 0.87).
# The W2A2 network is NOT comparable step by step under ANY change of arithmetic: values within rounding of
# a 2-bit activation threshold land on the next level and the flips propagate through the layers. In bf16 on
# CPU: logits 29 %, gradient cosine 0.03. In fp32 with channels_last + compile alone, on an NVIDIA H200
# (torch 2.11, width 1, batch 128; benchmarks/results/gpu-nvidia-h200-2026-11-27.csv): logits 29 %, loss
# 6e-4, gradient cosine 0.35 (on CPU at width 0.25: 1e-7, as cuDNN's channels_last kernels sum in another
# order than the contiguous ones and the CPU's do not). So the W2A2 network is held to its loss value only,
# and what compilation does to quantization is checked where no flip can propagate: on the quantizers
# themselves (test_compiled_quantizers_match_eager). bf16 QAT's end result is an accuracy question (digits,
# W2A2: 90.2 % bf16 vs 91.4 % fp32), outside a unit test.
FAST_PATH_TOLERANCE = {
    ("fp", "bf16"): {"logits_rel_l2": 0.05, "loss_rel": 0.01, "grad_cosine_min": 0.80},
    ("qat", "none"): {"logits_rel_l2": float("inf"), "loss_rel": 0.01, "grad_cosine_min": -1.0},
    ("qat", "bf16"): {"logits_rel_l2": float("inf"), "loss_rel": 0.05, "grad_cosine_min": -1.0},
}


# ------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    return write_synthetic_cifar100(tmp_path_factory.mktemp("cifar"), SIZES["train"], SIZES["test"], seed=0)


def run_args(root: Path, method: str = "qat", epochs: int = 1, seed: int = 0, width: float | None = None,
             bits: int | None = 2, method_args: dict | None = None) -> list[str]:
    args = ["--method", method, "--arch", "resnet18", "--dataset", "cifar100", "--device", DEVICE,
            "--epochs", str(epochs), "--seed", str(seed), "--threads", "4",
            "--set", f"data.root={root}", "--set", f"data.batch_size={SIZES['batch']}",
            "--set", f"model.width={width or SIZES['width']}", "--set", "train.progress=none"]
    if bits is not None and not method_entry(method).full_precision:  # fp, cmtkd-teachers: no student bits
        args += ["--w-bits", str(bits), "--a-bits", str(bits)]
    for key, value in (method_args or {}).items():
        args += ["--set", f"method_args.{key}={json.dumps(value)}"]
    return args


def env() -> dict:
    out = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="4")
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), out.get("PYTHONPATH")]))
    return out


def cli_subprocess(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cmtkd.cli", *args], cwd=REPO_ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(fh)]


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def student_state(run_dir: Path) -> dict:
    model, _ = load_student(run_dir, torch.device("cpu"))
    return model.state_dict()


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical: selected student, every history value (timing aside) and the test metrics."""
    sa, sb = student_state(a), student_state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"student tensor {key} differs between {a.name} and {b.name}"
    assert history(a) == history(b)
    for key in ("top1", "top5", "best_val_epoch", "best_val_top1"):
        assert metrics(a)[key] == metrics(b)[key], key


# -------------------------------------------------------------------------- every method on CUDA
@pytest.fixture(scope="module")
def teachers(cifar_root, tmp_path_factory) -> dict[str, str]:
    """Pre-trained (1 epoch) teachers for the methods that load them: fp, W8A8 and W4A4 QAT, and a
    teachers-only run (cmtkd-teachers, W8A8 + W4A4 fused) for cmtkd-frozen."""
    root = tmp_path_factory.mktemp("teachers")
    out = {}
    for name, method, bits, method_args in (("fp", "fp", None, None), ("w8", "qat", 8, None), ("w4", "qat", 4, None),
                                            ("joint", "cmtkd-teachers", None, {"teacher_bits": [8, 4]})):
        assert main(["train", *run_args(cifar_root, method, bits=bits, method_args=method_args),
                     "--out", str(root / name)]) == 0
        out[name] = str(root / name)
    return out


def method_args_for(method: str, teachers: dict[str, str]) -> dict:
    if method in ("kd", "kd-at"):
        return {"teacher": teachers["fp"]}
    if method == "mtkd":
        return {"teachers": [teachers["w8"], teachers["w4"]]}
    if method == "cmtkd-1t":
        return {"teacher_bits": [8]}
    if method == "cmtkd-frozen":
        return {"teacher_bits": [8, 4], "teachers_run": teachers["joint"]}
    if method == "dml" or method.startswith("cmtkd"):
        return {"teacher_bits": [8, 4]}
    return {}


@pytest.mark.parametrize("method", method_names())
def test_every_method_trains_an_epoch_on_the_device(method, cifar_root, teachers, tmp_path, capsys):
    out = tmp_path / method
    assert main(["train", *run_args(cifar_root, method, method_args=method_args_for(method, teachers)),
                 "--out", str(out)]) == 0
    logged = capsys.readouterr().out
    assert f"on {DEVICE}" in logged  # the run says which device it used
    result = metrics(out)
    assert result["env"]["device"] == DEVICE
    assert result["images_per_s"] > 0 and 0 <= result["top1"] <= 100
    assert all(v == "" or float(v) == float(v) for row in history(out) for v in row.values())  # no NaN


@cuda_only
@pytest.mark.parametrize("deterministic", [True, False])
def test_cudnn_autotunes_only_without_determinism(deterministic):
    """A run that need not repeat bit for bit lets cuDNN time its convolution algorithms (the fastest per
    shape); a deterministic one never does (timing-dependent picks)."""
    saved = (torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        setup_runtime(build_config([{"train": {"device": "cuda", "deterministic": deterministic}}]))
        assert torch.backends.cudnn.benchmark is (not deterministic)
    finally:
        torch.backends.cudnn.benchmark = saved[0]
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])


@cuda_only
def test_quantized_conv_is_exact_on_cuda_without_tf32(capsys):
    """Ledger W18 on the device: a W2A2 conv reading HWGQ activation values under bf16 autocast equals the
    float64 conv of the same values within fp32 summation error with ``train.tf32: false``; with TF32 allowed
    (the default) the error stays within TF32's rounding of the activations (2^-11 of each term), whatever
    algorithm cuDNN picks. Both errors are printed (``-s``) for the check's log."""
    from cmtkd.quant import HWGQ, QConv2d

    torch.manual_seed(0)
    conv = QConv2d(64, 64, 3, padding=1, w_bits=2, bias=False)
    x = HWGQ(2)(torch.randn(32, 64, 16, 16))  # values s * code, as the models' layers read them
    w = conv.weight_quantizer(conv.weight).detach()
    reference = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    bound = torch.nn.functional.conv2d(x.double().abs(), w.double().abs(), padding=1)  # sum of |terms|
    conv, x = conv.cuda(), x.cuda()
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    errors = {}
    try:
        for tf32 in (False, True):
            setup_runtime(build_config([{"train": {"device": "cuda", "deterministic": False, "tf32": tf32}}]))
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                out = conv(x)
            assert out.dtype == torch.float32
            errors[tf32] = float(((out.double().cpu() - reference).abs() / bound.clamp_min(1e-30)).max())
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    print(f"W2A2 conv, error / sum of |terms|: tf32 off {errors[False]:.2e}, tf32 on {errors[True]:.2e}")
    assert errors[False] <= 1e-6
    assert errors[True] <= 2.0**-11 + 1e-6


@cuda_only
def test_no_host_synchronisation_inside_a_training_step(cifar_root):
    """Batches from the GPU-resident pipeline and whole optimizer steps (the trainer's loop body) raise
    under ``set_sync_debug_mode("error")`` if anything in them waits for the GPU."""
    for method, args in (("qat", {}), ("cmtkd", {"teacher_bits": [8, 4]})):
        cfg = build_config([{"method": method, "w_bits": 2, "a_bits": 2, "model": {"width": SIZES["width"]},
                             "data": {"name": "cifar100", "root": str(cifar_root), "batch_size": SIZES["batch"]},
                             "train": {"device": "cuda", "amp": "bf16", "channels_last": True}, "method_args": args}])
        device = setup_runtime(cfg)
        data = build_data(cfg.data, device)
        seed_everything(0)
        model = get_method(method)(cfg, data.info).to(device).to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, cfg)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        batches = data.train_batches(0, 0)
        images, targets = next(batches)  # the epoch's set-up (one host-to-device copy of its random draws)
        train_step(model, optimizer, scaler, images, targets, cfg, device)  # warm-up: lazy CUDA set-up
        torch.cuda.synchronize()
        sums, correct = {}, torch.zeros((), dtype=torch.long, device=device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                images, targets = next(batches)
                logits, losses, loss = train_step(model, optimizer, scaler, images, targets, cfg, device)
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0) + v.detach().float()
                correct += logits.detach().argmax(1).eq(targets).sum()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert torch.isfinite(torch.stack(list(sums.values()))).all()


# --------------------------------------------------------------------- exactness on the device
@pytest.mark.parametrize("method,args", [("qat", {}), ("cmtkd", {"teacher_bits": [8, 4]})])
def test_same_seed_twice_gives_bit_identical_runs(method, args, cifar_root, tmp_path):
    for name in ("a", "b"):
        assert main(["train", *run_args(cifar_root, method, epochs=2, seed=3, method_args=args),
                     "--out", str(tmp_path / name)]) == 0
    assert_same_run(tmp_path / "a", tmp_path / "b")


def test_killed_run_resumes_bit_identical(cifar_root, tmp_path):
    args = ["train", *run_args(cifar_root, "qat", epochs=4, seed=5, width=0.5)]
    reference = cli_subprocess(*args, "--out", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "cmtkd.cli", *args, "--out", str(killed)], cwd=REPO_ROOT,
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (killed / CHECKPOINT).exists():
        if proc.poll() is not None:
            pytest.fail(f"run exited (rc {proc.returncode}) before its first checkpoint: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no checkpoint after 300 s")
        time.sleep(0.01)
    finished_before_kill = (killed / "metrics.json").exists()
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not finished_before_kill, "the run finished before it could be killed"
    resumed = cli_subprocess(*args, "--out", str(killed))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after epoch" in resumed.stdout
    assert_same_run(killed, tmp_path / "reference")


# ------------------------------------------------------------------------- the fast path vs fp32
def fast_path_deviation(method: str, width: float, batch: int, amp: str = "bf16") -> dict:
    """One training forward/backward of ``method`` (ResNet-18, CIFAR stem, W2A2 unless fp) in fp32 and with
    channels_last + torch.compile (+ bf16 autocast unless ``amp`` is none), from the same weights and batch."""
    device = torch.device(DEVICE)
    info = DataInfo("cifar100", 100, 3, 32, "cifar", 50000, 0, 0)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 32, 32, generator=generator).to(device)
    targets = torch.randint(0, 100, (batch,), generator=generator).to(device)
    results = {}
    for fast in (False, True):
        cfg = build_config([{"method": method, "model": {"width": width},
                             "train": {"device": DEVICE, "amp": amp if fast else "none", "channels_last": fast,
                                       "compile": fast, "deterministic": False}}])
        torch.manual_seed(0)
        model = get_method(method)(cfg, info).to(device).train()
        forward = model.forward_train
        x = images
        if fast:
            model = model.to(memory_format=torch.channels_last)
            # W2A2 in bf16 is held to its loss only (above): not worth a compilation of the GPU check's time
            forward = model.forward_train if (method, amp) == ("qat", "bf16") else torch.compile(model.forward_train)
            x = images.contiguous(memory_format=torch.channels_last)
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # a true fp32 reference
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast and amp == "bf16"):
                logits, losses = forward(x, targets)
            loss = sum(losses.values())
            loss.backward()
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
        results[fast] = (logits.detach().float(), float(loss.detach()), grads)
    (ref_logits, ref_loss, ref_grad), (fast_logits, fast_loss, fast_grad) = results[False], results[True]
    return {"logits_rel_l2": float((fast_logits - ref_logits).norm() / ref_logits.norm()),
            "loss_rel": abs(fast_loss - ref_loss) / abs(ref_loss),
            "grad_cosine": float(torch.nn.functional.cosine_similarity(fast_grad, ref_grad, dim=0))}


@pytest.mark.parametrize("method,amp", list(FAST_PATH_TOLERANCE))
def test_bf16_channels_last_compile_matches_fp32(method, amp):
    width, batch = (1.0, 128) if ON_CUDA else (0.25, 32)
    got = fast_path_deviation(method, width, batch, amp)
    bound = FAST_PATH_TOLERANCE[method, amp]
    print(f"{method} {amp}: {got}")
    assert got["logits_rel_l2"] <= bound["logits_rel_l2"], got
    assert got["loss_rel"] <= bound["loss_rel"], got
    assert got["grad_cosine"] >= bound["grad_cosine_min"], got


# The quantizers the paper's networks use (HWGQ activations, Gaussian 2-bit weights) and a learned-step
# one (LSQ, whose step gradient sums over the tensor), each compiled against eager on the same input.
QUANTIZER_CASES = [("act", "hwgq"), ("act", "lsq"), ("weight", "gaussian")]


@pytest.mark.parametrize("kind,name", QUANTIZER_CASES)
def test_compiled_quantizers_match_eager(kind, name):
    """torch.compile gives a quantizer's levels and straight-through gradients unchanged: the same level for
    every value except those on a level boundary to within rounding (a fused kernel may compute x / step in
    another order), and the same input and parameter gradients (up to rounding) wherever the levels agree."""
    from cmtkd.quant import make_act_quantizer, make_weight_quantizer

    device = torch.device(DEVICE)
    generator = torch.Generator().manual_seed(0)
    shape = (128, 64, 16, 16) if kind == "act" else (256, 128, 3, 3)
    x = torch.randn(shape, generator=generator).to(device)
    upstream = torch.randn(shape, generator=generator).to(device)  # a gradient from above that is not all ones
    got = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        quantizer = (make_act_quantizer if kind == "act" else make_weight_quantizer)(name, 2).to(device).train()
        forward = torch.compile(quantizer) if compiled else quantizer
        inp = x.clone().requires_grad_(True)
        out = forward(inp)
        (out * upstream).sum().backward()
        got[compiled] = (out.detach(), inp.grad.detach(), [p.grad.detach().clone() for p in quantizer.parameters()
                                                          if p.grad is not None])
    (out_e, grad_e, params_e), (out_c, grad_c, params_c) = got[False], got[True]
    # Same level: equal up to rounding of the step itself (LSQ's data-dependent initial step, a mean over the
    # tensor, may differ in its last bit when compiled); another level differs by a whole step.
    same = torch.isclose(out_e, out_c, rtol=1e-5, atol=1e-7)
    assert same.float().mean().item() >= 1 - 1e-4, f"{(~same).sum().item()} of {same.numel()} levels differ"
    assert torch.allclose(grad_e[same], grad_c[same], rtol=1e-5, atol=1e-7)
    assert len(params_e) == len(params_c)
    for a, b in zip(params_e, params_c):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6), (name, a, b)


# -------------------------------------------------------------------------- GPU-resident data
@cuda_only
def test_gpu_pipeline_yields_the_cpu_pipelines_batches(cifar_root):
    cfg = DataConfig(name="cifar100", root=str(cifar_root), batch_size=200)
    on_gpu, on_cpu = build_data(cfg, "cuda"), build_data(cfg, "cpu")
    assert on_gpu.splits["train"].images.is_cuda  # stored on the GPU once, not copied per batch
    for seed, epoch in ((0, 0), (0, 1), (7, 3)):
        pairs = list(zip(on_gpu.train_batches(epoch, seed), on_cpu.train_batches(epoch, seed), strict=True))
        assert len(pairs) == on_cpu.steps_per_epoch()
        for (gi, gt), (ci, ct) in pairs:
            assert gi.is_cuda and torch.equal(gi.cpu(), ci) and torch.equal(gt.cpu(), ct)
    for split in ("val", "test"):
        for (gi, gt), (ci, ct) in zip(on_gpu.eval_batches(split), on_cpu.eval_batches(split), strict=True):
            assert torch.equal(gi.cpu(), ci) and torch.equal(gt.cpu(), ct)


# ------------------------------------------------------------------------------------ torchrun
@cuda_only
def test_one_process_torchrun_equals_a_plain_run(cifar_root, tmp_path):
    args = ["train", *run_args(cifar_root, "qat", epochs=2, seed=2)]
    plain = cli_subprocess(*args, "--out", str(tmp_path / "plain"))
    assert plain.returncode == 0, plain.stderr[-3000:]
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                               "-m", "cmtkd.cli", *args, "--out", str(tmp_path / "torchrun")], cwd=REPO_ROOT,
                              env=env(), capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert_same_run(tmp_path / "plain", tmp_path / "torchrun")


STEPS = 3


def _plain_or_ddp_steps(ddp: bool, root: str) -> dict:
    cfg = build_config([{"method": "qat", "model": {"width": 0.25},
                         "data": {"name": "cifar100", "root": root, "batch_size": 128}, "train": {"device": "cuda"}}])
    device = setup_runtime(cfg)
    data = build_data(cfg.data, device)
    seed_everything(0)
    model = get_method("qat")(cfg, data.info).to(device).train()
    forward = None
    if ddp:
        forward = torch.nn.parallel.DistributedDataParallel(distributed.TrainingForward(model), device_ids=[0])
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    for _, (images, targets) in zip(range(STEPS), data.train_batches(0, 0)):
        train_step(model, optimizer, scaler, images, targets, cfg, device, forward=forward)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _nccl_worker(rank: int, rendezvous: str, root: str, out: str) -> None:
    dist.init_process_group("nccl", init_method=f"file://{rendezvous}", rank=rank, world_size=1)
    try:
        assert dist.get_backend() == "nccl"
        torch.save(_plain_or_ddp_steps(True, root), out)
    finally:
        dist.destroy_process_group()


@cuda_only
def test_ddp_over_a_one_process_nccl_group_takes_the_plain_steps(cifar_root, tmp_path):
    out = tmp_path / "ddp.pt"
    mp.start_processes(_nccl_worker, args=(str(tmp_path / "rendezvous"), str(cifar_root), str(out)), nprocs=1,
                       start_method="spawn")
    ddp_state = torch.load(out, weights_only=True)
    plain_state = _plain_or_ddp_steps(False, str(cifar_root))
    assert ddp_state.keys() == plain_state.keys()
    for key, value in plain_state.items():
        assert torch.equal(ddp_state[key], value), f"{key} differs after {STEPS} steps"
