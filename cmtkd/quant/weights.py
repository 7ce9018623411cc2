"""Weight quantizers: map a weight tensor (conv OIHW or linear OI) to a quantized one of the same shape.

* :class:`BinaryWeight`   - ``sign(W) * mean|W|`` per output channel (HWGQ's 1-bit weights).
* :class:`GaussianWeight` - EdMIPS Gaussian-uniform quantizer, scale ``g_b * std(W)``.
* :class:`LSQWeight`      - learned step size, signed (Esser et al., ICLR 2020).
* :class:`DoReFaWeight`   - tanh-normalised uniform quantizer (Zhou et al., 2016).

``"auto"`` (the project default) is binary at 1 bit and Gaussian at 2-8 bits, i.e. HWGQ/EdMIPS
throughout.  Assumption: the CMT-KD paper does not say which weight quantizer it uses.

Every quantizer also has ``grid(weight)``: the same quantized weight as integer codes with
``|code| <= 2^b - 1`` and a scale, per output channel or per tensor
(:class:`cmtkd.quant.common.Grid`), with the same straight-through gradients.  The quantized
layers use it to compute on exact codes under autocast (:mod:`cmtkd.quant.layers`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cmtkd.errors import UserError
from cmtkd.quant.common import (
    FULL_PRECISION,
    GAUSSIAN_WEIGHT_SCALES,
    Grid,
    LazyStepMixin,
    check_bits,
    check_name,
    check_quantized_bits,
    round_ste,
    scale_grad,
    straight_through,
)

WEIGHT_QUANTIZERS = ("auto", "binary", "gaussian", "lsq", "dorefa")

# Guards against division by zero for degenerate (constant or all-zero) weights.
_TINY = 1e-12


def _sign_no_zero(weight: torch.Tensor) -> torch.Tensor:
    """``sign`` with sign(0) = +1, so a binary quantizer really has only two levels."""
    return torch.where(weight >= 0, torch.ones_like(weight), -torch.ones_like(weight))


class BinaryWeight(nn.Module):
    """1-bit weights of HWGQ (Cai et al., CVPR 2017): ``sign(W) * mean|W|`` per output channel.

    The per-channel scale ``mean|W|`` (over every dim except dim 0) minimises the L2 error of a
    binary approximation (as in XNOR-Net).  Backward: straight-through identity to ``W``.
    """

    def __init__(self, bits: int = 1):
        super().__init__()
        if check_bits(bits) != 1:
            raise UserError(f"binary weight quantizer needs bits=1, got {bits}")
        self.bits = 1

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.detach()
        scale = w.abs().reshape(w.shape[0], -1).mean(dim=1)
        scale = scale.reshape((-1,) + (1,) * (w.dim() - 1))
        return straight_through(weight, _sign_no_zero(w) * scale)

    def grid(self, weight: torch.Tensor) -> Grid:
        """Codes ``+-1`` and the per-channel scale ``mean|W|``, shape ``(out_channels,)``."""
        w = weight.detach()
        # Floored so the straight-through division below is finite for an all-zero channel.
        scale = w.abs().reshape(w.shape[0], -1).mean(dim=1).clamp_min(_TINY)
        per_channel = scale.reshape((-1,) + (1,) * (w.dim() - 1))
        return Grid(straight_through(weight / per_channel, _sign_no_zero(w)), scale)

    def extra_repr(self) -> str:
        return "bits=1, per_output_channel=True"


def gaussian_scale(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """EdMIPS step ``s_w = g_b * std(W)`` over the whole tensor (unbiased std, as ``Tensor.std``).

    ``g_b`` is the optimal uniform step for a unit Gaussian at ``b`` bits, so ``s_w`` adapts the
    grid to the current weight spread.  The scale is a constant for autograd, as in EdMIPS.
    """
    weight = weight.detach()
    std = weight.std(correction=1 if weight.numel() > 1 else 0)  # a 1-element tensor has std 0
    return (GAUSSIAN_WEIGHT_SCALES[bits] * std).clamp_min(_TINY)


def gaussian_quantize(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize ``weight`` on the mid-rise grid of step ``scale`` (EdMIPS), no gradient tricks.

    ``clamp((round(W/s + 0.5) - 0.5) * s, -(2^(b-1) - 0.5) * s, (2^(b-1) - 0.5) * s)``: ``2^b``
    levels symmetric around 0, none at 0.  For a *fixed* ``scale`` this is idempotent; the full
    quantizer is not, because ``std`` of the quantized tensor differs from ``std(W)``, so
    :func:`gaussian_scale` picks a new step when applied again.
    """
    threshold = (2 ** (bits - 1) - 0.5) * scale
    quantized = (torch.round(weight / scale + 0.5) - 0.5) * scale
    return torch.clamp(quantized, -threshold, threshold)


class GaussianWeight(nn.Module):
    """EdMIPS Gaussian-uniform weight quantizer at ``b`` bits (REF: EdMIPS ``_gauss_quantize``).

    Forward :func:`gaussian_quantize` with :func:`gaussian_scale`; backward straight-through
    identity to ``W`` (EdMIPS passes the gradient unchanged, no clipping mask).
    """

    def __init__(self, bits: int):
        super().__init__()
        self.bits = check_quantized_bits(bits, "Gaussian weight quantizer")

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        hard = gaussian_quantize(weight.detach(), gaussian_scale(weight, self.bits), self.bits)
        return straight_through(weight, hard)

    def grid(self, weight: torch.Tensor) -> Grid:
        """The half-integer levels ``(k - 0.5) * s_w`` as odd codes ``2k - 1`` times ``s_w / 2``.

        ``|2k - 1| <= 2^b - 1``; halving ``s_w`` is exact, so ``codes * scale`` equals
        :func:`gaussian_quantize` bit for bit.
        """
        half_step = gaussian_scale(weight, self.bits) / 2
        odd_max = 2**self.bits - 1
        scaled = weight / half_step  # = 2 W / s_w; its gradient is the identity STE of forward
        codes = torch.clamp(2 * torch.round(scaled.detach() / 2 + 0.5) - 1, -odd_max, odd_max)
        return Grid(straight_through(scaled, codes), half_step)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, g_b={GAUSSIAN_WEIGHT_SCALES[self.bits]}"


class LSQWeight(LazyStepMixin, nn.Module):
    """LSQ for signed weights (Esser et al., ICLR 2020): levels ``-2^(b-1) .. 2^(b-1) - 1``.

    ``W_q = round(clamp(W / s, -Q_N, Q_P)) * s``; the learnable step ``s`` is initialised at the
    first forward as ``2 * mean|W| / sqrt(Q_P)`` (lazily, so it sees weights loaded after
    construction); its gradient is scaled by ``1 / sqrt(numel(W) * Q_P)``.  Gradient wrt ``W``:
    1 inside ``[-Q_N*s, Q_P*s]``, 0 outside.  Needs >= 2 bits (at 1 bit ``Q_P = 0``).
    """

    def __init__(self, bits: int):
        super().__init__()
        if check_bits(bits) == 1:
            raise UserError("lsq weight quantizer needs >=2 bits, got 1 (use binary, gaussian or dorefa)")
        self.bits = check_quantized_bits(bits, "LSQ weight quantizer", min_bits=2)
        self.qn = 2 ** (self.bits - 1)
        self.qp = 2 ** (self.bits - 1) - 1
        self._init_step_state()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        self._maybe_init_step(weight, self.qp)
        step = scale_grad(self.step, 1.0 / math.sqrt(weight.numel() * self.qp)).to(weight.dtype)
        return round_ste(torch.clamp(weight / step, -self.qn, self.qp)) * step

    def grid(self, weight: torch.Tensor) -> Grid:
        """``forward(weight)`` split into codes ``-2^(b-1) .. 2^(b-1) - 1`` and the learnable step."""
        self._maybe_init_step(weight, self.qp)
        step = scale_grad(self.step, 1.0 / math.sqrt(weight.numel() * self.qp)).to(weight.dtype)
        return Grid(round_ste(torch.clamp(weight / step, -self.qn, self.qp)), step)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class DoReFaWeight(nn.Module):
    """DoReFa-Net weight quantizer (Zhou et al., 2016).

    ``b > 1``: ``w' = tanh(W) / (2 max|tanh W|) + 0.5``, ``W_q = 2 * round(w' * n) / n - 1`` with
    ``n = 2^b - 1``; the round is straight-through, the tanh normalisation is differentiated
    normally (as in the DoReFa code).  Outputs lie in ``[-1, 1]``.
    ``b = 1``: ``sign(W) * mean|W|`` over the whole tensor, straight-through identity gradient.
    """

    def __init__(self, bits: int):
        super().__init__()
        self.bits = check_quantized_bits(bits, "DoReFa weight quantizer")
        self.levels = 2**self.bits - 1

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.bits == 1:
            w = weight.detach()
            return straight_through(weight, _sign_no_zero(w) * w.abs().mean())
        squashed = torch.tanh(weight)
        unit = squashed / (2 * squashed.abs().max().clamp_min(_TINY)) + 0.5
        quantized = straight_through(unit, torch.round(unit.detach() * self.levels) / self.levels)
        return 2 * quantized - 1

    def grid(self, weight: torch.Tensor) -> Grid:
        """``2 round(u n) / n - 1`` as odd codes ``2 round(u n) - n`` times ``1 / n`` (b > 1); at
        1 bit, codes ``+-1`` times ``mean|W|``."""
        if self.bits == 1:
            w = weight.detach()
            scale = w.abs().mean().clamp_min(_TINY)
            return Grid(straight_through(weight / scale, _sign_no_zero(w)), scale)
        squashed = torch.tanh(weight)
        unit = squashed / (2 * squashed.abs().max().clamp_min(_TINY)) + 0.5
        scaled = unit * self.levels
        levels = straight_through(scaled, torch.round(scaled.detach()))
        return Grid(2 * levels - self.levels, 1.0 / self.levels)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def make_weight_quantizer(name: str, bits: int) -> nn.Module:
    """Build the weight quantizer ``name`` at ``bits``.

    ``bits == 32`` gives ``nn.Identity`` (with ``bits = 32`` set on it) whatever the name.
    ``"auto"`` is binary at 1 bit and Gaussian (EdMIPS) at 2-8 bits.  Unknown names, bad
    bit-widths and ``binary`` with bits != 1 or ``lsq`` with 1 bit raise
    :class:`cmtkd.errors.UserError`.
    """
    check_name(name, WEIGHT_QUANTIZERS, "weight quantizer")
    bits = check_bits(bits)
    if bits == FULL_PRECISION:
        identity = nn.Identity()
        identity.bits = FULL_PRECISION
        return identity
    if name == "auto":
        name = "binary" if bits == 1 else "gaussian"
    if name == "binary":
        return BinaryWeight(bits)
    if name == "gaussian":
        return GaussianWeight(bits)
    if name == "lsq":
        return LSQWeight(bits)
    return DoReFaWeight(bits)
