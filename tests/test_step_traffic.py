"""benchmarks/step_traffic.py: operator classes, what one step counts, and the script at toy size."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import step_traffic  # noqa: E402


def test_operator_classes():
    assert step_traffic.op_class("convolution") == step_traffic.op_class("convolution_backward") == "conv/matmul"
    assert step_traffic.op_class("addmm") == step_traffic.op_class("mm") == "conv/matmul"
    assert step_traffic.op_class("native_batch_norm_backward") == "batch norm"
    assert step_traffic.op_class("hardtanh_backward") == step_traffic.op_class("mul") == "element-wise"
    assert step_traffic.op_class("mean") == step_traffic.op_class("round_") == "element-wise"
    assert step_traffic.op_class("detach") == step_traffic.op_class("view") == "views"


def test_counts_scale_with_the_batch_and_quantization_adds_element_wise_work():
    small = step_traffic.step_traffic("alexnet", 2, 4, width=0.125)
    large = step_traffic.step_traffic("alexnet", 2, 8, width=0.125)
    fp = step_traffic.step_traffic("alexnet", 32, 4, width=0.125)
    assert small["calls"] == large["calls"]  # the same operators, on larger tensors
    assert large["bytes"]["element-wise"] > small["bytes"]["element-wise"]
    assert large["saved_bytes"] > small["saved_bytes"] > 0
    assert small["calls"]["element-wise"] > fp["calls"]["element-wise"]
    assert small["calls"]["conv/matmul"] == fp["calls"]["conv/matmul"]


def test_runs_at_toy_size(capsys):
    assert step_traffic.main(["--arch", "alexnet", "--batch", "2", "--width", "0.125", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| W2A2 | element-wise |" in out and "| FP | saved for backward |" in out
