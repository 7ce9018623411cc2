"""Typed run configuration: defaults in dataclasses, overridden by a YAML file, CLI flags and
``--set key=value`` (in that order). Unknown keys and wrong types are user errors.

The configuration is the single source of truth for a run: it is written resolved to
``RUN_DIR/config.yaml`` and its hash (without the keys in ``NON_RESULT_KEYS``) decides whether a
checkpoint in a run directory may be resumed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cmtkd.data import DataConfig
from cmtkd.errors import UserError


@dataclass
class ModelConfig:
    width: float = 1.0            # channel multiplier (small runs use 0.25)
    variant: str = "auto"         # auto (from the dataset) | cifar | imagenet
    policy: str = "fp-first-last"  # which layers are quantized: see cmtkd.models.policy
    weight_quant: str = "auto"    # auto = binary at 1 bit, EdMIPS Gaussian-uniform at 2-8 bits
    act_quant: str = "hwgq"


@dataclass
class OptimConfig:
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    # None = by bit-width, per network: 2.5e-5 when both weights and activations are <= 2 bits,
    # 1e-4 otherwise (PAPER.md §6, SECONDARY).
    weight_decay: float | None = None
    schedule: str = "cosine"      # cosine | step | constant
    milestones: list[int] = field(default_factory=list)  # epochs, for schedule=step
    gamma: float = 0.1
    warmup_epochs: int = 0


@dataclass
class TrainConfig:
    device: str = "auto"          # auto (CUDA when present, else CPU; resolved and recorded) | cpu | cuda
    threads: int = 0              # torch intra-op threads; 0 = torch's default. Match Snakemake threads.
    amp: str = "none"             # none | bf16 | fp16 (fp16 on CUDA only); fp32 is the exact reference
    channels_last: bool = False
    compile: bool = False         # torch.compile each method's training step (forward_train)
    sync_bn: bool = False         # torchrun multi-GPU runs: BatchNorm statistics over the global batch (CUDA)
    deterministic: bool = True
    select: str = "best_val"      # best_val (model selection on the held-out val split) | last
    progress: str = "auto"        # auto (bar on a TTY) | bar | none


@dataclass
class RunConfig:
    method: str = "qat"
    arch: str = "resnet18"
    w_bits: int | None = None     # None = 32 for method fp, 2 otherwise
    a_bits: int | None = None
    epochs: int = 2
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Options of the chosen method, checked against that method's own Options dataclass.
    method_args: dict[str, Any] = field(default_factory=dict)


# Keys that may differ between a checkpoint and the resuming command without changing results.
NON_RESULT_KEYS = ("train.progress", "train.threads", "data.num_workers", "data.eval_batch_size", "data.download")

_CHOICES = {
    "model.variant": ("auto", "cifar", "imagenet"),
    "optim.schedule": ("cosine", "step", "constant"),
    "train.device": ("cpu", "cuda", "auto"),
    "train.amp": ("none", "bf16", "fp16"),
    "train.select": ("best_val", "last"),
    "train.progress": ("auto", "bar", "none"),
}


# PyYAML (YAML 1.1) reads exponent floats without a dot (``1e-3``) as strings; accept them for floats.
_EXPONENT_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except UserError as exc:
                errors.append(exc)
        raise UserError(f"config key '{key}' expects {' or '.join(_type_name(a) for a in typing.get_args(tp))}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise UserError(f"config key '{key}' expects null, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{key}' expects a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}' expects a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=key)
    raise UserError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")


def from_dict(cls, data: Any, prefix: str = "", base=None):
    """Build dataclass ``cls`` from a (partial) mapping, starting from ``base`` or the defaults."""
    if not isinstance(data, dict):
        raise UserError(f"config section '{prefix or 'top level'}' must be a mapping, got {data!r}")
    obj = base if base is not None else cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise UserError(f"unknown config key '{full}'; valid keys here: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            value = from_dict(tp, value, prefix=full, base=getattr(obj, key))
        else:
            value = _coerce(value, tp, full)
        setattr(obj, key, value)
    return obj


def parse_set(expr: str) -> tuple[str, Any]:
    """``'optim.lr=0.05'`` -> ``('optim.lr', 0.05)``; the value is parsed as YAML."""
    if "=" not in expr:
        raise UserError(f"--set expects key=value (e.g. optim.lr=0.05), got '{expr}'")
    key, raw = expr.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def nest(key: str, value: Any) -> dict:
    out: dict = {}
    cursor = out
    parts = key.split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return out


def deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of config keys")
    return data


def build_config(overrides: list[dict]) -> RunConfig:
    """Apply override mappings in order onto the defaults, then resolve and validate."""
    merged: dict = {}
    for o in overrides:
        # method_args is replaced key-by-key too, so YAML + --set method_args.x=... compose.
        merged = deep_merge(merged, o)
    cfg = from_dict(RunConfig, merged)
    return resolve(cfg)


def resolve(cfg: RunConfig) -> RunConfig:
    from cmtkd.data.common import check_config as check_data_config
    from cmtkd.models import ARCHS, get_policy
    from cmtkd.quant import check_bits, make_act_quantizer, make_weight_quantizer
    from cmtkd.registry import get_method

    method_cls = get_method(cfg.method)  # raises UserError for unknown names
    if cfg.arch not in ARCHS:
        raise UserError(f"unknown arch '{cfg.arch}'; choose one of: {', '.join(ARCHS)}")
    if cfg.w_bits is None:
        cfg.w_bits = method_cls.default_bits
    if cfg.a_bits is None:
        cfg.a_bits = method_cls.default_bits
    for name in ("w_bits", "a_bits"):
        try:
            check_bits(getattr(cfg, name))
        except UserError as exc:
            raise UserError(f"{name}: {exc}") from None
    if cfg.epochs < 1:
        raise UserError(f"epochs must be >= 1, got {cfg.epochs}")
    flat = flatten(asdict(cfg))
    for key, allowed in _CHOICES.items():
        if flat[key] not in allowed:
            raise UserError(f"config key '{key}' must be one of {', '.join(allowed)}; got {flat[key]!r}")
    if cfg.train.device == "auto":
        # Resolved here, so config.yaml and the config hash name the device a run really used.
        import torch

        cfg.train.device = "cuda" if torch.cuda.is_available() else "cpu"
    if not 0 <= cfg.data.val_fraction < 1:
        raise UserError(f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction}")
    if cfg.train.select == "best_val" and cfg.data.val_fraction == 0:
        raise UserError("train.select=best_val needs a validation split: set data.val_fraction > 0 or train.select=last")
    if cfg.model.width <= 0:
        raise UserError(f"model.width must be > 0, got {cfg.model.width}")
    # Names and bit-widths the model builder and data loader would reject, checked here so that a
    # typo fails before a run directory is created (and `--print-config` never shows an unusable config).
    check_data_config(cfg.data)
    policy = get_policy(cfg.model.policy)
    for role in ("first", "body", "last"):
        make_weight_quantizer(cfg.model.weight_quant, policy.weight_bits(role, cfg.w_bits))
    make_act_quantizer(cfg.model.act_quant, cfg.a_bits)
    # Method options: validated (and defaults filled in) by the method's own dataclass.
    options = from_dict(method_cls.Options, cfg.method_args, prefix="method_args")
    cfg.method_args = asdict(options)
    method_cls.check_config(cfg)
    return cfg


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and k != "method_args":
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def to_dict(cfg: RunConfig) -> dict:
    return asdict(cfg)


def config_hash(cfg: RunConfig | dict) -> str:
    d = cfg if isinstance(cfg, dict) else asdict(cfg)
    flat = {k: v for k, v in flatten(d).items() if k not in NON_RESULT_KEYS}
    blob = json.dumps(flat, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _with_defaults(d: dict) -> dict:
    """Keys added to RunConfig since ``d`` was written take their defaults (old runs stay resumable)."""
    try:
        return asdict(from_dict(RunConfig, d))
    except UserError:
        return d  # a key that no longer exists: the diff names it


def config_diff(a: dict, b: dict) -> list[str]:
    """Result-relevant keys whose values differ between two config dicts."""
    fa, fb = flatten(_with_defaults(a)), flatten(_with_defaults(b))
    return sorted(k for k in set(fa) | set(fb) if k not in NON_RESULT_KEYS and fa.get(k) != fb.get(k))


def load_run_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml); pass the --out directory of a `cmtkd train` run")
    return resolve(from_dict(RunConfig, load_yaml(path)))
