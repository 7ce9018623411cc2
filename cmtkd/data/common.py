"""Shared pieces of the data package: config, dataset info, the bundle contract, seeding and splits.

Reproducibility contract: everything random about epoch ``e`` of a run with seed ``s`` (sample order
and augmentation) comes from generators derived from ``(s, e)`` alone, so a run resumed at an epoch
boundary sees bit-identical batches without saving any loader state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cmtkd.errors import UserError

DATASETS = ("digits", "cifar100", "imagenet")
# What a network needs to know of each dataset before its files are read (classes, input channels,
# training image size, model variant); ImageNet's class count is the folder's, 1000 for the real one.
NOMINAL = {"digits": (10, 1, 28, "cifar"), "cifar100": (100, 3, 32, "cifar"), "imagenet": (1000, 3, 224, "imagenet")}


@dataclass
class DataConfig:
    name: str = "digits"
    root: str = "data"  # cifar100: folder containing cifar-100-python/ ; imagenet: folder with train/ and val/
    download: bool = False  # cifar100 only: fetch with torchvision when the files are missing
    val_fraction: float = 0.1  # seeded, stratified held-out part of the TRAINING set, for model selection
    split_seed: int = 0  # fixed across runs so every method is selected on the same val images
    batch_size: int = 128
    eval_batch_size: int = 512
    augment: bool = True
    drop_last: bool = True
    num_workers: int = 2  # imagenet only: the in-memory datasets need no loader workers
    # digits only: side of the images after averaging 2 x 2 pixel blocks (14; None or 28 keeps 28).
    # A cost lever for CPU suites (config/reference.yaml trains ResNet-18 at 14; ASSUMPTIONS.md W16).
    image_size: int | None = None


@dataclass
class DataInfo:
    name: str
    num_classes: int
    in_channels: int
    image_size: int
    variant: str  # "cifar" (small-image stem) or "imagenet"
    num_train: int
    num_val: int
    num_test: int


class DataBundle(ABC):
    """Train / val / test splits of one dataset, ready to iterate as normalized NCHW batches on a device."""

    info: DataInfo

    @abstractmethod
    def steps_per_epoch(self) -> int:
        """Number of batches ``train_batches`` yields per epoch."""

    @abstractmethod
    def train_batches(
        self, epoch: int, seed: int, *, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Shuffled (and, if configured, augmented) training batches; a pure function of (seed, epoch).

        With ``world_size`` > 1 (data-parallel training) each batch is only ``rank``'s contiguous slice
        of the global batch (:func:`rank_slice`): concatenated over the ranks, the slices are exactly
        the single-process batches, and each rank loads and augments only its own images.
        """

    @abstractmethod
    def eval_batches(self, split: str) -> Iterator[tuple[Tensor, Tensor]]:
        """Un-augmented batches of ``split`` ("val" or "test") in a fixed order."""


EVAL_SPLITS = ("val", "test")


def check_eval_split(split: str) -> None:
    if split not in EVAL_SPLITS:
        raise UserError(f"unknown evaluation split {split!r}; use one of {', '.join(EVAL_SPLITS)}")


def check_config(cfg: DataConfig) -> None:
    """Reject settings no loader could honour, each with a one-line fix."""
    if cfg.name not in DATASETS:
        raise UserError(f"unknown dataset {cfg.name!r}; set data.name to one of {', '.join(DATASETS)}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise UserError(f"data.val_fraction={cfg.val_fraction} is outside [0, 1); use e.g. 0.1")
    if cfg.batch_size < 1 or cfg.eval_batch_size < 1:
        raise UserError(
            f"batch sizes must be positive (data.batch_size={cfg.batch_size}, "
            f"data.eval_batch_size={cfg.eval_batch_size})"
        )
    if cfg.num_workers < 0:
        raise UserError(f"data.num_workers={cfg.num_workers} is negative; use 0 or more")
    if cfg.image_size is not None and cfg.name != "digits":
        raise UserError(f"data.image_size applies to the digits dataset only (got data.name={cfg.name!r}); "
                        "remove data.image_size")
    if cfg.name == "digits":
        check_digits_size(cfg.image_size)


DIGITS_SIZES = (28, 14)  # data.image_size of digits: 28 (native) or 2 x 2 block means (cmtkd.data.digits.SIZES)


def check_digits_size(size: int | None) -> int:
    """``data.image_size`` of digits, checked: None means the native 28."""
    if size is None:
        return DIGITS_SIZES[0]
    if size not in DIGITS_SIZES:
        raise UserError(f"data.image_size={size!r} is not available for digits; "
                        f"choose one of {', '.join(map(str, DIGITS_SIZES))} (or leave it unset for 28)")
    return size


def steps_for(num_examples: int, batch_size: int, drop_last: bool) -> int:
    return num_examples // batch_size if drop_last else -(-num_examples // batch_size)


def rank_slice(start: int, stop: int, rank: int, world_size: int) -> tuple[int, int]:
    """The part of the global batch ``[start, stop)`` that ``rank`` of ``world_size`` trains on: contiguous
    slices in rank order, equal when the batch divides evenly (a short last batch splits within one)."""
    size = stop - start
    return start + size * rank // world_size, start + size * (rank + 1) // world_size


def check_data_parallel(cfg: DataConfig, world_size: int, num_train: int | None = None) -> None:
    """Reject a global batch that ``world_size`` processes cannot share evenly (each with a one-line fix)."""
    if world_size == 1:
        return
    if cfg.batch_size % world_size:
        suggestion = -(-cfg.batch_size // world_size) * world_size
        raise UserError(
            f"data.batch_size={cfg.batch_size} is the global batch and must split evenly over the "
            f"{world_size} processes; use a multiple of {world_size} (e.g. data.batch_size={suggestion})"
        )
    if num_train is not None and not cfg.drop_last and 0 < num_train % cfg.batch_size < world_size:
        raise UserError(
            f"the last training batch would hold {num_train % cfg.batch_size} images, fewer than the "
            f"{world_size} processes; set data.drop_last=true or change data.batch_size"
        )


def check_rank(cfg: DataConfig, rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size} processes")
    check_data_parallel(cfg, world_size)


def check_train_size(num_train: int, cfg: DataConfig) -> None:
    if steps_for(num_train, cfg.batch_size, cfg.drop_last) == 0:
        raise UserError(
            f"the training split has {num_train} images, fewer than data.batch_size={cfg.batch_size} "
            "with data.drop_last=true; lower data.batch_size or set data.drop_last=false"
        )


# Stream tags keep the generators of different purposes independent even for equal (seed, epoch).
STREAM_TRAIN_ORDER = 1
STREAM_TRAIN_AUGMENT = 2
STREAM_WORKER = 3
STREAM_SPLIT = 4


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from small integers (numpy SeedSequence hashing; no collisions like s*K+e)."""
    for part in parts:
        if int(part) < 0:
            raise UserError(f"seeds and epochs must be non-negative integers, got {part}")
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``parts``; random draws stay on CPU so they match on every device."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(derive_seed(*parts))
    return generator


def stratified_split(labels: Tensor, holdout_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Split indices into (kept, held_out), holding out ``round(fraction * N)`` examples in class proportion.

    Per-class quotas use largest remainders (ties to the lower class id) so the total is exact; which
    examples of a class are held out is a seeded permutation. Both index tensors come back sorted.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
    total = labels.numel()
    num_holdout = round(holdout_fraction * total)
    if num_holdout == 0:
        return torch.arange(total), torch.zeros(0, dtype=torch.int64)
    classes, counts = torch.unique(labels, sorted=True, return_counts=True)
    exact = counts.double() * num_holdout / total
    quotas = exact.floor().long()
    shortfall = num_holdout - int(quotas.sum())
    if shortfall > 0:
        # Stable sort on the remainders: equal remainders keep class order.
        by_remainder = torch.sort(exact - quotas.double(), descending=True, stable=True).indices
        quotas[by_remainder[:shortfall]] += 1
    generator = seeded_generator(seed, STREAM_SPLIT)
    held_out = []
    for class_id, quota in zip(classes.tolist(), quotas.tolist()):
        members = torch.nonzero(labels == class_id).flatten()
        chosen = members[torch.randperm(members.numel(), generator=generator)[:quota]]
        held_out.append(chosen)
    held_out_idx = torch.sort(torch.cat(held_out)).values
    keep_mask = torch.ones(total, dtype=torch.bool)
    keep_mask[held_out_idx] = False
    return torch.nonzero(keep_mask).flatten(), held_out_idx
