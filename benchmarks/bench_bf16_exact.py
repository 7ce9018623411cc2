"""Cost of exact low-bit arithmetic under bf16 autocast: training-step time of the W2A2 QAT student
and of the 8/6/4-bit teachers with ``train.amp=bf16`` (quantized layers on exact integer codes,
see ``cmtkd/quant/layers.py``) against fp32, on CPU.  No target: this is a measurement.

    python benchmarks/bench_bf16_exact.py --width 1.0 --batch 128 --threads 2

Per config, the modes are timed interleaved in every round (fp32, bf16-exact, bf16-lossy, fp32,
...) so load from other processes on a shared machine hits all alike; the ratio bf16-exact/fp32 is
taken per round and its minimum and median are reported.  ``bf16-lossy`` is the plain autocast
path the exact one replaced (quantized operands cast to bf16); ``--no-lossy`` skips it.

``--fidelity`` measures the effect instead of the cost: one training-mode forward pass of each
config on a fixed batch, and per mode the share of HWGQ activation codes that differ from the
fp32 pass and the largest logit difference relative to the largest fp32 logit.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_step import check_sizes, make_step, time_steps  # noqa: E402

from cmtkd.models import build_model  # noqa: E402
from cmtkd.quant import HWGQ, QConv2d, QLinear  # noqa: E402

CONFIGS = {"W2A2": (2, 2), "W8A8": (8, 8), "W6A6": (6, 6), "W4A4": (4, 4)}
"""The QAT student of the default suite and CMT-KD's default teachers (method_args.teacher_bits)."""


@contextlib.contextmanager
def exact_path(enabled: bool):
    """Switch the quantized layers' exact code path under autocast (a class attribute)."""
    saved = QConv2d.exact_under_autocast, QLinear.exact_under_autocast
    QConv2d.exact_under_autocast = QLinear.exact_under_autocast = enabled
    try:
        yield
    finally:
        QConv2d.exact_under_autocast, QLinear.exact_under_autocast = saved


def cpu_model_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def measure(args) -> dict[str, dict[str, list[float]]]:
    """Seconds per step, ``seconds[config][mode]``, one entry per round."""
    modes = {"fp32": ("none", True), "bf16-exact": ("bf16", True)}
    if args.lossy:
        modes["bf16-lossy"] = ("bf16", False)
    seconds: dict[str, dict[str, list[float]]] = {}
    for config in args.configs:
        w_bits, a_bits = CONFIGS[config]
        steps = {mode: make_step(args.arch, w_bits, a_bits, args.width, args.batch, amp=amp)
                 for mode, (amp, _) in modes.items()}
        for mode, step in steps.items():
            with exact_path(modes[mode][1]):
                for _ in range(args.warmup):
                    step()
        seconds[config] = {mode: [] for mode in steps}
        for _ in range(args.rounds):
            for mode, step in steps.items():
                with exact_path(modes[mode][1]):
                    seconds[config][mode].append(time_steps(step, args.steps) / args.steps)
        print_config(config, seconds[config], args.batch)
    return seconds


def print_config(config: str, by_mode: dict[str, list[float]], batch: int) -> None:
    fp32 = by_mode["fp32"]
    for mode, values in by_mode.items():
        median = statistics.median(values)
        line = f"{config:5s} {mode:11s} {1e3 * median:9.1f} ms/step {batch / median:8.1f} img/s"
        if mode != "fp32":
            ratios = [v / f for v, f in zip(values, fp32)]
            line += f"   {mode}/fp32 per round: median {statistics.median(ratios):.3f}, min {min(ratios):.3f}"
        print(line, flush=True)


def fidelity(args) -> None:
    """Share of activation codes that differ from fp32, and relative logit error, per mode."""
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, 32, 32)
    print(f"{'config':5s} {'mode':11s} {'codes != fp32':>14s} {'max |logit - fp32| / max |fp32|':>32s}")
    for config in args.configs:
        w_bits, a_bits = CONFIGS[config]
        torch.manual_seed(0)
        model = build_model(args.arch, 100, w_bits, a_bits, variant="cifar", width=args.width,
                            policy=args.policy).train()
        codes: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda m, i, o: codes.append(torch.round(o.detach() / m.step)))
                 for m in model.modules() if isinstance(m, HWGQ)]

        def run(amp: str, exact: bool):
            codes.clear()
            with exact_path(exact), torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=amp == "bf16"):
                # BN in training mode normalises with batch statistics; keep the running ones unchanged.
                state = {k: v.clone() for k, v in model.state_dict().items()}
                logits = model(images).float()
                model.load_state_dict(state)
            return logits, [c.clone() for c in codes]

        reference, reference_codes = run("none", True)
        for mode, exact in (("bf16-exact", True), ("bf16-lossy", False)):
            logits, mode_codes = run("bf16", exact)
            differ = sum(int((a != b).sum()) for a, b in zip(mode_codes, reference_codes))
            total = sum(c.numel() for c in reference_codes)
            error = float((logits - reference).abs().max() / reference.abs().max())
            print(f"{config:5s} {mode:11s} {differ / total:14.2e} {error:32.2e}", flush=True)
        for hook in hooks:
            hook.remove()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier (model.width)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--steps", type=int, default=1, help="steps per timing")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (one timing per mode each)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per mode first")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--no-lossy", dest="lossy", action="store_false", help="skip the plain (lossy) bf16 path")
    p.add_argument("--fidelity", action="store_true", help="measure the numerical effect, not the time")
    p.add_argument("--policy", default="fp-first-last",
                   help="model.policy for --fidelity (fp-first-last keeps the stem conv and the FC in bf16)")
    args = p.parse_args(argv)
    check_sizes(p, args, ("batch", "threads", "steps", "rounds"))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# {args.arch} (cifar variant, width {args.width}, 100 classes, 32x32x3), batch {args.batch}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, CPU: {cpu_model_name()}")
    if args.fidelity:
        fidelity(args)
        return 0
    print(f"# {args.rounds} interleaved rounds x {args.steps} steps, after {args.warmup} warm-up steps per mode")
    measure(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
