"""Conv and linear layers whose weight goes through a weight quantizer in every forward pass.

The float weight stays the trained parameter (the "latent" weight); the quantized copy is
recomputed each step, and the straight-through estimator carries its gradient back.  Activation
quantization is separate (it replaces the ReLU; see :func:`cmtkd.quant.make_act_quantizer`), or
the layer is given it as ``input_quantizer`` and applies it to its own input.
With ``w_bits=32`` and no input quantizer both layers are numerically identical to their
``torch.nn`` parents, and their ``state_dict`` keys are the same (plus any quantizer parameters,
e.g. LSQ's step, and ``input_quantizer.*`` when one is given).

Exact low-bit arithmetic under autocast.  Autocast would cast a quantized layer's operands to
bf16/fp16, where ``s * code`` is not exact (an 8-bit HWGQ activation has 256 levels but only 239
distinct bf16 values), and a bf16 conv/matmul also rounds its *output* to bf16 (8 significant
bits; on CPU and in cuDNN alike, although both accumulate in fp32).  So when autocast is on and
the weight is quantized, the layer computes on the integer codes instead: weight codes
(``|code| <= 2^b - 1``), activation codes ``0 .. 2^b - 1`` when it has an input quantizer
(otherwise its input as fp32), an fp32 conv/matmul with autocast off, then the scales
``s_w * s_a`` and the bias in fp32.  Codes are small integers, so every product and every partial
sum below 2^24 is exact: the output equals the fp32 layer's up to fp32 summation order.  Integer
codes are also exact in TF32 (11 significant bits), but an input that is not codes is not: the built
models apply their activation quantizers as modules of their own, so their layers read activation
values ``s * code`` in fp32, which cuDNN's TF32 convolutions round (up to 2^-11 of a level;
``train.tf32: false`` turns TF32 off; ASSUMPTIONS W18).  Gradients are the quantizers' straight-through ones
(:meth:`grid` keeps them).  Without autocast nothing changes (the fp32 path is bit for bit the
previous one).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cmtkd.quant.common import FULL_PRECISION, Grid
from cmtkd.quant.weights import make_weight_quantizer


class _QuantizedWeight:
    """Mixin for a torch layer whose forward uses ``weight_quantizer(weight)``: adds the keyword
    args ``w_bits``, ``weight_quant`` and ``input_quantizer`` to the layer's constructor, shows
    them in its repr, and runs the exact code path under autocast (see the module docstring)."""

    exact_under_autocast: ClassVar[bool] = True
    """Class-wide switch of the exact code path; ``benchmarks/bench_bf16_exact.py`` turns it off to
    time the plain (lossy) autocast path.  Not a config option: exactness is the contract."""

    def __init__(self, *args, w_bits: int = 32, weight_quant: str = "auto",
                 input_quantizer: nn.Module | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_quantizer = make_weight_quantizer(weight_quant, w_bits)
        self.w_bits = self.weight_quantizer.bits
        self.weight_quant = weight_quant
        # An activation quantizer (cmtkd.quant.make_act_quantizer) applied to this layer's input.
        self.input_quantizer = input_quantizer

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, w_bits={self.w_bits}, weight_quant={self.weight_quant}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.exact_under_autocast and self.w_bits != FULL_PRECISION and torch.is_autocast_enabled(
                input.device.type):
            return self._exact_forward(input)
        if self.input_quantizer is not None:
            input = self.input_quantizer(input)
        return self._apply_weight(input, self.weight_quantizer(self.weight), self.bias)

    def _exact_forward(self, input: torch.Tensor) -> torch.Tensor:
        with torch.autocast(input.device.type, enabled=False):
            x = input.float()
            input_scale = None
            if self.input_quantizer is not None:
                if hasattr(self.input_quantizer, "grid"):
                    x, input_scale = self.input_quantizer.grid(x)
                else:  # a 32-bit activation (ReLU) has no grid
                    x = self.input_quantizer(x)
            weight: Grid = self.weight_quantizer.grid(self.weight.float())
            out = self._apply_weight(x, weight.codes, None)
            scale = weight.scale if input_scale is None else weight.scale * input_scale
            out = out * self._per_output_channel(scale)
            if self.bias is not None:
                out = out + self._per_output_channel(self.bias.float())
            return out

    def _apply_weight(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                      ) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def _per_output_channel(value):
        raise NotImplementedError


class QConv2d(_QuantizedWeight, nn.Conv2d):
    """``nn.Conv2d`` with a quantized weight; extra keyword args ``w_bits``, ``weight_quant`` and
    ``input_quantizer``."""

    def _apply_weight(self, input, weight, bias):
        # _conv_forward calls F.conv2d and honours padding_mode, exactly as nn.Conv2d does.
        return self._conv_forward(input, weight, bias)

    @staticmethod
    def _per_output_channel(value):
        # A scalar, or one value per output channel (dim 1 of N C H W).
        return value.reshape(-1, 1, 1) if isinstance(value, torch.Tensor) and value.dim() else value


class QLinear(_QuantizedWeight, nn.Linear):
    """``nn.Linear`` with a quantized weight; extra keyword args ``w_bits``, ``weight_quant`` and
    ``input_quantizer``."""

    def _apply_weight(self, input, weight, bias):
        return F.linear(input, weight, bias)

    @staticmethod
    def _per_output_channel(value):
        return value  # output channels are the last dim, so a (out_features,) vector broadcasts
