"""Benchmark suite: images/s of one training step for every method, side by side, with ratio columns.

Each case runs in a fresh child process (one after another, never two at once) so that its peak
memory is its own. On a shared machine the load changes while the cases run, so the cases are
interleaved over ``--rounds`` rounds (each round runs every case once, starting at a different case)
and every ratio is computed within a round, then reported as the median and the min..max over the
rounds. The machine's measured matmul peak is printed beside the throughput, with each case's
fraction of it (FLOPs of one step counted by ``torch.utils.flop_counter``). Printed as one Markdown
table; ``--csv`` also writes it.

    python benchmarks/suite.py                                  # CPU, ResNet-18 + AlexNet (CIFAR variants)
    python benchmarks/suite.py --archs resnet18 --width 0.5 --only fp qat cmtkd
    python benchmarks/suite.py --device cuda --amp bf16 --channels-last   # on a GPU machine

Columns: img/s and ms per step (median over the rounds of each round's median over --steps timed steps
after --warmup), peak memory above the idle process (CPU: max RSS; CUDA: max allocated; the largest
over the rounds), ``vs FP`` (step time / FP step time of the same round: median, and min..max),
``vs members`` (CMT-KD, DML and KDCL: step time / sum of the QAT step times of the student and each
teacher at its bit-width, same round), ``% peak`` (FLOPs per step / step time / measured peak of the
dtype the step computes in), ``data %`` (time to produce one augmented CIFAR batch / (that + step)).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

TEACHER_BITS = [8, 6, 4]
STUDENT_BITS = 2


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _make_teachers(arch: str, width: float, num_classes: int, folder: Path) -> dict[int, str]:
    """Random-weight teacher checkpoints in the model.pt format (speed does not depend on weights)."""
    from cmtkd.checkpoint import save_model
    from cmtkd.models import build_model

    paths = {}
    for bits in [32, *TEACHER_BITS]:
        cfg = dict(arch=arch, num_classes=num_classes, in_channels=3, variant="cifar", width=width,
                   w_bits=bits, a_bits=bits, policy="fp-first-last", weight_quant="auto", act_quant="hwgq",
                   quant_layout="conv-inputs")
        path = folder / f"teacher-{arch}-{bits}.pt"
        save_model(path, arch_config=cfg, state_dict=build_model(**cfg).state_dict(), method="qat",
                   selected_epoch=0, config_hash="bench")
        paths[bits] = str(path)
    return paths


def cases(teachers: dict[int, str]) -> list[tuple[str, str, int, dict]]:
    """(label, method, student bits, method_args)."""
    return [
        ("fp", "fp", 32, {}),
        ("qat", "qat", STUDENT_BITS, {}),
        *[(f"qat@{b}", "qat", b, {}) for b in TEACHER_BITS],
        ("kd", "kd", STUDENT_BITS, {"teacher": teachers[32]}),
        ("mtkd", "mtkd", STUDENT_BITS, {"teachers": [teachers[b] for b in TEACHER_BITS]}),
        ("dml", "dml", STUDENT_BITS, {"teacher_bits": TEACHER_BITS}),
        ("kdcl", "kdcl", STUDENT_BITS, {"teacher_bits": TEACHER_BITS}),
        ("cmtkd", "cmtkd", STUDENT_BITS, {"teacher_bits": TEACHER_BITS}),
    ]


def run_case(args: dict) -> dict:
    """Child process: build one method, time its training step."""
    import torch

    from cmtkd.config import build_config
    from cmtkd.data import DataInfo
    from cmtkd.engine.trainer import build_optimizer, setup_runtime, train_step
    from cmtkd.registry import get_method

    torch.set_num_threads(args["threads"])
    overrides = {"method": args["method"], "arch": args["arch"], "w_bits": args["bits"], "a_bits": args["bits"],
                 "model": {"width": args["width"]}, "method_args": args["method_args"],
                 "train": {"device": args["device"], "amp": args["amp"], "channels_last": args["channels_last"],
                           "deterministic": False}}
    cfg = build_config([overrides])
    device = setup_runtime(cfg)
    info = DataInfo(name="bench", num_classes=100, in_channels=3, image_size=32, variant="cifar",
                    num_train=50000, num_val=0, num_test=0)
    rss0 = _rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    method = get_method(cfg.method)(cfg, info).to(device)
    if cfg.train.channels_last:
        method = method.to(memory_format=torch.channels_last)
    if args["compile"]:
        method.forward_train = torch.compile(method.forward_train)
    method.train()
    optimizer = build_optimizer(method, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args["batch"], 3, 32, 32, generator=g).to(device)
    targets = torch.randint(0, 100, (args["batch"],), generator=g).to(device)

    def step():
        train_step(method, optimizer, scaler, images, targets, cfg, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:  # one (warm-up) step, counted
        step()
    for _ in range(max(0, args["warmup"] - 1)):
        step()
    times = []
    for _ in range(args["steps"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    ms = 1000 * statistics.median(times)
    if device.type == "cuda":
        mem = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
    return {"ms": ms, "img_s": args["batch"] / (ms / 1000), "mem_mib": mem, "flops": counter.get_total_flops()}


def matmul_peak_tflops(device: str, dtype_name: str, threads: int, n: int = 2048, repeats: int = 5) -> float:
    """Measured dense matrix-product rate (TFLOP/s) of this machine: the fastest of ``repeats`` timed products."""
    import torch

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    times = []
    for i in range(repeats + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e12  # the best: a peak, least disturbed by other load


def data_batch_ms(batch: int, device: str, threads: int) -> float:
    """Time to produce one augmented, normalized CIFAR-sized batch with the in-memory pipeline."""
    import torch

    from cmtkd.data import DataConfig, DataInfo
    from cmtkd.data.in_memory import Augmentation, TensorBundle, TensorSplit

    torch.set_num_threads(threads)
    n = 20 * batch
    g = torch.Generator().manual_seed(0)
    split = TensorSplit(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                        torch.randint(0, 100, (n,), generator=g))
    info = DataInfo("bench", 100, 3, 32, "cifar", n, 0, 0)
    cfg = DataConfig(name="cifar100", batch_size=batch, val_fraction=0.0)
    bundle = TensorBundle(info, split, split, split, (0.5,) * 3, (0.25,) * 3, Augmentation(4, True), cfg, device)
    for _ in bundle.train_batches(0, 0):  # warm-up
        pass
    t0 = time.perf_counter()
    steps = 0
    for images, _ in bundle.train_batches(1, 0):
        steps += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["resnet18", "alexnet"])
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile each method's forward_train")
    p.add_argument("--only", nargs="+", help="run only these case labels (e.g. fp qat cmtkd)")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved rounds (every case once per round; default 5: single rounds scatter by about +-8%% on a shared 2-core machine, so only the median over rounds means anything)")
    p.add_argument("--csv", help="also write the table as CSV here")
    a = p.parse_args(argv)

    import torch

    from cmtkd.engine.env import cpu_model

    if a.rounds < 1:
        p.error("--rounds must be >= 1")
    ctx = mp.get_context("spawn")
    rows = []
    members_of = ["qat", *[f"qat@{b}" for b in TEACHER_BITS]]
    with tempfile.TemporaryDirectory() as tmp:
        with ctx.Pool(1) as pool:
            data_ms = pool.apply(data_batch_ms, (a.batch, a.device, a.threads))
            dtype = "bfloat16" if a.amp == "bf16" else ("float16" if a.amp == "fp16" else "float32")
            peaks = {name: pool.apply(matmul_peak_tflops, (a.device, name, a.threads))
                     for name in dict.fromkeys(["float32", dtype])}
        for arch in a.archs:
            with ctx.Pool(1) as pool:
                teachers = pool.apply(_make_teachers, (arch, a.width, 100, Path(tmp)))
            selected = []
            for label, method, bits, margs in cases(teachers):
                members_needed = label in members_of and {"cmtkd", "dml", "kdcl"} & set(a.only or [])
                if a.only and label not in a.only and not members_needed:
                    continue
                selected.append((label, dict(method=method, arch=arch, bits=bits, method_args=margs, width=a.width,
                                             batch=a.batch, threads=a.threads, steps=a.steps, warmup=a.warmup,
                                             device=a.device, amp=a.amp, channels_last=a.channels_last,
                                             compile=a.compile)))
            rounds: list[dict[str, dict]] = []
            for r in range(a.rounds):
                shift = r % len(selected)  # each round starts at another case: none always runs first
                results = {}
                for label, args in selected[shift:] + selected[:shift]:
                    with ctx.Pool(1, maxtasksperchild=1) as pool:  # fresh process: its own peak memory
                        results[label] = pool.apply(run_case, (args,))
                    print(f"  round {r + 1}/{a.rounds} {arch:9s} {label:8s} {results[label]['img_s']:9.1f} img/s",
                          file=sys.stderr, flush=True)
                rounds.append(results)

            def per_round(fn) -> list[float]:
                return [fn(res) for res in rounds]

            for label, _ in selected:
                ms = per_round(lambda res: res[label]["ms"])
                flops = rounds[0][label]["flops"]
                med_ms = statistics.median(ms)
                row = {"arch": arch, "case": label, "img/s": round(a.batch / (med_ms / 1000), 1),
                       "ms/step": round(med_ms, 1), "peak MiB": round(max(per_round(lambda res: res[label]["mem_mib"])), 1),
                       "GFLOP/img": round(flops / a.batch / 1e9, 2),
                       "% peak": round(100 * flops / (med_ms / 1000) / 1e12 / peaks[dtype], 1)}
                if "fp" in rounds[0]:
                    ratios = per_round(lambda res: res[label]["ms"] / res["fp"]["ms"])
                    row["vs FP"] = round(statistics.median(ratios), 3)
                    row["vs FP min..max"] = f"{min(ratios):.2f}..{max(ratios):.2f}"
                if label in ("cmtkd", "dml", "kdcl") and all(k in rounds[0] for k in members_of):
                    ratios = per_round(lambda res: res[label]["ms"] / sum(res[k]["ms"] for k in members_of))
                    row["vs members"] = round(statistics.median(ratios), 3)
                    row["vs members min..max"] = f"{min(ratios):.2f}..{max(ratios):.2f}"
                row["data %"] = round(100 * data_ms / (data_ms + med_ms), 2)
                rows.append(row)
    import pandas as pd

    table = pd.DataFrame(rows)
    device = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU ({cpu_model()}), {a.threads} threads"
    print(f"\n# training-step benchmark: {device}, batch {a.batch}, width {a.width}, amp {a.amp}, "
          f"channels_last {a.channels_last}, compile {a.compile}, torch {torch.__version__}")
    print("# measured matmul peak: " + ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in peaks.items())
          + f"; {a.rounds} interleaved rounds (ratios within a round: median, min..max)")
    print(f"# student W{STUDENT_BITS}A{STUDENT_BITS}, teachers {TEACHER_BITS}; data batch {data_ms:.2f} ms\n")
    print(table.astype(object).fillna("").to_markdown(index=False))
    if a.csv:
        table.to_csv(a.csv, index=False)
    print(json.dumps({"device": device, "data_batch_ms": data_ms, "matmul_peak_tflops": peaks}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
