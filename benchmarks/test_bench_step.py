"""pytest-benchmark version of bench_step.py (not part of the default test run, which collects tests/):

    .venv/bin/python -m pytest benchmarks/test_bench_step.py --benchmark-group-by=param:width

Sizes are small by default so it finishes in seconds on a laptop; set CMTKD_BENCH_WIDTH /
CMTKD_BENCH_BATCH / CMTKD_BENCH_THREADS for the full-size figure (1.0 / 128 / 2).
"""
from __future__ import annotations

import os

import pytest
import torch

from bench_step import CONFIGS, make_step

WIDTH = float(os.environ.get("CMTKD_BENCH_WIDTH", "0.25"))
BATCH = int(os.environ.get("CMTKD_BENCH_BATCH", "64"))
THREADS = int(os.environ.get("CMTKD_BENCH_THREADS", "1"))


@pytest.mark.parametrize("width", [WIDTH])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_train_step(benchmark, config, width):
    torch.set_num_threads(THREADS)
    w_bits, a_bits = CONFIGS[config]
    step = make_step("resnet18", w_bits, a_bits, width=width, batch=BATCH)
    benchmark.group = f"resnet18-cifar train step, width {width}, batch {BATCH}, {THREADS} threads"
    benchmark.extra_info.update(w_bits=w_bits, a_bits=a_bits, batch=BATCH, threads=THREADS)
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=2)
    benchmark.extra_info["images_per_s"] = BATCH / benchmark.stats.stats.median
