"""Multi-GPU data-parallel training: one process per GPU, started by ``torchrun``.

    torchrun --standalone --nproc_per_node=8 -m cmtkd.cli train --device cuda --out runs/x ...

``data.batch_size`` stays the GLOBAL batch: every optimizer step consumes the same images as the
single-process run, and rank r trains on the r-th contiguous slice of each global batch
(``DataBundle.train_batches(..., rank=, world_size=)``). DistributedDataParallel averages the
gradients, so with equal slices a step is the single-process step except for

* BatchNorm, whose batch statistics come from the rank's ``batch_size / world_size`` images
  (``train.sync_bn=true`` makes them global; CUDA only), and whose running statistics are rank 0's;
* floating-point summation order (the gradient all-reduce).

Rank 0 alone writes the run directory and logs; every rank reads the checkpoint when it resumes, so
the run directory must be visible to all ranks (one node, or a shared filesystem). All ranks share
one seed: the model initialisation is the same everywhere (DDP broadcasts rank 0's anyway) and any
method-side random choice stays in lockstep, which DDP needs (the same graph on every rank). After
every epoch the engine checks that all ranks hold bit-identical parameters and buffers.

Without torchrun (or with ``--nproc_per_node=1``) everything here is a no-op: a run is the ordinary
single process, bit for bit.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cmtkd.errors import UserError

T = TypeVar("T")


# ------------------------------------------------------------------------- torchrun's environment
def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer; start multi-process "
                        f"runs with torchrun") from None


def launched_world_size() -> int:
    """Number of processes torchrun started (1 without torchrun); known before the group exists."""
    return max(1, _env_int("WORLD_SIZE", 1))


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


# --------------------------------------------------------------------------------- the group
def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` in a multi-process CUDA run, else ``device``."""
    if device.type != "cuda" or launched_world_size() == 1:
        return device
    index = local_rank()
    if index >= torch.cuda.device_count():
        raise UserError(f"local rank {index} has no GPU ({torch.cuda.device_count()} visible); start at most "
                        f"{torch.cuda.device_count()} processes per node (torchrun --nproc_per_node)")
    torch.cuda.set_device(index)  # before the NCCL group: its communicator and barriers use this GPU
    return torch.device("cuda", index)


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join torchrun's process group for the duration of a run (NCCL on CUDA, gloo on CPU) and leave it
    afterwards. A single process, or a caller that already joined a group, is left untouched."""
    if launched_world_size() == 1 or dist.is_initialized():
        yield
        return
    if not dist.is_available():
        raise UserError("this PyTorch build has no torch.distributed; run a single process")
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield
        # A finished run: every rank's collectives are complete before any rank tears its group down.
        # (A 2-process gloo run once aborted in teardown, SIGABRT "terminate called without an active
        # exception", after writing all its files; pending gloo work at exit is the known cause.)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


# ------------------------------------------------------------------------------- collectives
def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo reduces CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(tensor: torch.Tensor, op) -> torch.Tensor:
    if world_size() == 1:
        return tensor
    moved = tensor.to(_collective_device())
    dist.all_reduce(moved, op=op)
    return moved.to(tensor.device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a new tensor; the input itself in a single process, as for the others)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    return _all_reduce(tensor, dist.ReduceOp.SUM) / world_size() if world_size() > 1 else tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    return _all_reduce(tensor, dist.ReduceOp.MAX)


def max_over_ranks(value: float) -> float:
    if world_size() == 1:
        return value
    return float(all_reduce_max(torch.tensor([value], dtype=torch.float64)).item())


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (picklable objects)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only (file writes, the final evaluation); every rank returns its result.
    A ``UserError`` on rank 0 is raised on every rank, so no rank waits for one that gave up."""
    if world_size() == 1:
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except UserError as exc:
            error = str(exc)
    result, error = broadcast_object((result, error))
    if error is not None:
        raise UserError(error)
    return result


# ---------------------------------------------------------------------------- the DDP wrapper
class TrainingForward(nn.Module):
    """``method.forward_train`` as a module ``forward``: DistributedDataParallel only averages the
    gradients of computations that run through the forward of the module it wraps."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, images: torch.Tensor, targets: torch.Tensor):
        return self.method.forward_train(images, targets)


def wrap_for_training(method: nn.Module, device: torch.device) -> nn.Module | None:
    """The method's training forward wrapped in DDP, or None in a single process. Parameters with
    ``requires_grad=False`` (frozen teachers, theta in cmtkd-avg) are left out by DDP itself. Every
    method uses all its trainable parameters in every step, so ``find_unused_parameters`` stays off."""
    if world_size() == 1:
        return None
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(TrainingForward(method), device_ids=ids,
                                   output_device=ids[0] if ids else None)


def check_sync_bn(device: torch.device) -> None:
    if device.type != "cuda":
        raise UserError("train.sync_bn=true needs CUDA devices (SyncBatchNorm has no CPU kernel); "
                        "set train.sync_bn=false")


def convert_sync_batchnorm(method: nn.Module) -> nn.Module:
    """BatchNorm -> SyncBatchNorm (statistics over the global batch; CUDA, see :func:`check_sync_bn`).
    State-dict keys are unchanged, so model.pt still loads into plain BatchNorm. A no-op in a single
    process, where the batch already is the global one."""
    if world_size() == 1:
        return method
    return nn.SyncBatchNorm.convert_sync_batchnorm(method)


# ------------------------------------------------------------------------------------ replicas
def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers everywhere. DDP does this before every forward; after the last step of an
    epoch each rank's BatchNorm running statistics still hold its own last local batch."""
    if world_size() == 1:
        return
    for buffer in module.buffers():
        if buffer.numel():
            moved = buffer.detach().to(_collective_device())
            dist.broadcast(moved, src=0)
            buffer.copy_(moved)


@torch.no_grad()
def check_replicas_identical(module: nn.Module) -> int:
    """Raise RuntimeError unless every rank holds the same parameters and buffers; returns the number
    of tensors checked. A checksum (per-tensor float64 sum and sum of squares, compared with an
    all-reduce MIN against MAX), not a proof, but any drift between ranks shows up in it."""
    if world_size() == 1:
        return 0
    names, sums = [], []
    for name, tensor in module.state_dict().items():
        values = tensor.detach().double()
        names.append(name)
        sums.append(torch.stack([values.sum(), (values * values).sum()]))
    if not names:
        return 0
    local = torch.stack(sums).to(_collective_device())
    high, low = local.clone(), local.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    differs = (high != low).any(dim=1).nonzero().flatten().tolist()
    if differs:
        shown = ", ".join(names[i] for i in differs[:5])
        raise RuntimeError(f"the {world_size()} processes hold different values of {len(differs)} tensors "
                           f"({shown}); data-parallel replicas drifted apart")
    return len(names)
