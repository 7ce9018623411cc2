"""``fp``: the full-precision network (32-bit weights and ReLU activations), cross-entropy only."""
from __future__ import annotations

from cmtkd.baselines.qat import QAT
from cmtkd.errors import UserError
from cmtkd.quant import FULL_PRECISION


class FullPrecision(QAT):
    default_bits = FULL_PRECISION

    @classmethod
    def check_options(cls, options, cfg):
        if (cfg.w_bits, cfg.a_bits) != (FULL_PRECISION, FULL_PRECISION):
            raise UserError(f"method fp trains a full-precision network, but w_bits/a_bits are "
                            f"{cfg.w_bits}/{cfg.a_bits}; drop --w-bits/--a-bits or use --method qat")
