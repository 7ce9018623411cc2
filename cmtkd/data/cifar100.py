"""CIFAR-100 from the standard python-pickle release (``<root>/cifar-100-python/{train,test}``).

The official 50,000 training images are split into train and a stratified, ``split_seed``-seeded
validation part (``val_fraction``) for model selection; the official 10,000 test images are "test".
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from cmtkd.data.common import DataConfig, DataInfo, stratified_split
from cmtkd.data.in_memory import Augmentation, TensorBundle, TensorSplit
from cmtkd.errors import UserError

FOLDER = "cifar-100-python"
NUM_CLASSES = 100
IMAGE_SIZE = 32

# Per-channel mean/std of pixel/255 over the 50,000 official training images, as used by
# mdistiller and most CIFAR-100 distillation code.
MEAN = (0.5071, 0.4867, 0.4408)
STD = (0.2675, 0.2565, 0.2761)

# The standard CIFAR recipe: pad 4, random 32x32 crop, horizontal flip.
AUGMENTATION = Augmentation(crop_padding=4, horizontal_flip=True)

HOW_TO_GET = (
    "set data.download=true (needs internet) or copy the python version of CIFAR-100 "
    "(cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extracted) there"
)


def _reconstruct():
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes (``encode(text, 'latin1')``); no other codec."""
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591") or errors != "strict":
        raise pickle.UnpicklingError(f"refused codec {encoding!r} in a CIFAR-100 file")
    return text.encode("latin1")


# The only globals the CIFAR-100 pickles name: numpy arrays (and their dtypes), and bytes written by
# protocol 2 through _codecs.encode. Anything else (os.system, builtins.eval, ...) is refused before it
# is looked up: a dataset file from elsewhere must not run code (the house rule for untrusted files).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # the official files (Python 2, numpy 1.x)
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # files numpy 2 wrote
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: _plain_dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class _DatasetUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`_ALLOWED_GLOBALS` (lists, dicts, strings and numbers
    need no global). Object arrays are refused too: their items would be arbitrary pickled objects."""

    def find_class(self, module: str, name: str):
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(f"refused to load {module}.{name} (a CIFAR-100 file names only numpy "
                                         f"arrays; this one may be hostile)")
        return factory()


def _plain_dtype(spec, *args):
    """``numpy.dtype`` for any dtype but ``object``."""
    dtype = np.dtype(spec, *args)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"refused an object array ({spec!r}) in a CIFAR-100 file")
    return dtype


def _text_keys(batch: dict) -> dict:
    """The original pickles (written by Python 2) may load with bytes keys; normalize to str."""
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in batch.items()}


def load_pickle_split(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickle file as uint8 images (N, 3, 32, 32) and int64 fine labels."""
    try:
        with path.open("rb") as handle:
            batch = _DatasetUnpickler(handle, encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError, RecursionError) as exc:  # what a malformed stream can raise
        raise UserError(f"cannot read CIFAR-100 file {path} ({type(exc).__name__}: {exc}); delete it and "
                        f"{HOW_TO_GET}") from exc
    batch = _text_keys(batch) if isinstance(batch, dict) else batch
    if not isinstance(batch, dict) or "data" not in batch or "fine_labels" not in batch:
        raise UserError(f"{path} is not a CIFAR-100 python pickle (no 'data'/'fine_labels'); {HOW_TO_GET}")
    try:
        pixels = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch["fine_labels"], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise UserError(f"{path} has 'data'/'fine_labels' that are not arrays of pixels and labels ({exc}); "
                        f"{HOW_TO_GET}") from exc
    if pixels.ndim != 2 or pixels.shape[1] != 3 * IMAGE_SIZE * IMAGE_SIZE or len(pixels) != len(labels):
        raise UserError(f"{path} has data of shape {pixels.shape} for {len(labels)} labels; {HOW_TO_GET}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise UserError(f"{path} has labels outside 0..{NUM_CLASSES - 1}; {HOW_TO_GET}")
    images = torch.from_numpy(pixels.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).copy())
    return images, torch.from_numpy(labels)


def locate(cfg: DataConfig) -> Path:
    """The ``cifar-100-python`` folder, downloaded first if allowed and missing."""
    folder = Path(cfg.root).expanduser() / FOLDER
    missing = [folder / name for name in ("train", "test") if not (folder / name).is_file()]
    if missing and cfg.download:
        try:
            from torchvision.datasets import CIFAR100

            CIFAR100(root=str(Path(cfg.root).expanduser()), train=True, download=True)
        except Exception as exc:  # network or disk errors: tell the user how to provide the files instead
            raise UserError(f"downloading CIFAR-100 into {folder} failed ({exc}); copy the python version of "
                            f"CIFAR-100 there instead (cifar-100-python.tar.gz from "
                            f"https://www.cs.toronto.edu/~kriz/cifar.html, extracted)") from exc
        missing = [path for path in missing if not path.is_file()]
    if missing:
        raise UserError(f"CIFAR-100 not found: missing {missing[0]}; {HOW_TO_GET}")
    return folder


def build_cifar100(cfg: DataConfig, device: torch.device | str = "cpu") -> TensorBundle:
    folder = locate(cfg)
    train_images, train_labels = load_pickle_split(folder / "train")
    test_images, test_labels = load_pickle_split(folder / "test")
    train, val = stratified_split(train_labels, cfg.val_fraction, cfg.split_seed)
    info = DataInfo(
        name="cifar100",
        num_classes=NUM_CLASSES,
        in_channels=3,
        image_size=IMAGE_SIZE,
        variant="cifar",
        num_train=train.numel(),
        num_val=val.numel(),
        num_test=test_labels.numel(),
    )
    return TensorBundle(
        info,
        TensorSplit(train_images[train], train_labels[train]),
        TensorSplit(train_images[val], train_labels[val]),
        TensorSplit(test_images, test_labels),
        MEAN,
        STD,
        AUGMENTATION,
        cfg,
        device,
    )
