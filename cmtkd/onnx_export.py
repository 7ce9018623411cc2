"""ONNX export of a run's quantized student as a QDQ graph (``cmtkd export --format onnx``).

What the graph holds, layer by layer (every choice is checked at export: the rewritten PyTorch
model must reproduce the trained one, exactly for the HWGQ/binary/Gaussian default):

* **Activations** (each quantizer replaces a ReLU and has an unsigned uniform grid ``s * {0..2^b-1}``):
  ``Clip(x, 0, s*(2^b-1)) -> QuantizeLinear(scale s, zero point 0, uint8) -> DequantizeLinear``.
  The Clip is what makes this exact for ``b < 8``: QuantizeLinear alone saturates at 255, not at
  ``2^b - 1``. HWGQ (fixed ``s``), LSQ (learned ``s``), PACT (``s = alpha / (2^b-1)``) and DoReFa
  (``s = 1/(2^b-1)``) all map onto it; for HWGQ the PyTorch side is bit-identical, for PACT, LSQ and
  DoReFa it is equal up to float rounding (they compute ``x/s`` or ``x*n`` in a different order).
  Full-precision activations stay ``Relu``.
* **Weights** are stored as integers with a ``DequantizeLinear`` in front of the Conv/Gemm wherever
  ``q * scale`` reproduces the trained quantized weight bit for bit (checked per layer): binary
  weights (int8 ``+-1``, per-output-channel scale ``mean|W|``, axis 0), EdMIPS Gaussian weights at
  2-7 bits (int8 odd integers ``2k - 1`` with per-tensor scale ``s/2``: the grid has half-integer
  levels ``(k - 1/2) s``), LSQ weights (int8, scale = the learned step), 1-bit DoReFa (int8 ``+-1``,
  scale ``mean|W|``). Where no such integer form is exact or fits int8 — 8-bit Gaussian weights
  (levels up to ``+-255 * s/2``), multi-bit DoReFa weights (``2 round(u n)/n - 1``) — the already
  quantized weight is a float constant (the values are still the quantized ones). Full-precision
  layers (the first conv and the classifier under the default ``fp-first-last`` policy) are float.

The graph is the standard QDQ form that runtimes lower to integer kernels where they have them;
checked here with onnxruntime's CPU provider: logits agree with PyTorch up to the runtimes' float
accumulation order (tests/test_onnx_export.py states the tolerance and what was measured).
"""
from __future__ import annotations

import copy
import math
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cmtkd.errors import UserError
from cmtkd.files import atomic_write_bytes, os_error
from cmtkd.quant import HWGQ, PACT, BinaryWeight, DoReFaActivation, DoReFaWeight, GaussianWeight, LSQActivation, \
    LSQWeight, QConv2d, QLinear, gaussian_scale

ONNX_EXTRA = "pip install 'cmtkd[onnx]'"


# ----------------------------------------------------------------------- ops with an ONNX form
@torch.library.custom_op("cmtkd::quantize_unsigned", mutates_args=())
def quantize_unsigned(x: torch.Tensor, scale: float, levels: int) -> torch.Tensor:
    """``s * round(clamp(x, 0, s * levels) / s)``: the unsigned grid of every activation quantizer."""
    clipped = x.float().clamp(0.0, scale * levels)
    return torch.round(clipped / scale) * scale


@quantize_unsigned.register_fake
def _(x, scale, levels):
    return torch.empty_like(x, dtype=torch.float32)


@torch.library.custom_op("cmtkd::dequantize_weight", mutates_args=())
def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    """``q * scale`` with a per-tensor (0-d) or per-``axis`` (1-d) scale."""
    shape = [1] * q.dim()
    if scale.dim() == 1:
        shape[axis] = -1
    return q.float() * scale.reshape(shape)


@dequantize_weight.register_fake
def _(q, scale, axis):
    return torch.empty_like(q, dtype=torch.float32)


def _onnx_translations() -> dict:
    try:
        import numpy as np
        from onnxscript import ir
        from onnxscript import opset18 as op
    except ImportError:
        raise UserError(f"--format onnx needs the onnx and onnxscript packages: {ONNX_EXTRA}") from None

    def constant(value, dtype):
        return op.Constant(value=ir.tensor(np.array(value, dtype=dtype)))

    def quantize_unsigned_onnx(x, scale: float, levels: int):
        s, zero = constant(scale, np.float32), constant(0, np.uint8)
        clipped = op.Clip(x, constant(0.0, np.float32), constant(scale * levels, np.float32))
        return op.DequantizeLinear(op.QuantizeLinear(clipped, s, zero), s, zero)

    def dequantize_weight_onnx(q, scale, axis: int):
        return op.DequantizeLinear(q, scale, axis=axis)

    return {torch.ops.cmtkd.quantize_unsigned.default: quantize_unsigned_onnx,
            torch.ops.cmtkd.dequantize_weight.default: dequantize_weight_onnx}


# ------------------------------------------------------------------------ the rewritten model
class QDQActivation(nn.Module):
    def __init__(self, scale: float, levels: int):
        super().__init__()
        self.scale, self.levels = float(scale), int(levels)

    def forward(self, x):
        return torch.ops.cmtkd.quantize_unsigned(x, self.scale, self.levels)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}, levels={self.levels}"


def activation_grid(module: nn.Module) -> tuple[float, int] | None:
    """(step, 2^b - 1) of an activation quantizer; None for modules that are not one."""
    if isinstance(module, HWGQ):
        return module.step, 2**module.bits - 1
    if isinstance(module, LSQActivation):
        return float(module.step.detach()), module.qp
    if isinstance(module, PACT):
        return float(module.alpha.detach()) / module.levels, module.levels
    if isinstance(module, DoReFaActivation):
        return 1.0 / module.levels, module.levels
    return None


def weight_scale_candidates(quantizer: nn.Module, weight: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """(scale, axis) under which the quantized weight should be integer, or None (float constant)."""
    w = weight.detach()
    if isinstance(quantizer, BinaryWeight):
        return w.abs().reshape(w.shape[0], -1).mean(dim=1), 0
    if isinstance(quantizer, GaussianWeight):
        return gaussian_scale(w, quantizer.bits) / 2, 0
    if isinstance(quantizer, LSQWeight):
        return quantizer.step.detach().clone(), 0
    if isinstance(quantizer, DoReFaWeight) and quantizer.bits == 1:
        return w.abs().mean(), 0
    return None


def integer_weight(quantized: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor | None:
    """int8 ``q`` with ``dequantize_weight(q, scale) == quantized`` bit for bit, or None."""
    if (scale <= 0).any():
        return None
    shape = [1] * quantized.dim()
    if scale.dim() == 1:
        shape[axis] = -1
    q = torch.round(quantized / scale.reshape(shape))
    if q.abs().max() > 127:
        return None
    q = q.to(torch.int8)
    return q if torch.equal(dequantize_weight(q, scale, axis), quantized) else None


class _DQWeightMixin:
    """A conv/linear layer whose weight is ``DequantizeLinear(int8 q, scale)`` (or a float constant)."""

    def _set_weight(self, quantized: torch.Tensor, candidate) -> str:
        """Store ``quantized`` as int8 + scale when exact, else as a float buffer; returns which."""
        del self.weight
        if candidate is not None:
            scale, axis = candidate
            q = integer_weight(quantized, scale.float(), axis)
            if q is not None:
                self.register_buffer("qweight", q)
                self.register_buffer("weight_scale", scale.float())
                self.axis = axis
                return "int8"
        self.register_buffer("weight", quantized)
        return "float"

    def dequantized_weight(self) -> torch.Tensor:
        if hasattr(self, "qweight"):
            return torch.ops.cmtkd.dequantize_weight(self.qweight, self.weight_scale, self.axis)
        return self.weight


class DQConv2d(_DQWeightMixin, nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, self.dequantized_weight(), self.bias)


class DQLinear(_DQWeightMixin, nn.Linear):
    def forward(self, x):
        return F.linear(x, self.dequantized_weight(), self.bias)


@torch.no_grad()
def qdq_model(model: nn.Module) -> tuple[nn.Module, dict[str, int]]:
    """A copy of ``model`` (eval) whose quantizers are QDQ ops; returns it and a count per weight form."""
    model = copy.deepcopy(model).eval()
    forms = {"int8": 0, "float": 0, "fp": 0}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            grid = activation_grid(child)
            if grid is not None:
                setattr(parent, name, QDQActivation(*grid))
            elif isinstance(child, (QConv2d, QLinear)):
                if child.w_bits == 32:
                    forms["fp"] += 1
                    continue
                quantized = child.weight_quantizer(child.weight).detach().float()
                if isinstance(child, QConv2d):
                    new = DQConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                   child.padding, child.dilation, child.groups, child.bias is not None,
                                   child.padding_mode)
                else:
                    new = DQLinear(child.in_features, child.out_features, child.bias is not None)
                if child.bias is not None:
                    new.bias.copy_(child.bias)
                forms[new._set_weight(quantized, weight_scale_candidates(child.weight_quantizer, child.weight))] += 1
                setattr(parent, name, new)
    return model, forms


def export_onnx(model: nn.Module, example: torch.Tensor, out: Path) -> dict:
    """Write ``model`` as a QDQ ONNX graph to ``out`` (atomically); returns a summary."""
    translations = _onnx_translations()
    model = model.eval()
    rewritten, forms = qdq_model(model)
    with torch.no_grad():
        reference, mine = model(example), rewritten(example)
    # HWGQ/binary/Gaussian: identical; PACT/LSQ/DoReFa compute the grid in another order.
    max_diff = float((reference - mine).abs().max())
    if max_diff > 1e-4 * max(1.0, float(reference.abs().max())):
        raise UserError(f"the QDQ rewrite of the student differs from it by {max_diff:.3g}; please report this")
    with warnings.catch_warnings():  # torch 2.11's exporter trips its own pytree deprecation: noise here
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
        program = torch.onnx.export(rewritten, (example,), dynamo=True, custom_translation_table=translations,
                                    input_names=["images"], output_names=["logits"],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
                                    external_data=False)
    # Saved in a scratch directory, then written atomically next to the run (nothing partial on a
    # kill or a full disk, and no stray temporary file in the run directory).
    with tempfile.TemporaryDirectory(prefix="cmtkd-onnx-") as scratch:
        staged = Path(scratch) / "student.onnx"
        try:
            program.save(str(staged))
            data = staged.read_bytes()
        except OSError as exc:
            raise os_error(staged, exc) from None
    atomic_write_bytes(out, data)
    return {"weights_int8": forms["int8"], "weights_float_quantized": forms["float"], "weights_fp": forms["fp"],
            "torch_rewrite_max_abs_diff": max_diff if math.isfinite(max_diff) else None}


def onnx_node_counts(path: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
