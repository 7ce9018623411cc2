"""``mtkd``: independent multi-teacher KD from frozen pre-trained teachers (You et al., KDD 2017).

``L = alpha * CE(z_S, y) + beta * L_KD``, logged as ``ce`` and ``kd``. With ``p_i = softmax(z_i / T)``
for teacher i = 1..n, ``q = softmax(z_S / T)``, and batch means over samples, ``aggregation`` picks
``L_KD`` (all via :func:`cmtkd.losses.kd_kl`):

* ``avg_probs`` (default; You et al.: average the teachers' soft targets):
  ``L_KD = T^2 * KL(mean_i p_i || q)``.
* ``avg_kl``: ``L_KD = mean_i T^2 * KL(p_i || q)``.
* ``confidence`` (CA-MKD-style per-sample teacher weights, after Zhang et al., ICASSP 2022):
  ``w_i = softmax_i(-CE_i)`` with ``CE_i = -log softmax(z_i)[y]`` (teacher i's cross-entropy on the
  true label, at T = 1), i.e. ``w_i = softmax(z_i)[y] / sum_j softmax(z_j)[y]`` — each teacher
  weighted by its probability of the true class. ``L_KD = T^2 * KL(sum_i w_i p_i || q)``.
  (CA-MKD's code weights per-teacher KLs with ``(1 - softmax_i(CE_i)) / (n - 1)``: the same weights
  for n = 2, flatter for n > 2, undefined for n = 1; it also divides the sum by n. By the note below,
  the KL of the weighted mixture trains exactly like the weighted sum of per-teacher KLs.)

Note: the teachers are constant, so ``KL(sum_i w_i p_i || q)`` and ``sum_i w_i KL(p_i || q)`` differ
by ``sum_i w_i H(p_i) - H(sum_i w_i p_i)``, which does not depend on the student: ``avg_probs`` and
``avg_kl`` give the student the SAME gradient and differ only in the logged value of ``kd``.

Teachers are finished runs (``model.pt`` of ``fp``/``qat``/... runs of the student's architecture on
the same dataset), frozen and in eval mode, hashes in ``metrics.json`` (``teacher_sha256``).
Defaults ``alpha = 1, beta = 0.5, T = 4`` as in :mod:`cmtkd.baselines.kd` (ASSUMPTIONS.md).
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cmtkd import losses
from cmtkd.errors import UserError
from cmtkd.methods.base import Method, check_loss_weights, cross_entropy
from cmtkd.teachers import FrozenTeacher, check_sha256_option, teacher_metadata

Aggregation = Literal["avg_probs", "avg_kl", "confidence"]
AGGREGATIONS = typing.get_args(Aggregation)


def confidence_weights(teacher_logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Per-sample teacher weights ``softmax_i(-CE_i)``, shape (batch, teachers); rows sum to 1."""
    neg_ce = torch.stack([-F.cross_entropy(z.detach().float(), targets, reduction="none") for z in teacher_logits],
                         dim=1)
    return torch.softmax(neg_ce, dim=1)


def multi_teacher_kd(student_logits: torch.Tensor, teacher_logits: list[torch.Tensor], targets: torch.Tensor,
                     aggregation: str, temperature: float) -> torch.Tensor:
    """``L_KD`` of the module docstring (already scaled by T^2; not by beta)."""
    probs = [losses.soft_targets(z, temperature) for z in teacher_logits]
    if aggregation == "avg_probs":
        return losses.kd_kl(student_logits, torch.stack(probs).mean(dim=0), temperature)
    if aggregation == "avg_kl":
        return torch.stack([losses.kd_kl(student_logits, p, temperature) for p in probs]).mean()
    if aggregation == "confidence":
        weights = confidence_weights(teacher_logits, targets)             # (batch, teachers)
        mixture = torch.einsum("bi,ibc->bc", weights, torch.stack(probs))  # sum_i w_i p_i, per sample
        return losses.kd_kl(student_logits, mixture, temperature)
    raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")


class MTKD(Method):
    teachers_help = "finished `cmtkd train --method fp|qat` runs of the same arch and dataset, one per teacher"

    @dataclass
    class Options:
        teachers: list[str] = field(default_factory=list)      # run directories (or model.pt files)
        teacher_sha256: list[str] = field(default_factory=list)  # empty, or one hash per teacher
        aggregation: Aggregation = "avg_probs"  # mean of soft targets | mean of KLs | per-sample confidence weights
        alpha: float = 1.0          # weight of the student's cross-entropy
        beta: float = 0.5           # weight of the KD term L_KD
        temperature: float = 4.0    # softmax temperature T of the soft targets

    @classmethod
    def check_options(cls, options, cfg):
        if not options.teachers:
            raise UserError(f"method mtkd needs pre-trained teachers: --set method_args.teachers=[RUN_DIR1,RUN_DIR2] "
                            f"(finished `cmtkd train --arch {cfg.arch}` runs)")
        hashes = options.teacher_sha256
        if hashes and len(hashes) != len(options.teachers):
            raise UserError(f"method_args.teacher_sha256 has {len(hashes)} entries but method_args.teachers has "
                            f"{len(options.teachers)}; give one hash per teacher or none")
        for h in hashes:
            check_sha256_option(h, "method_args.teacher_sha256")
        check_loss_weights(options)

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        o = self.options
        self.student = self.build_network(cfg.w_bits, cfg.a_bits)
        hashes = o.teacher_sha256 or [None] * len(o.teachers)
        self.teachers = nn.ModuleList(
            FrozenTeacher(path, arch=cfg.arch, num_classes=info.num_classes, in_channels=info.in_channels,
                          image_size=info.image_size, expected_sha256=sha)
            for path, sha in zip(o.teachers, hashes))

    def loss_terms(self, student_logits: torch.Tensor, teacher_logits: list[torch.Tensor],
                   targets: torch.Tensor) -> dict[str, torch.Tensor]:
        o = self.options
        kd = multi_teacher_kd(student_logits, teacher_logits, targets, o.aggregation, o.temperature)
        return {"ce": o.alpha * cross_entropy(student_logits, targets), "kd": o.beta * kd}

    def forward_train(self, images, targets):
        student_logits = self.student(images)
        teacher_logits = [teacher(images) for teacher in self.teachers]
        return student_logits, self.loss_terms(student_logits, teacher_logits, targets)

    def param_groups(self):
        return [self.network_group("student", self.student, self.cfg.w_bits, self.cfg.a_bits)]

    def metadata(self):
        return {**teacher_metadata(list(self.teachers)), "aggregation": self.options.aggregation}
