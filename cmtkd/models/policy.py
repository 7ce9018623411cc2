"""Named quantization policies: which bit-width each layer role gets.

A model asks the policy for the weight bit-width of its ``first`` layer (the stem conv), its
``last`` layer (the classifier) and every other (``body``) layer. Activation quantizers (which replace
the ReLUs) always use the network's ``a_bits``; the image entering the first conv is never quantized.
"""
from __future__ import annotations

from dataclasses import dataclass

from cmtkd.errors import UserError
from cmtkd.quant import FULL_PRECISION


@dataclass(frozen=True)
class QuantPolicy:
    name: str
    first_w_bits: int | None  # None = same as the body
    last_w_bits: int | None
    description: str

    def weight_bits(self, role: str, w_bits: int) -> int:
        if role == "first" and self.first_w_bits is not None:
            return self.first_w_bits if w_bits != FULL_PRECISION else FULL_PRECISION
        if role == "last" and self.last_w_bits is not None:
            return self.last_w_bits if w_bits != FULL_PRECISION else FULL_PRECISION
        return w_bits


POLICIES = {
    p.name: p
    for p in [
        QuantPolicy("fp-first-last", FULL_PRECISION, FULL_PRECISION,
                    "first conv and last FC full precision (docs/method.md §2, the usual HWGQ/LQ-Nets setting)"),
        QuantPolicy("8bit-first-last", 8, 8, "first conv and last FC at 8-bit weights"),
        QuantPolicy("all", None, None, "every layer at the network's bit-width"),
    ]
}


def get_policy(name: str) -> QuantPolicy:
    if name not in POLICIES:
        raise UserError(f"unknown quantization policy '{name}'; choose one of: {', '.join(POLICIES)}")
    return POLICIES[name]
