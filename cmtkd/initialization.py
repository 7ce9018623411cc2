"""``model.init_from``: start a run's networks from a trained network instead of from scratch.

QAT practice (LSQ, EWGS, SQAKD) starts a quantized network from a trained full-precision one. With
``--set model.init_from=RUN_DIR`` (a finished run's directory or its ``model.pt``) every network the
method builds with :meth:`~cmtkd.methods.base.Method.build_network` — the student and the jointly
trained teachers of ``cmtkd``/``dml`` — starts from that network's weights. Pre-trained frozen teachers
(``kd``, ``mtkd``, ``kd-at``, ``cmtkd-frozen``) keep their own checkpoints, and CMT-KD's
``teacher_init=checkpoints`` still overrides the teachers.

What is copied: every weight, bias and BatchNorm parameter/statistic. Bit-widths may differ (that
is the point: FP -> W2A2); architecture, classes, input channels, stem variant and width must match
(checked, one error line naming the key). Quantizer parameters are NOT copied (their meaning depends
on the bit-width): HWGQ, Gaussian and binary quantizers have none; LSQ step sizes initialise from the
first batch they see, which is now the loaded network's data (LSQ's own recipe); PACT's clip starts at
its usual 10.0. The source file's SHA-256 goes to ``metrics.json`` (``init_sha256``).
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from cmtkd.errors import UserError

# arch_config keys that must agree between the source and the network it initialises (the bits may not).
MATCHED_KEYS = ("arch", "num_classes", "in_channels", "variant", "width", "quant_layout", "alexnet_channels")


def is_quantizer_state(key: str) -> bool:
    return "quantizer." in key or key.split(".")[-1] in ("step", "alpha", "initialized")


def init_file(path: str | Path) -> Path:
    path = Path(path)
    return path / "model.pt" if path.is_dir() else path


def source_arch_config(path: str) -> dict:
    """The arch_config of the model file ``path`` names (checked and read safely by cmtkd.checkpoint)."""
    from cmtkd import checkpoint

    file = init_file(path)
    if not file.is_file():
        raise UserError(f"model.init_from={path}: no such run directory with a model.pt, nor a model file; "
                        f"train that network first (`cmtkd train ... --out DIR`) and pass DIR")
    blob = checkpoint.load_model(file, fix="pass a finished run directory or its model.pt",
                                 what=f"model.init_from={path}: model file")
    if not isinstance(blob["arch_config"], dict):
        raise UserError(f"model.init_from={path}: {file} has no arch_config; pass a run directory or its model.pt")
    return blob["arch_config"]


def check_matching(path: str, source: dict, target: dict) -> None:
    source = {"quant_layout": "block-outputs", **source}  # model files from before quant_layout existed
    if source.get("arch") == "alexnet" or target.get("arch") == "alexnet":  # absent: torchvision's channels
        source = {"alexnet_channels": "torchvision", **source}
        target = {"alexnet_channels": "torchvision", **target} if "arch" in target and "variant" in target else target
    for key in MATCHED_KEYS:
        if key in target and source.get(key) != target[key]:
            raise UserError(f"model.init_from={path}: {key} is {source.get(key)!r} there but {target[key]!r} "
                            f"in this run; initialise from a run with the same {key}")


def check_init_source(cfg) -> None:
    """Early check, before the run directory is touched: a readable model file of the run's arch and width
    (classes, channels and stem are checked when the networks are built, once the dataset is known)."""
    if cfg.model.init_from:
        check_matching(cfg.model.init_from, source_arch_config(cfg.model.init_from),
                       {"arch": cfg.arch, "width": cfg.model.width})


def initialize_from(network: nn.Module, path: str, arch_config: dict) -> str:
    """Copy the trained weights of ``path`` into ``network`` (built from ``arch_config``); returns the
    source's SHA-256."""
    from cmtkd.teachers import load_teacher

    check_matching(path, source_arch_config(path), arch_config)
    # load_teacher checks the file is a cmtkd model file whose weights fit its own arch_config.
    source, digest = load_teacher(path, arch=arch_config["arch"], num_classes=arch_config["num_classes"],
                                  in_channels=arch_config["in_channels"], role="model.init_from network")
    weights = {k: v for k, v in source.state_dict().items() if not is_quantizer_state(k)}
    missing, unexpected = network.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not is_quantizer_state(k)]
    if missing or unexpected:
        raise UserError(f"model.init_from={path}: its weights do not fit this network (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    return digest
