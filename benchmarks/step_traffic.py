"""What one training step asks of a device, counted rather than timed: every aten operator of the forward and
backward pass (each one kernel launch in eager mode on a GPU), grouped into convolutions/matmuls, batch norm,
element-wise and views, with the bytes its tensor operands and results occupy, and the activation bytes
autograd keeps for the backward pass. The counts depend on the network, batch, precision and memory format,
not on the device, so a CPU measures them for a GPU: they bound what a bandwidth-bound kernel class can
cost there (bytes / the device's copy bandwidth) without a GPU.

    python benchmarks/step_traffic.py --arch resnet18 --batch 256 --amp bf16 --channels-last

Bytes are those of each operator's inputs and outputs (an upper bound on what it reads and writes; a view
moves nothing and is listed apart). The optimizer step is left out (the same for FP and QAT).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cmtkd.models import ARCHS, build_model  # noqa: E402

CLASSES = ("conv/matmul", "batch norm", "element-wise", "views")
_MATMUL = ("convolution", "mm", "addmm", "bmm", "linear")
_VIEWS = {"view", "_unsafe_view", "t", "transpose", "expand", "as_strided", "detach", "alias", "reshape",
          "permute", "unsqueeze", "squeeze", "_reshape_alias", "slice", "select", "split", "unbind"}


def op_class(name: str) -> str:
    """The class of an aten operator (its overload packet's name, e.g. ``convolution_backward``)."""
    if name in _VIEWS:
        return "views"
    if "batch_norm" in name:
        return "batch norm"
    if any(name == m or name.startswith(m + "_") for m in _MATMUL):
        return "conv/matmul"
    return "element-wise"


class OpCounter(TorchDispatchMode):
    """Counts every aten call made while active, and the bytes of its tensor arguments and results."""

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()
        self.bytes: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        kind = op_class(func.overloadpacket.__name__)
        self.calls[kind] += 1
        self.bytes[kind] += sum(t.numel() * t.element_size() for t in tree_flatten((args, kwargs, out))[0]
                                if isinstance(t, torch.Tensor))
        return out


def step_traffic(arch: str, bits: int, batch: int, amp: str = "none", channels_last: bool = False,
                 width: float = 1.0, seed: int = 0) -> dict:
    """Operator calls and bytes per class for one forward + backward of a CIFAR-variant network at W/A
    ``bits`` (32 = FP), and the bytes autograd saved for the backward pass (each storage counted once)."""
    torch.manual_seed(seed)
    model = build_model(arch, 100, bits, bits, variant="cifar", width=width).train()
    images = torch.randn(batch, 3, 32, 32)
    targets = torch.randint(0, 100, (batch,))
    if channels_last:
        model, images = model.to(memory_format=torch.channels_last), images.to(memory_format=torch.channels_last)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if amp == "bf16" else contextlib.nullcontext()
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    counter = OpCounter()
    with counter:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), autocast:
            logits = model(images)
        torch.nn.functional.cross_entropy(logits.float(), targets).backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = sum(n for ptr, n in storages.items() if ptr not in params)
    return {"calls": dict(counter.calls), "bytes": dict(counter.bytes), "saved_bytes": saved}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--arch", default="resnet18", choices=sorted(ARCHS))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--bits", type=int, nargs="+", default=[32, 2], help="W/A bit-widths to compare (32 = FP)")
    p.add_argument("--amp", choices=("none", "bf16"), default="bf16")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--bandwidth", type=float, default=4.3,
                   help="device copy bandwidth in TB/s (read + write) for the time bound; 4.3 = what a "
                        "device-to-device copy reached on the H200s lent to this project")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    if a.batch < 1:
        p.error("--batch must be >= 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"# one training step (forward + backward, no optimizer), {a.arch} CIFAR width {a.width}, batch {a.batch}, "
          f"amp {a.amp}, channels_last {a.channels_last}, torch {torch.__version__}")
    print(f"# bytes: operands + results of each aten call; bound: bytes / {a.bandwidth} TB/s\n")
    print("| W/A | class | calls | GiB | bound ms |")
    print("| --- | --- | ---: | ---: | ---: |")
    for bits in a.bits:
        result = step_traffic(a.arch, bits, a.batch, a.amp, a.channels_last, a.width)
        label = "FP" if bits == 32 else f"W{bits}A{bits}"
        for kind in CLASSES:
            n, b = result["calls"].get(kind, 0), result["bytes"].get(kind, 0)
            bound = "" if kind == "views" else f"{1e3 * b / (a.bandwidth * 1e12):.2f}"
            print(f"| {label} | {kind} | {n} | {b / 2**30:.2f} | {bound} |")
        print(f"| {label} | saved for backward | | {result['saved_bytes'] / 2**30:.2f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
