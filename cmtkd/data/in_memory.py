"""Datasets that fit in memory as one uint8 tensor per split, augmented and normalized in batches.

No DataLoader and no workers: a batch is an index into the stored (N, C, H, W) uint8 tensor, a random
crop from a zero-padded copy (one ``gather`` with per-image offsets), an optional horizontal flip via
``torch.where``, then one fused conversion to normalized float32. Zero padding happens on the raw
pixels, as ``torchvision.transforms.RandomCrop(padding=p)`` does before ``Normalize``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cmtkd.data.common import (
    STREAM_TRAIN_AUGMENT,
    STREAM_TRAIN_ORDER,
    DataBundle,
    DataConfig,
    DataInfo,
    check_eval_split,
    check_rank,
    check_train_size,
    rank_slice,
    seeded_generator,
    steps_for,
)


@dataclass(frozen=True)
class TensorSplit:
    images: Tensor  # uint8 (N, C, H, W)
    labels: Tensor  # int64 (N,)

    def __len__(self) -> int:
        return self.labels.numel()


@dataclass(frozen=True)
class Augmentation:
    crop_padding: int  # random crop of the original size from an image zero-padded by this many pixels
    horizontal_flip: bool


def random_crop(images: Tensor, padding: int, offsets: Tensor) -> Tensor:
    """Crop each image of ``images`` (B, C, H, W) at ``offsets`` (B, 2) = (top, left) in its padded copy."""
    batch, channels, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    padded_width = width + 2 * padding
    offsets = offsets.to(images.device)
    rows = offsets[:, :1] + torch.arange(height, device=images.device)  # (B, H)
    cols = offsets[:, 1:] + torch.arange(width, device=images.device)  # (B, W)
    flat_index = (rows[:, :, None] * padded_width + cols[:, None, :]).reshape(batch, 1, height * width)
    flat = padded.reshape(batch, channels, -1)
    cropped = torch.gather(flat, 2, flat_index.expand(batch, channels, height * width))
    return cropped.reshape(batch, channels, height, width)


def horizontal_flip(images: Tensor, flip: Tensor) -> Tensor:
    return torch.where(flip.to(images.device)[:, None, None, None], images.flip(3), images)


class TensorBundle(DataBundle):
    """Train/val/test uint8 tensors plus per-channel mean/std (in [0, 1] pixel units)."""

    def __init__(
        self,
        info: DataInfo,
        train: TensorSplit,
        val: TensorSplit,
        test: TensorSplit,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augmentation: Augmentation,
        cfg: DataConfig,
        device: torch.device | str = "cpu",
    ) -> None:
        check_train_size(len(train), cfg)
        self.info = info
        self.cfg = cfg
        self.augmentation = augmentation
        self.device = torch.device(device)
        # On CUDA the whole split goes to the GPU once (CIFAR-100 train is 150 MB as uint8); elsewhere
        # batches are indexed on CPU and moved one at a time.
        self.storage_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        self.splits = {
            name: TensorSplit(split.images.to(self.storage_device), split.labels.to(self.storage_device))
            for name, split in (("train", train), ("val", val), ("test", test))
        }
        channels = train.images.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean/std need {channels} entries, got {len(mean)} and {len(std)}")
        # (x / 255 - mean) / std  ==  (x - 255 * mean) * (1 / (255 * std)), one sub and one mul per batch.
        self.pixel_mean = torch.tensor([255.0 * m for m in mean], device=self.device).view(1, -1, 1, 1)
        self.pixel_inv_std = torch.tensor([1.0 / (255.0 * s) for s in std], device=self.device).view(1, -1, 1, 1)

    def normalize(self, images: Tensor) -> Tensor:
        images = images.to(self.device, non_blocking=True)
        return (images.float() - self.pixel_mean) * self.pixel_inv_std

    def steps_per_epoch(self) -> int:
        return steps_for(len(self.splits["train"]), self.cfg.batch_size, self.cfg.drop_last)

    def train_batches(
        self, epoch: int, seed: int, *, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[Tensor, Tensor]]:
        check_rank(self.cfg, rank, world_size)
        train = self.splits["train"]
        count = len(train)
        # All randomness of the epoch is drawn up front on CPU, from generators derived from (seed, epoch).
        order = torch.randperm(count, generator=seeded_generator(seed, epoch, STREAM_TRAIN_ORDER))
        augment = self.cfg.augment and (self.augmentation.crop_padding > 0 or self.augmentation.horizontal_flip)
        if augment:
            augment_generator = seeded_generator(seed, epoch, STREAM_TRAIN_AUGMENT)
            padding = self.augmentation.crop_padding
            offsets = torch.randint(0, 2 * padding + 1, (count, 2), generator=augment_generator)
            flips = torch.rand(count, generator=augment_generator) < 0.5
            # Moved to the images' device once per epoch: no host-to-device copy inside the steps.
            offsets, flips = offsets.to(self.storage_device), flips.to(self.storage_device)
        order_on_storage = order.to(self.storage_device)
        batch_size = self.cfg.batch_size
        for step in range(self.steps_per_epoch()):
            start, stop = step * batch_size, min((step + 1) * batch_size, count)
            # the epoch's randomness covers the global batch; this rank gathers only its own slice
            start, stop = rank_slice(start, stop, rank, world_size)
            index = order_on_storage[start:stop]
            images = train.images[index]
            if augment:
                if padding > 0:
                    images = random_crop(images, padding, offsets[start:stop])
                if self.augmentation.horizontal_flip:
                    images = horizontal_flip(images, flips[start:stop])
            yield self.normalize(images), train.labels[index].to(self.device, non_blocking=True)

    def eval_batches(self, split: str) -> Iterator[tuple[Tensor, Tensor]]:
        check_eval_split(split)
        data = self.splits[split]
        batch_size = self.cfg.eval_batch_size
        for start in range(0, len(data), batch_size):
            images = data.images[start : start + batch_size]
            yield self.normalize(images), data.labels[start : start + batch_size].to(self.device, non_blocking=True)
