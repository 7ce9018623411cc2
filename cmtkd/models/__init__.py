"""Quantized model families, built by name. Every model is a :class:`StagedNet`."""
from __future__ import annotations

from cmtkd.errors import UserError
from cmtkd.models.alexnet import AlexNet
from cmtkd.models.common import QUANT_LAYOUTS, StagedNet, check_quant_layout
from cmtkd.models.policy import POLICIES, get_policy
from cmtkd.models.resnet import ResNet18

ARCHS = {"resnet18": ResNet18, "alexnet": AlexNet}
VARIANTS = ("cifar", "imagenet")

__all__ = ["ARCHS", "VARIANTS", "POLICIES", "QUANT_LAYOUTS", "StagedNet", "build_model", "get_policy"]


def build_model(arch: str, num_classes: int, w_bits: int = 32, a_bits: int = 32, variant: str = "cifar",
                width: float = 1.0, in_channels: int = 3, policy: str = "fp-first-last",
                weight_quant: str = "auto", act_quant: str = "hwgq", quant_layout: str = "conv-inputs",
                alexnet_channels: str = "torchvision") -> StagedNet:
    """One network. ``alexnet_channels`` (AlexNet only; a model file without the key was built with
    torchvision's): the resolved ``model.alexnet_channels``, see :func:`alexnet_channels`."""
    if arch not in ARCHS:
        raise UserError(f"unknown arch '{arch}'; choose one of: {', '.join(ARCHS)}")
    if variant not in VARIANTS:
        raise UserError(f"unknown model variant '{variant}'; choose one of: {', '.join(VARIANTS)}")
    get_policy(policy)
    check_quant_layout(quant_layout)
    extra = {"channels": alexnet_channels} if arch == "alexnet" else {}
    return ARCHS[arch](num_classes=num_classes, w_bits=w_bits, a_bits=a_bits, variant=variant, width=width,
                       in_channels=in_channels, policy=policy, weight_quant=weight_quant, act_quant=act_quant,
                       quant_layout=quant_layout, **extra)


def alexnet_channels(setting: str, variant: str) -> str:
    """``model.alexnet_channels`` resolved: ``auto`` is ``hwgq`` for the ImageNet variant (the AlexNet of
    the HWGQ/LQ-Nets numbers the tables quote) and ``torchvision`` for small images."""
    if setting != "auto":
        return setting
    return "hwgq" if variant == "imagenet" else "torchvision"
