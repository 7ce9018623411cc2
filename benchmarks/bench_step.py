"""Throughput of one training step (forward + backward + SGD step) of the full-precision network
against the same network quantized to W2A2 (quantization-aware training), on CPU.

The quantizers run in every forward pass (weights) and after every BN (activations), so QAT costs
more than FP training; this measures how much. Target: QAT step time <= 1.35x the FP step time on
the CIFAR ResNet-18 (32x32x3 inputs, 100 classes).

    python benchmarks/bench_step.py --arch resnet18 --width 1.0 --batch 128 --threads 2

FP and QAT timings are interleaved (FP, QAT, FP, QAT, ...) so that load from other processes on a
shared machine hits both alike; each figure is the median over ``--repeats`` timings of ``--steps``
steps, after ``--warmup`` untimed steps.
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cmtkd.models import ARCHS, build_model  # noqa: E402

TARGET_RATIO = 1.35
CONFIGS = {"fp": (32, 32), "w2a2": (2, 2)}


def make_step(arch: str = "resnet18", w_bits: int = 32, a_bits: int = 32, width: float = 1.0, batch: int = 128,
              num_classes: int = 100, image_size: int = 32, amp: str = "none", seed: int = 0) -> Callable[[], None]:
    """A closure that runs one SGD training step of a fresh CIFAR-variant network on a fixed batch."""
    torch.manual_seed(seed)
    model = build_model(arch, num_classes, w_bits, a_bits, variant="cifar", width=width).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    images = torch.randn(batch, 3, image_size, image_size)
    targets = torch.randint(0, num_classes, (batch,))

    def autocast():
        if amp == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step() -> None:
        with autocast():
            logits = model(images)
        loss = torch.nn.functional.cross_entropy(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def time_steps(step: Callable[[], None], steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - t0


def measure(args) -> dict[str, list[float]]:
    """Seconds per step of every config, ``args.repeats`` interleaved timings each."""
    steps = {name: make_step(args.arch, w, a, args.width, args.batch, amp=args.amp) for name, (w, a) in CONFIGS.items()}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            seconds[name].append(time_steps(step, args.steps) / args.steps)
    return seconds


def report(args, seconds: dict[str, list[float]]) -> float:
    print(f"# {args.arch} (cifar variant, width {args.width}, 100 classes, 32x32x3), batch {args.batch}, "
          f"amp {args.amp}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}")
    print(f"# median of {args.repeats} timings x {args.steps} steps, after {args.warmup} warm-up steps")
    print(f"{'config':8s} {'images/s':>10s} {'ms/step':>9s} {'min ms':>8s} {'max ms':>8s}")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name:8s} {args.batch / median:10.1f} {1e3 * median:9.1f} {1e3 * min(values):8.1f} "
              f"{1e3 * max(values):8.1f}")
    ratio = statistics.median(seconds["w2a2"]) / statistics.median(seconds["fp"])
    verdict = "ok" if ratio <= TARGET_RATIO else "ABOVE TARGET"
    print(f"QAT/FP step-time ratio: {ratio:.3f} (target <= {TARGET_RATIO}): {verdict}")
    return ratio


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18", choices=list(ARCHS))
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier (model.width)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--steps", type=int, default=5, help="steps per timing")
    p.add_argument("--repeats", type=int, default=5, help="timings per config (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per config first")
    p.add_argument("--amp", default="none", choices=("none", "bf16"), help="CPU autocast dtype")
    p.add_argument("--check", action="store_true", help=f"exit 1 if the ratio exceeds {TARGET_RATIO}")
    args = p.parse_args(argv)
    check_sizes(p, args, ("batch", "threads", "steps", "repeats"))
    return args


def check_sizes(parser: argparse.ArgumentParser, args: argparse.Namespace, counts: tuple[str, ...]) -> None:
    """argparse errors for a count below 1, a negative --warmup or a width that is not positive."""
    for name in counts:
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 0 or args.width <= 0:
        parser.error("--warmup must be >= 0 and --width > 0")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ratio = report(args, measure(args))
    return 1 if args.check and ratio > TARGET_RATIO else 0


if __name__ == "__main__":
    sys.exit(main())
