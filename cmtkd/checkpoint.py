"""``model.pt`` and ``checkpoint.pt``: the one module that saves, loads and checks them.

Used by the trainer (checkpoint every epoch, ``model.pt`` at the end, resume), ``cmtkd evaluate``,
``cmtkd export`` and teacher loading (:mod:`cmtkd.teachers`); nothing else reads or writes them.

File format 2, a self-verifying container written atomically as one file, so a kill can never
separate a file from its hash::

    torch.save({"cmtkd": "model" | "checkpoint", "format": 2,
                "sha256": <hex SHA-256 of the payload bytes>,
                "payload": <uint8 tensor: the bytes of torch.save(content)>})

Both levels are read with ``torch.load(..., weights_only=True)``: a crafted file cannot run code, it
fails to load. The payload is hashed before it is unpickled, so flipped bits anywhere in it (the
tensor data included) are a one-line error naming the file and the fix, never a silently different
result. Everything in ``content`` is a type the safe loader accepts (tensors, containers, numbers,
strings): the trainer stores numpy's RNG state as a tensor for that reason.

Why not safetensors + JSON: a checkpoint holds nested optimizer/scheduler/RNG state and history,
which safetensors (flat name -> tensor) cannot hold without a second ad-hoc serializer; the container
keeps one file, one atomic rename and plain ``torch.load(path, weights_only=True)`` for users.

Files of format 1 (cmtkd 0.1, plain ``torch.save`` without a hash) are refused with one line: they
cannot be verified, and the old checkpoints cannot be loaded safely at all (numpy arrays inside).

A teacher is identified by the SHA-256 of its whole ``model.pt`` (what ``sha256sum`` prints).

A ``model.pt`` holds one network, except that of a teachers-only run (``cmtkd-teachers``): its
``arch_config`` then lists the arch config of every teacher under ``fused_teachers`` (plus the fusion
points), and its ``state_dict`` holds all of them and θ (:func:`is_network_set`,
:func:`build_network_set`). Same container, same checks.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from cmtkd.errors import UserError
from cmtkd.files import atomic_write_bytes, read_regular_file, sha256_bytes

MODEL_FILE = "model.pt"
CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = 2
MODEL_KEYS = ("arch_config", "state_dict", "method", "selected_epoch", "config_hash")
CHECKPOINT_KEYS = ("epoch", "config", "config_hash", "method", "optimizer", "scheduler", "scaler", "rng",
                   "history", "best", "train_seconds", "train_images", "peak_mem_mib", "world_size")
# Written since the key was added; checkpoints from before lack it and still resume.
CHECKPOINT_OPTIONAL_KEYS = ("threads",)
_KEYS = {"model": MODEL_KEYS, "checkpoint": CHECKPOINT_KEYS}
_WHAT = {"model": "model file", "checkpoint": "checkpoint"}


# ------------------------------------------------------------------------------------ container
def encode(kind: str, content: dict) -> bytes:
    """The bytes of a format-2 file holding ``content``."""
    inner = io.BytesIO()
    torch.save(content, inner)
    payload = inner.getvalue()
    outer = io.BytesIO()
    torch.save({"cmtkd": kind, "format": FORMAT, "sha256": sha256_bytes(payload),
                "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}, outer)
    return outer.getvalue()


def read_bytes(path: str | Path, what: str, fix: str) -> bytes:
    path = Path(path)
    try:
        return read_regular_file(path)
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist; {fix}") from None
    except OSError as exc:
        raise UserError(f"{what} {path} is unreadable ({exc.strerror}); {fix}") from None


def _safe_load(data: bytes):
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def decode(data: bytes, path: str | Path, kind: str, fix: str, what: str | None = None) -> dict:
    """Check and unpack the bytes of a format-2 file of ``kind`` read from ``path``: safe loading,
    kind, format, SHA-256 of the payload, required keys. Every problem is one line with ``fix``."""
    what = what or _WHAT[kind]
    try:
        outer = _safe_load(data)
    except Exception as exc:  # noqa: BLE001 - truncated, not a torch file, or refused by the safe loader
        raise UserError(f"{what} {path} is corrupt or not a file cmtkd can load safely ({type(exc).__name__}); "
                        f"{fix}") from None
    if not isinstance(outer, dict) or "cmtkd" not in outer:
        if isinstance(outer, dict) and ("arch_config" in outer or outer.get("format") == 1):
            raise UserError(f"{what} {path} was written by an older cmtkd (no content hash, cannot be verified); "
                            f"{fix}")
        raise UserError(f"{what} {path} is not a cmtkd {kind} file; {fix}")
    if outer["cmtkd"] != kind:
        hint = f" (pass a run directory or its {MODEL_FILE}, not {CHECKPOINT_FILE})" if kind == "model" else ""
        raise UserError(f"{what} {path} is a cmtkd {outer['cmtkd']} file, not a {kind} file{hint}; {fix}")
    if outer.get("format") != FORMAT:
        raise UserError(f"{what} {path} has file format {outer.get('format')!r}, this cmtkd reads format {FORMAT}; "
                        f"{fix}")
    payload = outer.get("payload")
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.dim() != 1:
        raise UserError(f"{what} {path} is damaged (no payload); {fix}")
    raw = payload.numpy().tobytes()
    if sha256_bytes(raw) != outer.get("sha256"):
        raise UserError(f"{what} {path} fails its SHA-256 check (damaged or edited after cmtkd wrote it); {fix}")
    try:
        content = _safe_load(raw)
    except Exception as exc:  # noqa: BLE001 - a hash-consistent payload the safe loader refuses
        raise UserError(f"{what} {path} holds content cmtkd cannot load safely ({type(exc).__name__}); "
                        f"{fix}") from None
    if not isinstance(content, dict):
        raise UserError(f"{what} {path} holds a {type(content).__name__}, not a cmtkd {kind}; {fix}")
    missing = [k for k in _KEYS[kind] if k not in content]
    if missing:
        raise UserError(f"{what} {path} lacks the key(s) {', '.join(missing)}; {fix}")
    return content


def save(path: str | Path, kind: str, content: dict) -> None:
    missing = [k for k in _KEYS[kind] if k not in content]
    if missing:  # a programming error, not a user's
        raise ValueError(f"a cmtkd {kind} needs the keys {', '.join(missing)}")
    atomic_write_bytes(path, encode(kind, content))


def load(path: str | Path, kind: str, fix: str, what: str | None = None) -> dict:
    return decode(read_bytes(path, what or _WHAT[kind], fix), path, kind, fix, what)


# ---------------------------------------------------------------------------------- model.pt
def save_model(path: str | Path, *, arch_config: dict, state_dict: dict, method: str,
               selected_epoch: int | None, config_hash: str) -> None:
    save(path, "model", {"arch_config": arch_config, "state_dict": state_dict, "method": method,
                         "selected_epoch": selected_epoch, "config_hash": config_hash})


def load_model(path: str | Path, fix: str, what: str = "model file") -> dict:
    """The checked content of a ``model.pt`` (arch_config, state_dict, method, selected_epoch, ...)."""
    return load(path, "model", fix, what)


def build_network(blob: dict, path: str | Path, fix: str, what: str = "model file") -> nn.Module:
    """Rebuild the network of a loaded ``model.pt`` and load its weights (strictly)."""
    if not isinstance(blob["arch_config"], dict):
        raise UserError(f"{what} {path} has no arch_config mapping; {fix}")
    if is_network_set(blob["arch_config"]):
        n = len(blob["arch_config"][NETWORK_SET_KEY])
        raise UserError(f"{what} {path} holds the {n} fused teachers of a teachers-only run (method "
                        f"{blob['method']}), not one network; pass it to cmtkd-frozen as method_args.teachers_run, "
                        f"or give a run that trained one network")
    return _load_weights(_build(blob["arch_config"], path, fix, what, blob["state_dict"]), blob["state_dict"], path,
                         fix, what)


# A file's arch_config could describe a network of any size: it is built on the meta device first (no
# memory), and one beyond this many parameters is refused (ResNet-18 ImageNet at width 1 has 11.7 M).
MAX_PARAMETERS = 2_000_000_000


def _build(arch_config, path, fix: str, what: str, state_dict=None) -> nn.Module:
    """The network ``arch_config`` describes; built on the meta device first (no memory) to check its size
    and, given the file's ``state_dict``, that every weight the file holds has the shape built, so a crafted
    arch_config costs no memory beyond the file's own tensors."""
    from cmtkd.models import build_model

    if not isinstance(arch_config, dict):
        raise UserError(f"{what} {path} has an arch_config that is not a mapping; {fix}")
    # files written before model.quant_layout existed were trained with block-outputs
    kwargs = {"quant_layout": "block-outputs", **arch_config}

    def build(meta: bool) -> nn.Module:
        try:
            with torch.device("meta") if meta else contextlib.nullcontext():
                network = build_model(**kwargs)
            size = sum(p.numel() for p in network.parameters())
            if size > MAX_PARAMETERS:
                raise UserError(f"a network of {size:.3g} parameters (more than {MAX_PARAMETERS:.0e})")
            return network
        except (TypeError, ValueError, OverflowError, RuntimeError, UserError) as exc:  # RuntimeError: sizes overflow
            raise UserError(f"{what} {path} has an arch_config this version cannot build ({exc}); {fix}") from None

    if isinstance(state_dict, dict):
        wrong = [k for k, v in build(meta=True).state_dict().items()
                 if not isinstance(state_dict.get(k), torch.Tensor) or state_dict[k].shape != v.shape]
        if wrong:
            raise UserError(f"{what} {path}: weights do not fit its own arch_config ({len(wrong)} tensors missing "
                            f"or of another shape, e.g. {wrong[0]}); {fix}")
    else:
        build(meta=True)  # the size alone
    return build(meta=False)


def _load_weights(model: nn.Module, state_dict, path, fix: str, what: str) -> nn.Module:
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{what} {path}: weights do not fit its own arch_config ({first}); {fix}") from None
    return model


# A teachers-only run's model.pt: arch_config[NETWORK_SET_KEY] lists one arch config per network.
NETWORK_SET_KEY = "fused_teachers"


def is_network_set(arch_config) -> bool:
    """Whether a model file's ``arch_config`` describes several networks (a teachers-only run)."""
    return isinstance(arch_config, dict) and NETWORK_SET_KEY in arch_config


def build_network_set(blob: dict, path: str | Path, fix: str,
                      assemble: Callable[[list[nn.Module], dict], nn.Module], what: str = "model file") -> nn.Module:
    """Rebuild the networks of a teachers-only ``model.pt``: each from its own arch config, put
    together by ``assemble(networks, arch_config)`` (the caller's module, e.g. the fused teachers with
    θ), then every weight loaded strictly."""
    config = blob["arch_config"]
    members = config.get(NETWORK_SET_KEY) if isinstance(config, dict) else None
    if not isinstance(members, list) or not members:
        raise UserError(f"{what} {path} does not list its networks (arch_config.{NETWORK_SET_KEY}); {fix}")
    networks = [_build(member, path, fix, what) for member in members]
    try:
        model = assemble(networks, config)
    except (TypeError, ValueError, KeyError) as exc:
        raise UserError(f"{what} {path} has a network-set arch_config this version cannot build ({exc}); "
                        f"{fix}") from None
    return _load_weights(model, blob["state_dict"], path, fix, what)


# ----------------------------------------------------------------------------- checkpoint.pt
def save_checkpoint(path: str | Path, content: dict) -> None:
    save(path, "checkpoint", content)


def load_checkpoint(path: str | Path, differences: Callable[[dict], list[str]]) -> dict:
    """The checked content of a ``checkpoint.pt``. ``differences(saved_config)`` lists the
    result-relevant config keys in which the saved run differs from the one resuming it (the caller's
    :func:`cmtkd.config.config_diff`: this module sits below the config layer); any is an error."""
    path = Path(path)
    fix = "delete it to train the run from scratch"
    content = load(path, "checkpoint", fix)
    wrong = _checkpoint_type_errors(content)
    if wrong:
        raise UserError(f"checkpoint {path} is not one cmtkd wrote ({', '.join(wrong[:4])}); {fix}")
    diff = differences(content["config"])
    if diff:
        raise UserError(f"{path.parent} holds a checkpoint of a different configuration (differs in: "
                        f"{', '.join(diff[:6])}); use a new --out or delete the directory")
    return content


def _checkpoint_type_errors(content: dict) -> list[str]:
    """What in a checkpoint's content (verified SHA-256, so crafted or from a broken writer) has a type the
    trainer cannot resume from; [] if nothing. The state dicts are checked when they are loaded."""
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    epoch, history, best, rng = (content.get(k) for k in ("epoch", "history", "best", "rng"))
    checks = {
        "epoch is not a count": isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0,
        "config is not a mapping": isinstance(content.get("config"), dict),
        "history is not one row per epoch": isinstance(history, list) and all(isinstance(r, dict) for r in history)
        and isinstance(epoch, int) and len(history) == epoch,
        "best is not a mapping with epoch and val_top1": isinstance(best, dict)
        and {"epoch", "val_top1", "student_state"} <= set(best),
        "rng is not the random states": isinstance(rng, dict) and {"python", "numpy", "torch"} <= set(rng),
        "a state is not a mapping": all(isinstance(content.get(k), dict)
                                        for k in ("method", "optimizer", "scheduler", "scaler")),
        "a counter is not a number": all(number(content.get(k)) for k in ("train_seconds", "train_images")),
    }
    return [problem for problem, ok in checks.items() if not ok]


# ------------------------------------------------------------------------- digests in state
def digest_tensor(hex_digest: str) -> torch.Tensor:
    """A SHA-256 as a uint8 tensor, to keep it in a module's state_dict (it then travels with resume)."""
    return torch.tensor(list(bytes.fromhex(hex_digest)), dtype=torch.uint8)


def digest_hex(tensor: torch.Tensor) -> str:
    return bytes(tensor.cpu().tolist()).hex()


def read_content(path: str | Path) -> dict:
    """The checked content of a ``checkpoint.pt`` (by that name) or a ``model.pt`` (any other name),
    for tests and tools that inspect a run."""
    kind = "checkpoint" if Path(path).name == CHECKPOINT_FILE else "model"
    return load(path, kind, "pass a file written by `cmtkd train`")
