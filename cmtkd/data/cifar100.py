"""CIFAR-100 from the standard python-pickle release (``<root>/cifar-100-python/{train,test}``).

The official 50,000 training images are split into train and a stratified, ``split_seed``-seeded
validation part (``val_fraction``) for model selection; the official 10,000 test images are "test".
"""

from __future__ import annotations

import io
import math
import pickle
from pathlib import Path

import numpy as np
import torch

from cmtkd.data.common import DataConfig, DataInfo, stratified_split
from cmtkd.data.in_memory import Augmentation, TensorBundle, TensorSplit
from cmtkd.errors import UserError
from cmtkd.files import read_regular_file

FOLDER = "cifar-100-python"
NUM_CLASSES = 100
IMAGE_SIZE = 32

# Per-channel mean/std of pixel/255 over the 50,000 official training images, as used by
# mdistiller and most CIFAR-100 distillation code.
MEAN = (0.5071, 0.4867, 0.4408)
STD = (0.2675, 0.2565, 0.2761)

# The standard CIFAR recipe: pad 4, random 32x32 crop, horizontal flip.
AUGMENTATION = Augmentation(crop_padding=4, horizontal_flip=True)

MAX_FILE_BYTES = 2**30  # a CIFAR-100 pickle is 155 MB (train) or 31 MB (test)
HOW_TO_GET = (
    "set data.download=true (needs internet) or copy the python version of CIFAR-100 "
    "(cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extracted) there"
)


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes (``encode(text, 'latin1')``); no other codec."""
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591") or errors != "strict":
        raise pickle.UnpicklingError(f"refused codec {encoding!r} in a CIFAR-100 file")
    return text.encode("latin1")


# numpy's own pickling is not safe to replay from an untrusted file: a dtype's __setstate__ accepts any
# fields, offsets and flags (an array can then read memory outside its buffer), and ndarray(shape) allocates
# without reading data. So the names a numpy pickle uses resolve to these stand-ins, which accept exactly
# what numpy writes for a plain array, and build the array from the file's own bytes (memory bounded by
# the file's size). Arrays come back as _ArrayStub objects; _materialize swaps in the numpy arrays.
_PLAIN_DTYPES = {"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f4", "f8", "b1"}


def _refuse(what: str):
    raise pickle.UnpicklingError(f"refused {what} in a CIFAR-100 file")


class _DtypeStub:
    """``numpy.dtype(spec, align, copy)`` + BUILD state, for plain numeric dtypes only."""

    def __init__(self, spec, align=False, copy=True):
        if not isinstance(spec, str) or spec not in _PLAIN_DTYPES:
            _refuse(f"dtype {spec!r}")
        self.dtype = np.dtype(spec)

    def __setstate__(self, state):
        # numpy writes (3, byte order, subarray, names, fields, elsize, alignment, flags), version 4 adding
        # metadata; a plain dtype has no subarray, names or fields, its own size (or -1) and no flags.
        if not (isinstance(state, tuple) and (state[:1], len(state)) in (((3,), 8), ((4,), 9))
                and state[1] in ("|", "<", ">", "=") and state[2:5] == (None, None, None)
                and state[5] in (-1, self.dtype.itemsize) and state[6] in (-1, self.dtype.alignment)
                and state[7] == 0 and (len(state) == 8 or state[8] in (None, {}))):
            _refuse(f"dtype state {state!r}")
        if state[1] in "<>":
            self.dtype = self.dtype.newbyteorder(state[1])


class _NdarrayMarker:
    """What ``numpy.ndarray`` resolves to: only a marker for ``_reconstruct``; calling it is refused."""

    def __init__(self, *args, **kwargs):
        _refuse("a direct numpy.ndarray(...) call")


class _ArrayStub:
    """``numpy.core.multiarray._reconstruct(ndarray, (0,), 'b')`` + BUILD ``(1, shape, dtype, fortran, data)``."""

    def __init__(self, cls, shape, typecode):
        if cls is not _NdarrayMarker or tuple(shape) != (0,) or typecode not in (b"b", "b"):
            _refuse(f"array reconstruction {shape!r}, {typecode!r}")
        self.array = None

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1 and isinstance(state[2], _DtypeStub)
                and isinstance(state[1], tuple) and all(isinstance(n, int) and n >= 0 for n in state[1])):
            _refuse("array state")
        _, shape, dtype, fortran, data = state
        if isinstance(data, str):  # written by Python 2 (str), read back through latin-1
            data = data.encode("latin1")
        if not isinstance(data, bytes) or math.prod(shape) * dtype.dtype.itemsize != len(data):
            _refuse(f"array data of {len(data) if isinstance(data, (bytes, str)) else type(data).__name__} bytes "
                    f"for shape {shape}")
        self.array = np.frombuffer(data, dtype=dtype.dtype).reshape(shape, order="F" if fortran else "C").copy()


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _ArrayStub,  # the official files (Python 2, numpy 1.x)
    ("numpy._core.multiarray", "_reconstruct"): _ArrayStub,  # files numpy 2 wrote
    ("numpy", "ndarray"): _NdarrayMarker,
    ("numpy", "dtype"): _DtypeStub,
    ("_codecs", "encode"): _latin1_encode,
}


class _DatasetUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`_ALLOWED_GLOBALS`, each a checked stand-in (lists,
    dicts, strings and numbers need no global); anything else is refused before it is looked up."""

    def find_class(self, module: str, name: str):
        found = _ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refused to load {module}.{name} (a CIFAR-100 file names only numpy "
                                         f"arrays; this one may be hostile)")
        return found


class _Budget:
    """How many containers and elements :func:`_materialize` may still visit: at most the file's size in
    bytes. A pickle stores each object once and may refer to it again for two bytes (a memo reference),
    so a 12 KB file can describe a list of lists of lists that expands to billions of elements; every
    element of a real file costs at least one byte of it."""

    def __init__(self, size: int):
        self.left = size

    def spend(self, count: int) -> None:
        self.left -= count
        if self.left < 0:
            _refuse("structure that expands beyond the file's own size (repeated memo references)")


def _materialize(obj, budget: _Budget, depth: int = 0):
    """``obj`` with every _ArrayStub replaced by its numpy array; dicts and lists (at most a few levels
    deep, as a CIFAR-100 batch has them) copied within ``budget``."""
    budget.spend(1)
    if isinstance(obj, _ArrayStub):
        if obj.array is None:
            _refuse("an array without data")
        return obj.array
    if isinstance(obj, (dict, list)):
        if depth >= 4:
            _refuse("nesting deeper than a CIFAR-100 batch has")
        budget.spend(len(obj))
        if isinstance(obj, dict):
            return {key: _materialize(value, budget, depth + 1) for key, value in obj.items()}
        return [_materialize(value, budget, depth + 1) for value in obj]
    if isinstance(obj, (_DtypeStub, _NdarrayMarker)):
        _refuse("a stray numpy object")
    return obj


def _text_keys(batch: dict) -> dict:
    """The original pickles (written by Python 2) may load with bytes keys; normalize to str."""
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in batch.items()}


def load_pickle_split(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickle file as uint8 images (N, 3, 32, 32) and int64 fine labels."""
    try:
        data = read_regular_file(path, MAX_FILE_BYTES)  # the real train file is 155 MB
        batch = _materialize(_DatasetUnpickler(io.BytesIO(data), encoding="latin1").load(), _Budget(len(data)))
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
