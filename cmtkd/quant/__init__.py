"""Quantizers for CMT-KD: HWGQ activations and binary/Gaussian weights (what the paper builds on),
plus PACT, LSQ and DoReFa for the plain-quantization baselines.

Plain PyTorch; straight-through estimators are tensor identities so ``torch.compile`` can fuse
them.  ``bits == 32`` (:data:`FULL_PRECISION`) means not quantized.  Bad names or bit-widths raise
:class:`cmtkd.errors.UserError`.  Every quantizer can also give its output as integer codes and a
scale (``grid``), which the quantized layers use to stay exact under bf16/fp16 autocast
(:mod:`cmtkd.quant.layers`).
"""

from cmtkd.quant.activations import (
    ACT_QUANTIZERS,
    HWGQ,
    PACT,
    DoReFaActivation,
    LSQActivation,
    make_act_quantizer,
)
from cmtkd.quant.common import FULL_PRECISION, GAUSSIAN_WEIGHT_SCALES, HWGQ_STEPS, Grid, check_bits
from cmtkd.quant.layers import QConv2d, QLinear
from cmtkd.quant.weights import (
    WEIGHT_QUANTIZERS,
    BinaryWeight,
    DoReFaWeight,
    GaussianWeight,
    LSQWeight,
    gaussian_quantize,
    gaussian_scale,
    make_weight_quantizer,
)

__all__ = [
    "ACT_QUANTIZERS",
    "FULL_PRECISION",
    "GAUSSIAN_WEIGHT_SCALES",
    "Grid",
    "HWGQ",
    "HWGQ_STEPS",
    "PACT",
    "WEIGHT_QUANTIZERS",
    "BinaryWeight",
    "DoReFaActivation",
    "DoReFaWeight",
    "GaussianWeight",
    "LSQActivation",
    "LSQWeight",
    "QConv2d",
    "QLinear",
    "check_bits",
    "gaussian_quantize",
    "gaussian_scale",
    "make_act_quantizer",
    "make_weight_quantizer",
]
