"""A synthetic CIFAR-100 in the real ``cifar-100-python`` format (pickled ``train``, ``test`` and ``meta``
with bytes keys, as the Python 2 originals), so the GPU check and the CUDA tests run the real loader
offline. Each class has its own mean colour plus noise, so a network can learn something from it.

    python benchmarks/synthetic_cifar.py ROOT [--train 5000 --test 1000 --seed 0]
"""
from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np

FOLDER = "cifar-100-python"
NUM_CLASSES = 100
NUM_COARSE = 20
PIXELS = 3 * 32 * 32


def _split(count: int, rng: np.random.Generator, class_means: np.ndarray, label: str) -> dict:
    fine = np.arange(count) % NUM_CLASSES  # every class present, equal counts when count % 100 == 0
    rng.shuffle(fine)
    noise = rng.normal(0.0, 40.0, size=(count, PIXELS))
    data = np.clip(class_means[fine] + noise, 0, 255).astype(np.uint8)
    return {
        b"filenames": [f"synthetic_{label}_{i}.png".encode() for i in range(count)],
        b"batch_label": f"synthetic {label} batch".encode(),
        b"fine_labels": fine.tolist(),
        b"coarse_labels": (fine % NUM_COARSE).tolist(),
        b"data": data,
    }


def write_synthetic_cifar100(root: str | Path, train: int = 5000, test: int = 1000, seed: int = 0) -> Path:
    """Write ``root/cifar-100-python/{train,test,meta}``; returns ``root`` (the value of ``data.root``)."""
    if train < NUM_CLASSES or test < 1:
        raise ValueError(f"need at least {NUM_CLASSES} training images and one test image")
    root = Path(root)
    folder = root / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # one colour per class and channel, constant over the image
    class_means = np.repeat(rng.uniform(40, 215, size=(NUM_CLASSES, 3)), 32 * 32, axis=1)
    meta = {b"fine_label_names": [f"class{i}".encode() for i in range(NUM_CLASSES)],
            b"coarse_label_names": [f"super{i}".encode() for i in range(NUM_COARSE)]}
    for name, blob in (("train", _split(train, rng, class_means, "train")),
                       ("test", _split(test, rng, class_means, "test")), ("meta", meta)):
        with open(folder / name, "wb") as handle:
            pickle.dump(blob, handle, protocol=2)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("root", help="folder to hold cifar-100-python/ (use it as data.root)")
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_synthetic_cifar100(args.root, args.train, args.test, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
