"""ImageNet (or any ImageFolder tree): ``<root>/train/<class>/*`` and ``<root>/val/<class>/*``.

The official ``val/`` is the "test" split; the "val" split for model selection is a stratified,
``split_seed``-seeded ``val_fraction`` of ``train/``, evaluated with the eval transform.

Determinism: the sampler draws its order from a generator derived from (seed, epoch), and every
training image is augmented under a torch seed derived from (seed, epoch, image index), so the
batches of an epoch do not depend on the number of workers or on which worker decodes what.
Workers return uint8 tensors (a quarter of the bytes of float32); conversion to float and
normalization happen batched on ``device``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler

from cmtkd.data.common import (
    STREAM_TRAIN_AUGMENT,
    STREAM_TRAIN_ORDER,
    STREAM_WORKER,
    DataBundle,
    DataConfig,
    DataInfo,
    check_eval_split,
    check_rank,
    check_train_size,
    derive_seed,
    rank_slice,
    seeded_generator,
    steps_for,
    stratified_split,
)
from cmtkd.errors import UserError

TRAIN_CROP = 224  # RandomResizedCrop output size
EVAL_RESIZE = 256  # shorter side before the center crop
EVAL_CROP = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

HOW_TO_GET = (
    "point data.root at a folder with train/<class>/*.JPEG and val/<class>/*.JPEG "
    "(sort the official val images into class folders, e.g. with the common valprep.sh)"
)


def train_transform() -> Callable:
    from torchvision import transforms

    return transforms.Compose(
        [transforms.RandomResizedCrop(TRAIN_CROP), transforms.RandomHorizontalFlip(), transforms.PILToTensor()]
    )


def eval_transform() -> Callable:
    from torchvision import transforms

    return transforms.Compose(
        [transforms.Resize(EVAL_RESIZE), transforms.CenterCrop(EVAL_CROP), transforms.PILToTensor()]
    )


def open_folder(path: Path):
    from torchvision.datasets import ImageFolder

    if not path.is_dir():
        raise UserError(f"ImageNet folder not found: {path}; {HOW_TO_GET}")
    try:
        return ImageFolder(str(path))
    except (FileNotFoundError, RuntimeError) as exc:  # no class folders, or class folders without images
        raise UserError(f"no usable class folders of images in {path} ({exc}); {HOW_TO_GET}") from exc


class UnreadableImage(UserError):
    """An image file that does not decode (truncated, corrupt, not an image)."""


def load_image(folder, path: str):
    """``folder.loader(path)`` (PIL), with a file that does not decode as one :class:`UnreadableImage`."""
    try:
        return folder.loader(path)
    except (OSError, ValueError, SyntaxError) as exc:  # PIL: UnidentifiedImageError (an OSError), truncated data
        raise UnreadableImage(f"image {path} does not decode ({type(exc).__name__}: {exc}); replace or delete "
                              f"it (a class folder's images are read as found)") from None


def _loaded(loader: DataLoader) -> Iterator:
    """The loader's batches; an unreadable image, raised in a worker process, as its own one-line error
    (the DataLoader re-raises it with the worker's traceback folded into the message)."""
    try:
        yield from loader
    except UnreadableImage as exc:
        lines = [line for line in str(exc).splitlines() if "does not decode" in line]
        message = lines[-1].split("UnreadableImage: ", 1)[-1] if lines else str(exc).splitlines()[0]
        raise UnreadableImage(message) from None


class TransformedSubset(Dataset):
    """Items ``indices`` of an ImageFolder, loaded and passed through ``transform``."""

    def __init__(self, folder, indices: Tensor, transform: Callable) -> None:
        self.folder = folder
        self.indices = indices.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[Tensor, int]:
        path, target = self.folder.samples[self.indices[position]]
        return self.transform(load_image(self.folder, path)), target


class SeededTrainSubset(TransformedSubset):
    """Training items whose random transform runs under a torch seed derived from (seed, epoch, position)."""

    def __init__(self, folder, indices: Tensor, transform: Callable, seed: int, epoch: int) -> None:
        super().__init__(folder, indices, transform)
        self.seed = seed
        self.epoch = epoch

    def __getitem__(self, position: int) -> tuple[Tensor, int]:
        path, target = self.folder.samples[self.indices[position]]
        image = load_image(self.folder, path)
        # fork_rng: the seeding stays local, so it neither depends on nor disturbs the worker's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, self.epoch, STREAM_TRAIN_AUGMENT, position))
            return self.transform(image), target


class RankSlices(Sampler[list[int]]):
    """The batches of ``batches`` cut down to ``rank``'s contiguous slice of each (data-parallel training):
    a rank's workers load and augment only the images that rank trains on."""

    def __init__(self, batches: BatchSampler, rank: int, world_size: int) -> None:
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            start, stop = rank_slice(0, len(batch), self.rank, self.world_size)
            yield batch[start:stop]


def seed_worker(worker_id: int, seed: int, epoch: int) -> None:
    """Seed every RNG a worker might touch from (seed, epoch, worker_id)."""
    worker_seed = derive_seed(seed, epoch, STREAM_WORKER, worker_id)
    torch.manual_seed(worker_seed)
    random.seed(worker_seed)
    np.random.seed(worker_seed % 2**32)


class ImageFolderBundle(DataBundle):
    def __init__(self, cfg: DataConfig, device: torch.device | str = "cpu") -> None:
        root = Path(cfg.root).expanduser()
        if not root.is_dir():
            raise UserError(f"ImageNet root not found: {root}; {HOW_TO_GET}")
        self.cfg = cfg
        self.device = torch.device(device)
        self.train_folder = open_folder(root / "train")
        self.test_folder = open_folder(root / "val")
        if self.test_folder.classes != self.train_folder.classes:
            raise UserError(
                f"class folders of {root / 'val'} ({len(self.test_folder.classes)}) differ from those of "
                f"{root / 'train'} ({len(self.train_folder.classes)}); {HOW_TO_GET}"
            )
        targets = torch.tensor(self.train_folder.targets, dtype=torch.int64)
        self.train_indices, self.val_indices = stratified_split(targets, cfg.val_fraction, cfg.split_seed)
        check_train_size(self.train_indices.numel(), cfg)
        self.info = DataInfo(
            name="imagenet",
            num_classes=len(self.train_folder.classes),
            in_channels=3,
            image_size=TRAIN_CROP,
            variant="imagenet",
            num_train=self.train_indices.numel(),
            num_val=self.val_indices.numel(),
            num_test=len(self.test_folder),
        )
        self.pixel_mean = torch.tensor([255.0 * m for m in MEAN], device=self.device).view(1, -1, 1, 1)
        self.pixel_inv_std = torch.tensor([1.0 / (255.0 * s) for s in STD], device=self.device).view(1, -1, 1, 1)

    def _loader(self, dataset: Dataset, **kwargs) -> DataLoader:
        return DataLoader(
            dataset,
            num_workers=self.cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            **kwargs,
        )

    def _to_device(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, dtype=torch.int64, non_blocking=True)
        return (images.float() - self.pixel_mean) * self.pixel_inv_std, targets

    def steps_per_epoch(self) -> int:
        return steps_for(self.info.num_train, self.cfg.batch_size, self.cfg.drop_last)

    def train_batches(
        self, epoch: int, seed: int, *, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[Tensor, Tensor]]:
        check_rank(self.cfg, rank, world_size)
        transform = train_transform() if self.cfg.augment else eval_transform()
        dataset = SeededTrainSubset(self.train_folder, self.train_indices, transform, seed, epoch)
        # What DataLoader(shuffle=True, batch_size=, drop_last=, generator=) builds, with each global batch
        # cut to this rank's slice. The loader gets the same generator: it draws its base seed from it
        # before the sampler's permutation, so one process sees exactly the batches it always saw.
        generator = seeded_generator(seed, epoch, STREAM_TRAIN_ORDER)
        batches = BatchSampler(RandomSampler(dataset, generator=generator), self.cfg.batch_size, self.cfg.drop_last)
        loader = self._loader(
            dataset,
            batch_sampler=RankSlices(batches, rank, world_size),
            generator=generator,
            worker_init_fn=partial(seed_worker, seed=seed, epoch=epoch),
        )
        for images, targets in _loaded(loader):
            yield self._to_device(images, targets)

    def eval_batches(self, split: str) -> Iterator[tuple[Tensor, Tensor]]:
        check_eval_split(split)
        if split == "val":
            dataset = TransformedSubset(self.train_folder, self.val_indices, eval_transform())
        else:
            dataset = TransformedSubset(self.test_folder, torch.arange(len(self.test_folder)), eval_transform())
        for images, targets in _loaded(self._loader(dataset, batch_size=self.cfg.eval_batch_size, shuffle=False)):
            yield self._to_device(images, targets)


def build_imagenet(cfg: DataConfig, device: torch.device | str = "cpu") -> ImageFolderBundle:
    return ImageFolderBundle(cfg, device)
