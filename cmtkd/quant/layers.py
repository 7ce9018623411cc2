"""Conv and linear layers whose weight goes through a weight quantizer in every forward pass.

The float weight stays the trained parameter (the "latent" weight); the quantized copy is
recomputed each step, and the straight-through estimator carries its gradient back.  Activation
quantization is separate (it replaces the ReLU; see :func:`cmtkd.quant.make_act_quantizer`).
With ``w_bits=32`` both layers are numerically identical to their ``torch.nn`` parents, and
their ``state_dict`` keys are the same (plus any quantizer parameters, e.g. LSQ's step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cmtkd.quant.weights import make_weight_quantizer


class _QuantizedWeight:
    """Mixin for a torch layer whose forward uses ``weight_quantizer(weight)``: adds the keyword
    args ``w_bits`` and ``weight_quant`` to the layer's constructor and shows them in its repr."""

    def __init__(self, *args, w_bits: int = 32, weight_quant: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_quantizer = make_weight_quantizer(weight_quant, w_bits)
        self.w_bits = self.weight_quantizer.bits
        self.weight_quant = weight_quant

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, w_bits={self.w_bits}, weight_quant={self.weight_quant}"


class QConv2d(_QuantizedWeight, nn.Conv2d):
    """``nn.Conv2d`` with a quantized weight; extra keyword args ``w_bits`` and ``weight_quant``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # _conv_forward calls F.conv2d and honours padding_mode, exactly as nn.Conv2d does.
        return self._conv_forward(input, self.weight_quantizer(self.weight), self.bias)


class QLinear(_QuantizedWeight, nn.Linear):
    """``nn.Linear`` with a quantized weight; extra keyword args ``w_bits`` and ``weight_quant``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight_quantizer(self.weight), self.bias)
