"""``qat``: plain quantization-aware training of one network at (w_bits, a_bits), cross-entropy only."""
from __future__ import annotations

from cmtkd.methods.base import Method, cross_entropy


class QAT(Method):
    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        self.student = self.build_network(cfg.w_bits, cfg.a_bits)

    def forward_train(self, images, targets):
        logits = self.student(images)
        return logits, {"ce": cross_entropy(logits, targets)}

    def param_groups(self):
        return [self.network_group("student", self.student, self.cfg.w_bits, self.cfg.a_bits)]
