"""Activation quantizers.  Each one *replaces* the ReLU, so its output is always >= 0.

* :class:`HWGQ`   - half-wave Gaussian quantizer (Cai et al., CVPR 2017); what CMT-KD uses.
* :class:`PACT`   - learnable clipping level (Choi et al., 2018); plain-quantization baseline.
* :class:`LSQActivation` - learned step size (Esser et al., ICLR 2020); baseline.
* :class:`DoReFaActivation` - fixed clip at 1 (Zhou et al., 2016); baseline.

Use :func:`make_act_quantizer` rather than the classes: it also handles 32-bit (plain ReLU)
and validates names and bit-widths.

Every quantizer also has ``grid(x)``: the same quantization as integer codes ``0 .. 2^b - 1`` and
a step (:class:`cmtkd.quant.common.Grid`), with the same gradients.  A quantized layer that is
given the quantizer as its ``input_quantizer`` uses it to compute on exact codes under autocast.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cmtkd.quant.common import (
    FULL_PRECISION,
    HWGQ_STEPS,
    Grid,
    LazyStepMixin,
    check_bits,
    check_name,
    check_quantized_bits,
    round_ste,
    scale_grad,
    straight_through,
)

ACT_QUANTIZERS = ("hwgq", "pact", "lsq", "dorefa")


class _ClippedRound(torch.autograd.Function):
    """HWGQ's arithmetic in one autograd node: ``round(clamp(x, 0, clip) / step)``, times ``step`` unless
    ``codes``. Backward: the clamp's gradient as torch gives it (2.14; it produced the committed results):
    identity strictly inside ``(0, clip)``, zero on the boundaries and outside, divided by ``step`` for
    codes; pinned here, so it no longer depends on the torch version. Bit for bit what the same ops
    written with :func:`straight_through` give (values and gradients, for every input but NaN;
    tests/test_quant.py), and faster in eager mode (benchmarks/bench_hwgq.py): the straight-through sum
    costs two extra element-wise passes forward and their autograd nodes backward, the in-place steps
    allocate nothing, and the backward mask is one kernel. torch.compile traces it like any other code."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, clip: float, step: float, codes: bool) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.clip, ctx.step, ctx.codes = clip, step, codes
        out = x.clamp(0.0, clip).div_(step).round_()
        if not codes:
            out.mul_(step)
        return out.add_(0.0)  # -0.0 (from an input of -0.0) -> +0.0, as the straight-through sum gives

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        if ctx.codes:
            grad = grad / ctx.step
        # hardtanh's backward is exactly this mask (grad strictly inside (min, max), +0.0 elsewhere, never
        # -0.0) in one kernel: about 10x faster than where() over two comparisons on CPU. For a NaN input its
        # gradient is 0 or passed through, depending on the kernel's code path (a run with NaN is lost anyway).
        return torch.ops.aten.hardtanh_backward(grad, x, 0.0, ctx.clip), None, None, None


class HWGQ(nn.Module):
    """Half-wave Gaussian quantizer (Cai et al., CVPR 2017; steps from EdMIPS).

    Forward ``y = s * round(clamp(x, 0, s*(2^b - 1)) / s)`` with the fixed step ``s = HWGQ_STEPS[b]``
    (optimal uniform quantizer for the positive half of a unit Gaussian, which is what
    batch-normalised pre-activations look like).  Backward: identity inside ``(0, s*(2^b - 1))``,
    zero outside (the clipped-ReLU straight-through estimator of HWGQ; zero on the two boundaries too).
    """

    def __init__(self, bits: int):
        super().__init__()
        self.bits = check_quantized_bits(bits, "HWGQ")
        self.step = HWGQ_STEPS[self.bits]
        self.clip = self.step * (2**self.bits - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under bf16/fp16 autocast the incoming features are low precision; quantizing them in fp32
        # keeps the grid exact (measured: W2A2 QAT on digits 84.5 % -> 90.2 % under bf16; fp32 91.4 %).
        return _ClippedRound.apply(x.float(), self.clip, self.step, False)

    def grid(self, x: torch.Tensor) -> Grid:
        """``forward(x)`` as codes ``round(clamp(x, 0, clip) / s)`` and the fixed step ``s``."""
        return Grid(_ClippedRound.apply(x.float(), self.clip, self.step, True), self.step)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, step={self.step}, clip={self.clip:.4g}"


class PACT(nn.Module):
    """PACT: parameterised clipping activation (Choi et al., 2018).

    ``y = round(clamp(x, 0, alpha) * n / alpha) * alpha / n`` with ``n = 2^b - 1`` and a learnable
    clip ``alpha``.  Gradient wrt ``x``: 1 inside ``[0, alpha]``, 0 outside (STE on the round).
    Gradient wrt ``alpha``: comes only from the clamp, i.e. 1 for every ``x >= alpha`` and 0
    otherwise, as in the PACT paper (not the LSQ-style gradient through the rounding error).

    Assumption: ``alpha`` starts at 10.0, the PACT paper's initial value.  PACT also puts an L2
    penalty on ``alpha``; that is the optimiser's job (weight decay on this parameter), not ours.
    """

    def __init__(self, bits: int, init_alpha: float = 10.0):
        super().__init__()
        self.bits = check_quantized_bits(bits, "PACT")
        self.levels = 2**self.bits - 1
        self.alpha = nn.Parameter(torch.tensor(float(init_alpha)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()  # exact grid under autocast (see HWGQ)
        alpha = self.alpha.to(x.dtype)
        # torch.where rather than clamp(max=alpha): clamp splits the gradient 50/50 when
        # x == alpha, PACT gives it all to alpha (d y / d alpha = 1 for x >= alpha).
        clipped = torch.where(x < alpha, x.clamp_min(0.0), alpha)
        step = alpha.detach() / self.levels
        return straight_through(clipped, torch.round(clipped.detach() / step) * step)

    def grid(self, x: torch.Tensor) -> Grid:
        """``forward(x)`` as codes ``0 .. 2^b - 1`` and the step ``alpha / (2^b - 1)`` (detached:
        alpha's gradient comes through the clipped values inside the codes, as in ``forward``)."""
        x = x.float()
        alpha = self.alpha.to(x.dtype)
        clipped = torch.where(x < alpha, x.clamp_min(0.0), alpha)
        step = alpha.detach() / self.levels
        scaled = clipped / step
        return Grid(straight_through(scaled, torch.round(scaled.detach())), step)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class LSQActivation(LazyStepMixin, nn.Module):
    """LSQ for unsigned activations (Esser et al., ICLR 2020): levels ``0 .. Q_P = 2^b - 1``.

    ``y = round(clamp(x / s, 0, Q_P)) * s`` with a learnable step ``s``, initialised from the first
    batch as ``2 * mean|x| / sqrt(Q_P)``.  Gradient wrt ``x``: 1 inside ``[0, Q_P*s]``, 0 outside;
    gradient wrt ``s`` is LSQ's, scaled by ``g = 1 / sqrt(numel(x) * Q_P)``.

    Assumption: ``numel(x)`` counts the whole batch (as lsq-net does); the LSQ paper says "number
    of features", which could be read as per example.
    """

    def __init__(self, bits: int):
        super().__init__()
        self.bits = check_quantized_bits(bits, "LSQ activation")
        self.qp = 2**self.bits - 1
        self._init_step_state()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()  # exact grid under autocast (see HWGQ)
        self._maybe_init_step(x, self.qp)
        step = scale_grad(self.step, 1.0 / math.sqrt(x.numel() * self.qp)).to(x.dtype)
        return round_ste(torch.clamp(x / step, 0, self.qp)) * step

    def grid(self, x: torch.Tensor) -> Grid:
        """``forward(x)`` split into its codes and its learnable step (which keeps its gradient)."""
        x = x.float()
        self._maybe_init_step(x, self.qp)
        step = scale_grad(self.step, 1.0 / math.sqrt(x.numel() * self.qp)).to(x.dtype)
        return Grid(round_ste(torch.clamp(x / step, 0, self.qp)), step)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class DoReFaActivation(nn.Module):
    """DoReFa-Net activation quantizer (Zhou et al., 2016).

    ``y = round(clamp(x, 0, 1) * n) / n`` with ``n = 2^b - 1``: a fixed clip at 1, which suits
    DoReFa's bounded activations.  Backward: identity inside ``[0, 1]``, zero outside.
    """

    def __init__(self, bits: int):
        super().__init__()
        self.bits = check_quantized_bits(bits, "DoReFa activation")
        self.levels = 2**self.bits - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()  # exact grid under autocast (see HWGQ)
        clipped = x.clamp(0.0, 1.0)
        return straight_through(clipped, torch.round(clipped * self.levels) / self.levels)

    def grid(self, x: torch.Tensor) -> Grid:
        """``forward(x)`` as codes ``round(clamp(x, 0, 1) * n)`` and the step ``1 / n``."""
        scaled = x.float().clamp(0.0, 1.0) * self.levels
        return Grid(straight_through(scaled, torch.round(scaled)), 1.0 / self.levels)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


_ACT_CLASSES = {"hwgq": HWGQ, "pact": PACT, "lsq": LSQActivation, "dorefa": DoReFaActivation}


def make_act_quantizer(name: str, bits: int) -> nn.Module:
    """Build the activation quantizer ``name`` at ``bits``; it replaces the layer's ReLU.

    ``bits == 32`` gives a plain ``nn.ReLU`` (with ``bits = 32`` set on it) whatever the name.
    Unknown names and bit-widths raise :class:`cmtkd.errors.UserError`.
    """
    check_name(name, ACT_QUANTIZERS, "activation quantizer")
    bits = check_bits(bits)
    if bits == FULL_PRECISION:
        relu = nn.ReLU()
        relu.bits = FULL_PRECISION
        return relu
    return _ACT_CLASSES[name](bits)
