"""Pieces shared by the quantized model families."""
from __future__ import annotations

import torch
from torch import nn

from cmtkd.errors import UserError
from cmtkd.quant import FULL_PRECISION, QConv2d, QLinear, make_act_quantizer, make_weight_quantizer
from cmtkd.models.policy import get_policy

# Where the activation quantizers sit (ledger Q7):
# * ``conv-inputs``   - the input of every quantized layer is quantized; the residual stream, the block
#   outputs and the input of a full-precision last layer stay full precision. For ResNet-18 this is
#   the pre-activation block of the EdMIPS/HWGQ code (REF); for AlexNet only the classifier's input
#   changes (a plain chain quantizes each layer's input either way).
# * ``block-outputs`` - every ReLU (block outputs after the residual add included) is replaced by the
#   quantizer, so the residual stream and the classifier input are low-bit (this project's first layout).
QUANT_LAYOUTS = ("conv-inputs", "block-outputs")


def check_quant_layout(layout: str) -> str:
    if layout not in QUANT_LAYOUTS:
        raise UserError(f"unknown model.quant_layout '{layout}'; choose one of: {', '.join(QUANT_LAYOUTS)}")
    return layout


class LayerFactory:
    """Builds layers with the bit-widths a model's quantization policy assigns to them."""

    def __init__(self, w_bits: int, a_bits: int, policy: str, weight_quant: str, act_quant: str):
        self.w_bits, self.a_bits = w_bits, a_bits
        self.policy = get_policy(policy)
        self.weight_quant, self.act_quant = weight_quant, act_quant
        # Fail early (with a UserError) on a quantizer name or bit-width the quantizers reject.
        make_weight_quantizer(weight_quant, w_bits)
        make_act_quantizer(act_quant, a_bits)

    def conv(self, cin, cout, kernel, stride=1, padding=0, role="body", bias=False) -> QConv2d:
        bits = self.policy.weight_bits(role, self.w_bits)
        return QConv2d(cin, cout, kernel, stride=stride, padding=padding, bias=bias,
                       w_bits=bits, weight_quant=self.weight_quant)

    def linear(self, cin, cout, role="body", bias=True) -> QLinear:
        bits = self.policy.weight_bits(role, self.w_bits)
        return QLinear(cin, cout, bias=bias, w_bits=bits, weight_quant=self.weight_quant)

    def act(self) -> nn.Module:
        """The activation quantizer that replaces a ReLU (HWGQ by default)."""
        return make_act_quantizer(self.act_quant, self.a_bits)

    def input_act(self, role: str = "body") -> nn.Module:
        """What a layer of ``role`` reads in the ``conv-inputs`` layout: the activation quantizer, or a
        plain ReLU when the policy keeps that layer at full precision (EdMIPS's FC reads ``relu(x)``)."""
        if self.policy.weight_bits(role, 2) == FULL_PRECISION:
            return nn.ReLU()
        return self.act()


def scaled(channels: int, width: float) -> int:
    return max(4, int(round(channels * width)))


class StagedNet(nn.Module):
    """A network that is a sequence of named stages (``self.stages``), so a method can run it stage
    by stage and fuse or compare features between stages. The last stage returns the logits."""

    stages: nn.ModuleDict

    @property
    def stage_names(self) -> list[str]:
        return list(self.stages.keys())

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Output of every stage, keyed by stage name (the last one is the logits)."""
        feats = {}
        for name, stage in self.stages.items():
            x = stage(x)
            feats[name] = x
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages.values():
            x = stage(x)
        return x


def init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
