"""Pre-trained teachers: load a finished run's ``model.pt`` as a frozen teacher, checked.

Used by the distillation baselines (``kd``, ``mtkd``, ``kd-at``) and by CMT-KD's frozen-teacher
ablation. A teacher is identified by the SHA-256 of its ``model.pt``; every method that uses one
records the hash in ``metrics.json`` so a result can be traced to the exact teacher weights.
Every problem is a one-line :class:`~cmtkd.errors.UserError` naming the file, what was expected,
what was found, and the fix.
"""
from __future__ import annotations

import contextlib
import contextvars
import re
from pathlib import Path

import torch
from torch import nn

from cmtkd import checkpoint
from cmtkd.checkpoint import MODEL_FILE
from cmtkd.data.common import DIGITS_SIZES
from cmtkd.errors import UserError
from cmtkd.files import read_yaml_mapping, sha256_bytes
SHA256_PATTERN = re.compile(r"^[0-9a-fA-F]{64}$")
# Set while a method is built only to check its config (cmtkd.engine.footprint.check_method_builds): no
# model file is read, since the teachers a workflow will train do not exist yet when it checks its runs.
_STAND_INS = contextvars.ContextVar("cmtkd_stand_in_files", default=False)
STAND_IN_SHA256 = "0" * 64


@contextlib.contextmanager
def stand_in_files():
    """Within: :func:`load_teacher` reads no file and returns an untrained network of the architecture
    it was asked to check, and methods skip every other model file they would load (``stand_ins()``)."""
    token = _STAND_INS.set(True)
    try:
        yield
    finally:
        _STAND_INS.reset(token)


def stand_ins() -> bool:
    return _STAND_INS.get()


def teacher_file(path: str | Path) -> Path:
    """``path`` itself if it is a file, ``path/model.pt`` if it is a run directory."""
    path = Path(path)
    return path / MODEL_FILE if path.is_dir() else path


def check_sha256_option(value: str, key: str) -> None:
    """Config-time check of a user-given hash (lower-case hex, 64 digits)."""
    if not SHA256_PATTERN.match(value):
        raise UserError(f"{key}={value!r} is not a SHA-256 hex digest (64 hex digits); copy it "
                        f"from `sha256sum RUN_DIR/model.pt` or drop it")


def trained_image_size(model_file: Path) -> int | None:
    """Side of the digits images the run beside ``model_file`` trained on (``data.image_size``; 28
    when unset), read from its ``config.yaml``; None for other datasets or a model file without one."""
    run_config = model_file.parent / "config.yaml"
    if not run_config.is_file():
        return None
    data = read_yaml_mapping(run_config, "teacher run config", missing=f"{run_config} does not exist",
                             not_mapping=f"teacher run config {run_config} must hold a mapping").get("data") or {}
    if not isinstance(data, dict) or data.get("name", "digits") != "digits":
        return None
    return data.get("image_size") or DIGITS_SIZES[0]


def load_teacher(path: str | Path, *, arch: str, num_classes: int, w_bits: int | None = None,
                 a_bits: int | None = None, expected_sha256: str | None = None,
                 in_channels: int | None = None, image_size: int | None = None,
                 role: str = "teacher") -> tuple[nn.Module, str]:
    """Load the network saved in ``path`` (a run directory or its ``model.pt``) as a frozen teacher
    (``role`` names it in errors: "teacher", or e.g. "model.init_from network").

    Checks, in this order: the file exists; its SHA-256 equals ``expected_sha256`` (when given); it
    is a cmtkd model file; its architecture, number of classes, input channels (when given) and
    weight/activation bit-widths (when given) are the expected ones; for digits, the image size its
    run trained on (when given and its config.yaml sits beside it) is ``image_size``; the weights
    fit the rebuilt network. Returns ``(model, sha256)`` with the model in eval mode and ``requires_grad=False``.
    """
    if stand_ins():
        from cmtkd.models import build_model

        variant = "imagenet" if (image_size or 0) >= 128 else "cifar"  # what a file would tell; 224 vs 28/32
        return build_model(arch=arch, num_classes=num_classes, in_channels=in_channels or 3, w_bits=w_bits or 32,
                           a_bits=a_bits or 32, variant=variant).eval().requires_grad_(False), STAND_IN_SHA256
    given = Path(path)
    file = teacher_file(given)
    if not file.is_file():
        where = f"run directory {given} has no {MODEL_FILE}" if given.is_dir() else f"{file} does not exist"
        raise UserError(f"{role} checkpoint: {where} (expected a finished `cmtkd train` run directory or its "
                        f"{MODEL_FILE}); train the {role} first or fix the path")
    what, fix = f"{role} checkpoint", f"retrain the {role} (`cmtkd train ... --out DIR`) and pass DIR"
    data = checkpoint.read_bytes(file, what, fix)
    digest = sha256_bytes(data)  # of the very bytes loaded below
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise UserError(f"{role} checkpoint {file}: SHA-256 expected {expected_sha256}, found {digest}; the file "
                        f"was retrained or replaced - pass the original teacher or update the expected hash")
    blob = checkpoint.decode(data, file, "model", fix, what)
    config = blob["arch_config"]
    if not isinstance(config, dict):
        raise UserError(f"{role} checkpoint {file} has no arch_config mapping; {fix}")
    expected = {"arch": arch, "num_classes": num_classes, "in_channels": in_channels,
                "w_bits": w_bits, "a_bits": a_bits}
    fixes = {"arch": f"train the {role} with --arch {arch}",
             "num_classes": f"train the {role} on this run's dataset",
             "in_channels": f"train the {role} on this run's dataset",
             "w_bits": f"pass a {role} trained with --w-bits {w_bits}",
             "a_bits": f"pass a {role} trained with --a-bits {a_bits}"}
    for key, want in expected.items():
        if want is not None and config.get(key) != want:
            raise UserError(f"{role} checkpoint {file}: {key} expected {want}, found {config.get(key)}; "
                            f"{fixes[key]}")
    trained = trained_image_size(file) if image_size is not None else None
    if trained is not None and trained != image_size:
        raise UserError(f"{role} checkpoint {file}: trained on {trained}x{trained} digits, this run sees "
                        f"{image_size}x{image_size}; train the {role} with this run's data.image_size")
    model = checkpoint.build_network(blob, file, f"retrain the {role} with this version", what)
    model.eval()
    model.requires_grad_(False)
    return model, digest


class FrozenTeacher(nn.Module):
    """A pre-trained teacher that never trains: always in eval mode (``train(True)`` is ignored, so
    its BatchNorm statistics stay those of the checkpoint), no gradients, forward under no_grad.

    The SHA-256 of its file is kept in a buffer, so it travels in the method's ``state_dict`` with
    the weights: a resumed run reports the hash of the weights it actually uses."""

    def __init__(self, path: str | Path, **checks):
        super().__init__()
        self.model, digest = load_teacher(path, **checks)
        self.path = str(teacher_file(path).resolve())
        self.register_buffer("sha256_bytes", checkpoint.digest_tensor(digest))
        self.train(False)

    @property
    def sha256(self) -> str:
        return checkpoint.digest_hex(self.sha256_bytes)

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    @torch.no_grad()
    def forward_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.forward_features(images)


def teacher_metadata(teachers: list[FrozenTeacher]) -> dict:
    """The metrics.json entries for pre-trained teachers (same key as CMT-KD's frozen ablation)."""
    return {"teacher_checkpoints": [t.path for t in teachers], "teacher_sha256": [t.sha256 for t in teachers]}


def check_teacher_bits(bits: list[int], cfg) -> None:
    """Teacher bit-widths for jointly trained teachers (CMT-KD, DML): non-empty, valid, and every one
    higher than the student's max(W, A) (ASSUMPTIONS.md A2); 32 means a full-precision teacher."""
    from cmtkd.quant import check_bits

    if not bits:
        raise UserError("method_args.teacher_bits is empty; give at least one teacher bit-width, e.g. [8, 6, 4]")
    student_bits = max(cfg.w_bits, cfg.a_bits)
    for b in bits:
        try:
            check_bits(b)
        except UserError as exc:
            raise UserError(f"method_args.teacher_bits: {exc}") from None
        if b <= student_bits:
            raise UserError(f"method_args.teacher_bits={bits}: every teacher needs more bits than the "
                            f"W{cfg.w_bits}A{cfg.a_bits} student (> {student_bits}); raise the teacher bits")
