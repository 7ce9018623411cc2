"""Datasets as ``DataBundle``s: seeded train/val/test splits yielding normalized NCHW batches on a device.

``digits`` (default, embedded, offline) and ``cifar100`` live in memory as uint8 tensors and are
augmented in batches; ``imagenet`` streams an ImageFolder tree through DataLoader workers.
Training batches of epoch ``e`` are a pure function of ``(seed, e)``: resuming at an epoch
boundary reproduces them bit for bit without any saved loader state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cmtkd.data.cifar100 import build_cifar100
from cmtkd.data.common import DATASETS, DataBundle, DataConfig, DataInfo, check_config
from cmtkd.data.digits import build_digits
from cmtkd.data.imagenet import build_imagenet

__all__ = ["DATASETS", "DataBundle", "DataConfig", "DataInfo", "build_data"]

# A new dataset is one module with a ``build_<name>(cfg, device)`` plus one line here and in DATASETS.
BUILDERS: dict[str, Callable[[DataConfig, torch.device | str], DataBundle]] = {
    "digits": build_digits,
    "cifar100": build_cifar100,
    "imagenet": build_imagenet,
}
assert tuple(BUILDERS) == DATASETS


def build_data(cfg: DataConfig, device: torch.device | str = "cpu") -> DataBundle:
    """Load ``cfg.name`` and split it; raises ``UserError`` with a one-line fix for any data problem."""
    check_config(cfg)
    return BUILDERS[cfg.name](cfg, device)
