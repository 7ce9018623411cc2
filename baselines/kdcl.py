"""``kdcl``: KDCL-MinLogit mutual learning of jointly trained quantized peers, no fusion (Guo et al., CVPR 2020).

CMT-KD without its importance-aware shared knowledge and feature loss: the student and n teachers
of the student's architecture, teacher i at ``teacher_bits[i]`` bits (weights and activations),
train jointly from scratch. Each network gets its cross-entropy and ``T^2 * KL(p || softmax(z/T))``
to one constant target ``p = softmax(z_ens / T)``, where ``z_ens`` is the KDCL-MinLogit ensemble of
ALL n + 1 networks' logits (:func:`cmtkd.losses.min_logit_ensemble`, :func:`cmtkd.losses.kd_kl`):

``L = alpha (CE_S + CE_T) + beta (KL_S + KL_T)`` — logged as ``ce_student``, ``ce_teachers``,
``kl_student``, ``kl_teachers`` (each already weighted) — with ``CE_T = R_i CE_i``,
``KL_T = R_i KL_i`` and ``R`` = ``teacher_reduction``:

* ``sum`` (default): the networks have disjoint parameters, so with the sum every teacher receives
  exactly the gradient of its own loss ``alpha CE_i + beta KL_i``, the same objective as the student
  (the DML/KDCL convention: each peer minimises its own loss).
* ``mean``: the teachers' terms are divided by n, which for SGD scales each teacher's loss
  gradient (not its weight decay) by 1/n.

Defaults ``alpha = 1, beta = 0.5, T = 4, teacher_bits = [8, 6, 4]`` are CMT-KD's (PAPER §5, §2).
Every teacher's validation accuracy is logged each epoch (``val_top1_teacher{i}_w{b}a{b}``).

Before this name existed the method was called ``dml``; ``dml`` is now Zhang et al.'s deep mutual
learning (:mod:`cmtkd.baselines.dml`: pairwise KL to every peer at T = 1). KDCL-MinLogit is the
mutual learning CMT-KD itself uses (docs/method.md §5), so ``kdcl`` isolates what CMT-KD's fusion adds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from cmtkd import losses
from cmtkd.methods.base import JointPeers, check_loss_weights, cross_entropy
from cmtkd.teachers import check_teacher_bits


class KDCL(JointPeers):
    @dataclass
    class Options:
        teacher_bits: list[int] = field(default_factory=lambda: [8, 6, 4])  # W = A = b_i per teacher
        teacher_reduction: Literal["sum", "mean"] = "sum"  # of the teachers' CE and KL terms
        alpha: float = 1.0          # weight of every network's cross-entropy
        beta: float = 0.5           # weight of every network's KL to the MinLogit ensemble target
        temperature: float = 4.0    # softmax temperature T of the ensemble target

    @classmethod
    def check_options(cls, options, cfg):
        check_teacher_bits(options.teacher_bits, cfg)
        check_loss_weights(options)

    def _reduce(self, terms: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(terms)
        return stacked.sum() if self.options.teacher_reduction == "sum" else stacked.mean()

    def loss_terms(self, student_logits: torch.Tensor, teacher_logits: list[torch.Tensor],
                   targets: torch.Tensor) -> dict[str, torch.Tensor]:
        o = self.options
        ensemble = losses.min_logit_ensemble([*teacher_logits, student_logits], targets)  # detached
        target_probs = losses.soft_targets(ensemble, o.temperature)
        return {
            "ce_student": o.alpha * cross_entropy(student_logits, targets),
            "ce_teachers": o.alpha * self._reduce([cross_entropy(z, targets) for z in teacher_logits]),
            "kl_student": o.beta * losses.kd_kl(student_logits, target_probs, o.temperature),
            "kl_teachers": o.beta * self._reduce([losses.kd_kl(z, target_probs, o.temperature)
                                                  for z in teacher_logits]),
        }

    def metadata(self):
        # No checkpoints: the teachers are trained here, from scratch.
        return {"teacher_bits": self.teacher_bits, "teacher_reduction": self.options.teacher_reduction}
