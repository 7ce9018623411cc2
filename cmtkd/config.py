"""Typed run configuration: defaults in dataclasses, overridden by a YAML file, CLI flags and
``--set key=value`` (in that order). Unknown keys and wrong types are user errors.

The configuration is the single source of truth for a run: it is written resolved to
``RUN_DIR/config.yaml`` and its hash (without the keys in ``NON_RESULT_KEYS``) decides whether a
checkpoint in a run directory may be resumed.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cmtkd.data import DataConfig
from cmtkd.errors import UserError
from cmtkd.files import YamlRefused, load_yaml_text, read_yaml_mapping
from cmtkd.typed import from_dict  # noqa: F401  (part of this module's API)


@dataclass
class ModelConfig:
    width: float = 1.0            # channel multiplier (small runs use 0.25)
    variant: Literal["auto", "cifar", "imagenet"] = "auto"  # auto: from the dataset
    policy: str = "fp-first-last"  # which layers are quantized: see cmtkd.models.policy
    weight_quant: str = "auto"    # auto = binary at 1 bit, EdMIPS Gaussian-uniform at 2-8 bits
    act_quant: str = "hwgq"
    # A finished run (or its model.pt) whose weights every network the method builds starts from;
    # "" = from scratch. See cmtkd.initialization.
    init_from: str = ""
    # conv-inputs: quantize each quantized layer's input, full-precision residual stream and classifier
    # input (the EdMIPS/HWGQ references); block-outputs: quantize every block output (ledger Q7)
    quant_layout: Literal["conv-inputs", "block-outputs"] = "conv-inputs"
    # AlexNet's channels (ledger R7): auto = hwgq on ImageNet (96-256-384-384-256, the HWGQ/LQ-Nets AlexNet
    # whose numbers results/paper/reported.csv quotes), torchvision's 64-192-384-256-256 on small images
    alexnet_channels: Literal["auto", "torchvision", "hwgq"] = "auto"


@dataclass
class OptimConfig:
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    # None = by bit-width, per network: 2.5e-5 when both weights and activations are <= 2 bits,
    # 1e-4 otherwise (docs/method.md §6, SECONDARY).
    weight_decay: float | None = None
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    milestones: list[int] = field(default_factory=list)  # epochs, for schedule=step
    gamma: float = 0.1
    warmup_epochs: int = 0


@dataclass
class TrainConfig:
    device: Literal["cpu", "cuda", "auto"] = "auto"  # auto: CUDA when present, else CPU (resolved and recorded)
    threads: int = 0              # torch intra-op threads; 0 = torch's default. Match Snakemake threads.
    amp: Literal["none", "bf16", "fp16"] = "none"  # fp16 on CUDA only; fp32 (none) is the exact reference
    channels_last: bool = False
    compile: bool = False         # torch.compile each method's training step (forward_train)
    sync_bn: bool = False         # torchrun multi-GPU runs: BatchNorm statistics over the global batch (CUDA)
    deterministic: bool = True
    # CUDA: cuDNN convolutions may use TF32 tensor cores (PyTorch's default). A quantized layer's activation
    # input is s * code in fp32, which TF32 rounds to 11 significant bits (ASSUMPTIONS W18); false = no TF32
    # anywhere (exact low-bit arithmetic on CUDA as on CPU, slower). Matmuls stay fp32 either way.
    tf32: bool = True
    select: Literal["best_val", "last"] = "best_val"  # best_val: model selection on the held-out val split
    progress: Literal["auto", "bar", "none"] = "auto"  # auto: a bar on a TTY
    # Experiment trackers besides history.csv: csv | tensorboard | wandb (cmtkd.engine.loggers).
    loggers: list[str] = field(default_factory=lambda: ["csv"])
    # The memory one network of the run may need for a training step, estimated before anything is
    # allocated (cmtkd.engine.footprint); a config asking for more is refused. Raise it for a larger model.
    max_network_gib: float = 64.0


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
NON_RESULT_KEYS = ("train.progress", "train.threads", "data.num_workers", "data.eval_batch_size", "data.download",
                   "train.loggers", "train.max_network_gib")

# torch.set_num_threads has no upper bound of its own: 100000 exceeds the process's thread limit and
# OpenMP then crashes the process (segfault) instead of raising. 4096 is above the hardware threads of
# any CPU node a run would use (the largest multi-socket servers have under 2000), so no real setting
# is refused; 4096 threads start fine on a 2-core machine.
MAX_THREADS = 4096
# torch.manual_seed overflows (a ValueError traceback) above 2**64-1; seeds are kept to 63 bits, like the
# seeds the engine derives from them (epoch_seed, derive_seed), so one fits a signed 64-bit integer anywhere.
MAX_SEED = 2**63 - 1


def check_threads(threads: int, key: str = "train.threads") -> int:
    """``threads`` (torch intra-op threads, 0 = torch's default), checked; ``key`` names it in the error."""
    if not 0 <= threads <= MAX_THREADS:
        raise UserError(f"{key} must be in 0..{MAX_THREADS} (0 = torch's default), got {threads}; "
                        "use the number of cores the job may use")
    return threads


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise UserError(f"{key} must be {allowed}, got {value!r}")


def check_numbers(cfg: RunConfig) -> None:
    """Ranges of the numeric keys that the optimizer, the model builder and torch would reject late
    (after config.yaml is written), reject with a traceback, or silently misuse (nan, inf, negative
    weight decay). NaN fails every comparison, so each check is written as what is allowed."""
    o = cfg.optim
    _require(math.isfinite(o.lr) and o.lr > 0, "optim.lr", o.lr, "a finite number > 0")
    _require(math.isfinite(o.momentum) and 0 <= o.momentum < 1, "optim.momentum", o.momentum, "in [0, 1)")
    if o.nesterov and o.momentum == 0:
        raise UserError(f"optim.nesterov=true needs optim.momentum > 0, got optim.momentum={o.momentum!r}; "
                        "set optim.momentum (e.g. 0.9) or optim.nesterov=false")
    if o.weight_decay is not None:
        _require(math.isfinite(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay", o.weight_decay,
                 "a finite number >= 0 (or null: by bit-width)")
    _require(math.isfinite(o.gamma) and o.gamma > 0, "optim.gamma", o.gamma, "a finite number > 0")
    _require(o.warmup_epochs >= 0, "optim.warmup_epochs", o.warmup_epochs, ">= 0")
    _require(math.isfinite(cfg.model.width) and cfg.model.width > 0, "model.width", cfg.model.width,
             "a finite number > 0")
    _require(math.isfinite(cfg.train.max_network_gib) and cfg.train.max_network_gib > 0, "train.max_network_gib",
             cfg.train.max_network_gib, "a finite number > 0")
    for key, seed in (("seed", cfg.seed), ("data.split_seed", cfg.data.split_seed)):
        _require(0 <= seed <= MAX_SEED, key, seed, "in 0..2**63-1")
    check_threads(cfg.train.threads)


def parse_set(expr: str) -> tuple[str, Any]:
    """``'optim.lr=0.05'`` -> ``('optim.lr', 0.05)``; the value is parsed as YAML."""
    if "=" not in expr:
        raise UserError(f"--set expects key=value (e.g. optim.lr=0.05), got '{expr}'")
    key, raw = expr.split("=", 1)
    try:
        value = load_yaml_text(raw) if raw.strip() else ""
    except YamlRefused as exc:
        raise UserError(f"--set {key.strip()}: {exc}") from None
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


# Keys only a suite config (config/*.yaml, for Snakemake) has: such a file given to `cmtkd train --config`.
SUITE_ONLY_KEYS = ("experiments", "recipe", "arch_recipe", "arch_method_args", "dataset", "gpu", "gpus_per_job")


def run_config_file(path: str | Path) -> dict:
    """The config keys of ``cmtkd train --config FILE``; a suite config is recognised and the command
    that runs it named."""
    data = load_yaml(path)
    suite = [key for key in SUITE_ONLY_KEYS if key in data]
    if suite:
        raise UserError(f"{path} is a suite config for the workflow (it has {', '.join(suite)}), not the config of "
                        f"one run; run it with `snakemake --cores 2 --configfile {path}`, or give `cmtkd train "
                        f"--config` a file of run keys (`cmtkd train --print-config` shows them)")
    return data


def load_yaml(path: str | Path) -> dict:
    return read_yaml_mapping(path, "config file", missing=f"config file {path} does not exist",
                             not_mapping=f"config file {path} must hold a mapping of config keys")


def build_config(overrides: list[dict]) -> RunConfig:
    """Apply override mappings in order onto the defaults, then resolve and validate."""
    merged: dict = {}
    for o in overrides:
        # method_args is replaced key-by-key too, so YAML + --set method_args.x=... compose.
        merged = deep_merge(merged, o)
    cfg = from_dict(RunConfig, merged)
    return resolve(cfg)


def config_from_flags(*, config_files: list[str | Path] = (), method: str | None = None, arch: str | None = None,
                      dataset: str | None = None, data_root: str | None = None, w_bits: int | None = None,
                      a_bits: int | None = None, epochs: int | None = None, seed: int | None = None,
                      threads: int | None = None, device: str | None = None, compile: bool = False,
                      sets: list[str] = ()) -> RunConfig:
    """The resolved config of ``cmtkd train`` with these flags (``None``: flag not given), applied in
    the CLI's order: defaults < config files < flags < ``--set key=value`` expressions."""
    overrides = [run_config_file(path) for path in config_files]
    flags = {"method": method, "arch": arch, "w_bits": w_bits, "a_bits": a_bits, "epochs": epochs, "seed": seed}
    overrides.append({k: v for k, v in flags.items() if v is not None})
    for key, value in (("data.name", dataset), ("data.root", data_root), ("train.threads", threads),
                       ("train.device", device), ("train.compile", True if compile else None)):
        if value is not None:
            overrides.append(nest(key, value))
    overrides += [nest(*parse_set(expr)) for expr in sets]
    return build_config(overrides)


def method_options(method_cls: type, cfg: RunConfig):
    """The method's typed ``Options`` for ``cfg``: ``cfg.method_args`` coerced to the dataclass
    (defaults filled in), the options the method pins applied, then the method's own checks. The
    one place method options are validated; ``cfg`` is not changed."""
    for key in cfg.method_args:
        if key in method_cls.retired_options:
            raise UserError(f"config key 'method_args.{key}': {method_cls.retired_options[key]}")
    options = from_dict(method_cls.Options, copy.deepcopy(cfg.method_args), prefix="method_args")
    defaults = method_cls.Options()
    for key, value in method_cls.pinned.items():
        given = getattr(options, key)
        if given not in (value, getattr(defaults, key)):
            raise UserError(f"config key 'method_args.{key}': method {cfg.method} fixes method_args.{key}={value!r}, "
                            f"got {given!r}; drop the override or use a method that does not fix it")
    options = method_cls.derive_options(dataclasses.replace(options, **method_cls.pinned), cfg)
    method_cls.check_options(options, cfg)
    return options


def resolve(cfg: RunConfig) -> RunConfig:
    """A copy of ``cfg`` with every default that depends on other keys filled in (bit-widths, method
    options), checked; ``cfg`` itself is not changed."""
    from cmtkd.data.common import check_config as check_data_config
    from cmtkd.models import ARCHS, get_policy
    from cmtkd.quant import check_bits, make_act_quantizer, make_weight_quantizer
    from cmtkd.registry import get_method

    cfg = from_dict(RunConfig, asdict(cfg))  # a checked copy (also of configs built by hand)
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
    if cfg.train.device == "auto":
        # Resolved here, so config.yaml and the config hash name the device a run really used.
        import torch

        cfg.train.device = "cuda" if torch.cuda.is_available() else "cpu"
    if not 0 <= cfg.data.val_fraction < 1:
        raise UserError(f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction}")
    if cfg.train.select == "best_val" and cfg.data.val_fraction == 0:
        raise UserError("train.select=best_val needs a validation split: set data.val_fraction > 0 or train.select=last")
    check_numbers(cfg)
    # Names and bit-widths the model builder and data loader would reject, checked here so that a
    # typo fails before a run directory is created (and `--print-config` never shows an unusable config).
    check_data_config(cfg.data)
    if cfg.data.name == "digits" and cfg.data.image_size == 28:
        cfg.data.image_size = None  # the native size: the same data, so the same config hash
    policy = get_policy(cfg.model.policy)
    for role in ("first", "body", "last"):
        make_weight_quantizer(cfg.model.weight_quant, policy.weight_bits(role, cfg.w_bits))
    make_act_quantizer(cfg.model.act_quant, cfg.a_bits)
    cfg.method_args = asdict(method_options(method_cls, cfg))
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


# Keys added after runs were published, left out of the hash while at their default, so that adding
# them changed no existing run's hash (committed results and resumable run directories stay valid).
HASH_OMITTED_AT_DEFAULT = {"data.image_size": None, "train.tf32": True, "model.alexnet_channels": "auto"}
# The same for method options (cmtkd's readings of Eq. 1, ASSUMPTIONS.md A5/A19/A20).
HASH_OMITTED_METHOD_ARGS_AT_DEFAULT = {"fusion_input": "residual", "theta_from": "teachers", "requantize_fused": False}


def config_hash(cfg: RunConfig | dict) -> str:
    d = cfg if isinstance(cfg, dict) else asdict(cfg)
    if isinstance(d.get("method_args"), dict):
        omitted = HASH_OMITTED_METHOD_ARGS_AT_DEFAULT
        d = {**d, "method_args": {k: v for k, v in d["method_args"].items()
                                  if not (k in omitted and v == omitted[k])}}
    flat = {k: v for k, v in flatten(d).items() if k not in NON_RESULT_KEYS
            and not (k in HASH_OMITTED_AT_DEFAULT and v == HASH_OMITTED_AT_DEFAULT[k])}
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
