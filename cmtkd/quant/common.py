"""Shared constants, bit-width validation and the straight-through helpers used by every quantizer.

Straight-through estimators are written as tensor identities rather than custom
``torch.autograd.Function`` classes (as in lsq-net), so they are easy to test and
``torch.compile`` can fuse them.  We use the form ``hard.detach() + (soft - soft.detach())``
instead of the more common ``soft + (hard - soft).detach()``: both have the gradient of
``soft``, but only the first returns *exactly* ``hard`` in floating point (``x + (q - x)``
can be off by one ulp), which keeps outputs exactly on the grid and makes ``q(q(x)) == q(x)``
hold bit for bit.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import nn

from cmtkd.errors import UserError

FULL_PRECISION = 32
"""Bit-width meaning "not quantized": ReLU for activations, identity for weights."""

QUANTIZED_BITS = tuple(range(1, 9))

# HWGQ activation steps s_b (REF, EdMIPS `hwgq_steps` for 1-4 bits; 5-8 are third-party
# extensions, not from the HWGQ authors).  The clip point is s_b * (2^b - 1).
HWGQ_STEPS: dict[int, float] = {
    1: 0.799, 2: 0.538, 3: 0.3217, 4: 0.185,
    5: 0.104, 6: 0.058, 7: 0.033, 8: 0.019,
}

# Gaussian-uniform weight scales g_b in units of std(W) (REF, EdMIPS `gaussian_steps` for
# 1-4 bits; 5-8 are third-party extensions).
GAUSSIAN_WEIGHT_SCALES: dict[int, float] = {
    1: 1.596, 2: 0.996, 3: 0.586, 4: 0.336,
    5: 0.190, 6: 0.106, 7: 0.059, 8: 0.032,
}

_ALLOWED_BITS_TEXT = "1..8 or 32 (full precision)"


def check_bits(bits) -> int:
    """Return ``bits`` as an int if it is 1..8 or 32, else raise :class:`UserError`."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise UserError(f"bit-width must be an integer in {_ALLOWED_BITS_TEXT}, got {bits!r}")
    bits = int(bits)
    if bits != FULL_PRECISION and bits not in QUANTIZED_BITS:
        raise UserError(f"bit-width must be {_ALLOWED_BITS_TEXT}, got {bits}")
    return bits


def check_quantized_bits(bits, what: str, min_bits: int = 1) -> int:
    """Like :func:`check_bits` but for a quantizer class, which has no 32-bit mode."""
    bits = check_bits(bits)
    if not min_bits <= bits <= QUANTIZED_BITS[-1]:
        raise UserError(
            f"{what} needs bits in {min_bits}..{QUANTIZED_BITS[-1]}, got {bits}"
            + (" (use the make_* factory for 32-bit full precision)" if bits == FULL_PRECISION else "")
        )
    return bits


def check_name(name, allowed: tuple[str, ...], what: str) -> str:
    """Return ``name`` if it is one of ``allowed``, else raise :class:`UserError`."""
    if not isinstance(name, str) or name not in allowed:
        raise UserError(f"unknown {what} {name!r}; choose one of {', '.join(allowed)}")
    return name


class Grid(NamedTuple):
    """A quantized tensor as small integers times a scale: its value is ``codes * scale``.

    ``codes`` are integer-valued floats with ``|code| <= 2^b - 1`` (so exact in bf16 and TF32 for
    ``b <= 8``) and carry the straight-through gradient; ``scale`` is a Python float, a 0-dim tensor,
    or (weights only) one value per output channel, shape ``(out_channels,)``.  A learnable step
    (PACT, LSQ) keeps its gradient in ``scale``, so ``codes * scale`` is the quantizer's forward
    with the same autograd graph.  Used by the exact low-bit path of :mod:`cmtkd.quant.layers`.
    """

    codes: torch.Tensor
    scale: torch.Tensor | float


def straight_through(soft: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """Forward value exactly ``hard``; gradient that of ``soft`` (a straight-through estimator)."""
    return hard.detach() + (soft - soft.detach())


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` in the forward pass, identity gradient in the backward pass."""
    return straight_through(x, torch.round(x))


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Forward value exactly ``x``; gradient multiplied by ``scale`` (LSQ's step-size gradient scale)."""
    scaled = x * scale
    return x.detach() + (scaled - scaled.detach())


class LazyStepMixin:
    """Learned step with lazy data-dependent initialisation (LSQ).

    The step is initialised from the first tensor seen.  Whether that happened is stored in the
    buffer ``initialized`` so it travels in ``state_dict`` and resuming never re-initialises.  A
    plain Python flag mirrors it so that, once initialised, ``forward`` has no data-dependent
    branch (``torch.compile`` would otherwise break the graph on every call).
    """

    step: nn.Parameter
    initialized: torch.Tensor

    def _init_step_state(self) -> None:
        self.step = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))
        self._initialized_cache = False

    def _maybe_init_step(self, x: torch.Tensor, qp: int) -> None:
        if self._initialized_cache:
            return
        if not bool(self.initialized):
            with torch.no_grad():
                # LSQ's initial step: 2 * mean|x| / sqrt(Q_P); floored so an all-zero first
                # input cannot give a zero step (division by zero).
                self.step.copy_((2.0 * x.detach().abs().mean() / math.sqrt(qp)).clamp_min(1e-8))
                self.initialized.fill_(True)
        self._initialized_cache = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized_cache = bool(self.initialized)
