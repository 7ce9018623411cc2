"""What HWGQ's single autograd node (``cmtkd.quant.activations._ClippedRound``) saves: training-step time of
the W2A2 QAT network with HWGQ as that node against the same network with HWGQ written as the plain
straight-through sum it replaced (bit for bit the same numbers; tests/test_quant.py), and both against the
full-precision network, on CPU.  No target: this is a measurement.

    python benchmarks/bench_hwgq.py --arch resnet18 --width 0.5 --batch 128 --threads 2 --rounds 5

The three modes are timed interleaved in every round (fp, qat, qat-ste, fp, ...), so load from other
processes hits all alike; ratios are taken per round and their median and min are reported.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_bf16_exact import cpu_model_name  # noqa: E402
from bench_step import make_step, time_steps  # noqa: E402

from cmtkd.quant import HWGQ, Grid  # noqa: E402
from cmtkd.quant.common import straight_through  # noqa: E402


def _ste_forward(self, x):
    clipped = x.float().clamp(0.0, self.clip)
    return straight_through(clipped, torch.round(clipped / self.step) * self.step)


def _ste_grid(self, x):
    scaled = x.float().clamp(0.0, self.clip) / self.step
    return Grid(straight_through(scaled, torch.round(scaled)), self.step)


@contextlib.contextmanager
def straight_through_hwgq(enabled: bool):
    """HWGQ as the straight-through sum (the formulation before the single node), while enabled."""
    saved = HWGQ.forward, HWGQ.grid
    if enabled:
        HWGQ.forward, HWGQ.grid = _ste_forward, _ste_grid
    try:
        yield
    finally:
        HWGQ.forward, HWGQ.grid = saved


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--arch", default="resnet18", choices=("resnet18", "alexnet"))
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps per timing (default 5)")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    if min(args.width, args.batch, args.threads, args.rounds, args.steps) <= 0:
        parser.error("--width, --batch, --threads, --rounds and --steps must be positive")
    torch.set_num_threads(args.threads)
    modes = {"fp": ((32, 32), False), "qat": ((2, 2), False), "qat-ste": ((2, 2), True)}
    steps = {mode: make_step(args.arch, *bits, width=args.width, batch=args.batch) for mode, (bits, _) in modes.items()}
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    for mode, step in steps.items():
        with straight_through_hwgq(modes[mode][1]):
            for _ in range(args.warmup):
                step()
    for _ in range(args.rounds):
        for mode, step in steps.items():
            with straight_through_hwgq(modes[mode][1]):
                seconds[mode].append(time_steps(step, args.steps) / args.steps)
    print(f"{cpu_model_name()}, torch {torch.__version__}, {args.threads} threads; {args.arch} width {args.width}, "
          f"batch {args.batch}, {args.rounds} interleaved rounds of {args.steps} steps")
    for mode, values in seconds.items():
        print(f"  {mode:8s} {1e3 * statistics.median(values):8.1f} ms/step (median)")
    for a, b in (("qat", "fp"), ("qat-ste", "fp"), ("qat", "qat-ste")):
        ratios = [x / y for x, y in zip(seconds[a], seconds[b])]
        print(f"  {a}/{b} per round: median {statistics.median(ratios):.3f}, min {min(ratios):.3f}, "
              f"max {max(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
