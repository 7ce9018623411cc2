"""benchmarks/bench_hwgq.py: the straight-through HWGQ it times against is the formulation the single
autograd node replaced (same numbers), the switch restores HWGQ, and the script runs at toy size."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_hwgq  # noqa: E402

from cmtkd.quant import HWGQ  # noqa: E402


def test_switch_gives_the_same_numbers_and_restores_hwgq():
    quantizer = HWGQ(2)
    x = torch.randn(64, 8, 4, 4)
    node_forward = HWGQ.forward
    expected, expected_codes = quantizer(x), quantizer.grid(x).codes
    with bench_hwgq.straight_through_hwgq(True):
        assert HWGQ.forward is not node_forward
        assert torch.equal(quantizer(x), expected) and torch.equal(quantizer.grid(x).codes, expected_codes)
    assert HWGQ.forward is node_forward


def test_runs_at_toy_size(capsys):
    assert bench_hwgq.main(["--arch", "alexnet", "--width", "0.125", "--batch", "8", "--threads", "1",
                            "--rounds", "1", "--steps", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "qat/qat-ste per round" in out and "ms/step" in out
