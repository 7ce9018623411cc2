"""``dml``: deep mutual learning of jointly trained quantized peers (Zhang, Xiang, Hospedales & Lu, CVPR 2018).

The student and n teachers of the student's architecture, teacher i at ``teacher_bits[i]`` bits
(weights and activations), train jointly from scratch as a cohort of K = n + 1 peers. With
``p_k = softmax(z_k)`` (temperature 1) each network k minimises Zhang et al.'s K-network loss

``L_k = CE(z_k, y) + 1/(K - 1) * sum_{l != k} KL(p_l || p_k)``

with the peers' predictions ``p_l`` constant targets (detached): a network learns from its peers,
never pushes them. The networks have disjoint parameters, so the total ``sum_k L_k`` gives every
network exactly the gradient of its own ``L_k``. Logged as ``ce_student``, ``ce_teachers``,
``kl_student``, ``kl_teachers`` (teachers' terms summed over teachers), the columns of
:mod:`cmtkd.baselines.kdcl`, so the two mutual-learning baselines line up in ``history.csv``.

As in the paper there are no loss weights and no temperature: nothing to set but the cohort.
Deviation (ASSUMPTIONS.md B8): the paper's Algorithm 1 updates the networks one after another, each
seeing its peers' predictions after their update; here all K networks update simultaneously from one
forward pass per step (peer predictions of the same step), K forward/backward passes per step
instead of K(K+1)/2 forwards.

Not to be confused with KDCL-MinLogit (Guo et al., CVPR 2020), which this package called ``dml``
before this version and now calls ``kdcl`` (one shared ensemble target at T = 4 instead of pairwise
KL). A run directory of the old ``dml`` fails to load with a line saying so (``retired_options``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from cmtkd import losses
from cmtkd.methods.base import JointPeers, cross_entropy
from cmtkd.teachers import check_teacher_bits

# Options of the method called ``dml`` before this version (now ``kdcl``): an old run's config.yaml
# names them, and must not load as today's ``dml``.
_RENAMED = ("`dml` was renamed `kdcl` in this version (KDCL-MinLogit mutual learning, which has this "
            "option); `dml` is now Zhang et al.'s deep mutual learning, without it: use method kdcl "
            "(an old `dml` run directory: set method: kdcl in its config.yaml)")


def peer_kl(logits: torch.Tensor, peer_logits: list[torch.Tensor]) -> torch.Tensor:
    """``1/(K-1) sum_l KL(p_l || softmax(logits))`` at T = 1 for the K - 1 peers (targets detached)."""
    return torch.stack([losses.kd_kl(logits, F.softmax(z.detach().float(), dim=1), 1.0)
                        for z in peer_logits]).mean()


class DML(JointPeers):
    retired_options = {key: _RENAMED for key in ("teacher_reduction", "alpha", "beta", "temperature")}

    @dataclass
    class Options:
        teacher_bits: list[int] = field(default_factory=lambda: [8, 6, 4])  # W = A = b_i per teacher

    @classmethod
    def check_options(cls, options, cfg):
        check_teacher_bits(options.teacher_bits, cfg)

    def loss_terms(self, student_logits: torch.Tensor, teacher_logits: list[torch.Tensor],
                   targets: torch.Tensor) -> dict[str, torch.Tensor]:
        cohort = [student_logits, *teacher_logits]
        kl = [peer_kl(z, cohort[:k] + cohort[k + 1:]) for k, z in enumerate(cohort)]
        return {
            "ce_student": cross_entropy(student_logits, targets),
            "ce_teachers": torch.stack([cross_entropy(z, targets) for z in teacher_logits]).sum(),
            "kl_student": kl[0],
            "kl_teachers": torch.stack(kl[1:]).sum(),
        }

    def metadata(self):
        # No checkpoints: the peers are trained here, from scratch.
        return {"teacher_bits": self.teacher_bits, "mutual_learning": "dml (Zhang et al., CVPR 2018)"}
