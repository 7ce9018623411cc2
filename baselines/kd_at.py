"""``kd-at``: Hinton KD plus attention transfer from one frozen teacher (Zagoruyko & Komodakis, ICLR 2017).

``L = alpha * CE + beta * T^2 * KL + gamma * sum_k AT(S_k, T_k)``, logged as ``ce``, ``kd``, ``at``:
the ``kd`` baseline (same teacher handling, see :mod:`cmtkd.baselines.kd`) plus the attention-transfer
loss :func:`cmtkd.losses.attention_loss` (p = 2) between the student's and the teacher's outputs at
the ends of the stages ``feature_stages``, summed over the stages (as in the AT paper).

``feature_stages`` defaults to ResNet-18's ``layer1, layer2, layer3`` (the stage ends CMT-KD fuses,
PAPER §4); for AlexNet pass conv stages, e.g. ``--set method_args.feature_stages=[conv2,conv3,conv4]``.
The teacher must have the student's architecture and input variant so the attention maps have the
same spatial size (the widths may differ: the map is a channel mean).

``gamma = 100`` with ``attention_reduction = mean`` (squared differences averaged over batch and
positions) is CMT-KD's feature-loss weight (PAPER §5), so kd-at and CMT-KD weight attention alike;
the AT authors' code uses 1000 with the same reduction (ASSUMPTIONS.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cmtkd.baselines.kd import KD
from cmtkd import losses
from cmtkd.errors import UserError
from cmtkd.losses import AtReduction
from cmtkd.methods.base import check_nonnegative
from cmtkd.models import build_model


def stage_names(arch: str) -> list[str]:
    """Stage names of ``arch`` (from a minimal full-precision instance: building one takes ~ms)."""
    return build_model(arch, num_classes=2, width=0.01).stage_names


class KDAT(KD):
    @dataclass
    class Options(KD.Options):
        feature_stages: list[str] = field(default_factory=lambda: ["layer1", "layer2", "layer3"])  # stages whose attention maps are matched
        gamma: float = 100.0                # weight of the summed attention-transfer loss
        attention_reduction: AtReduction = "mean"  # over positions (see cmtkd.losses); rescales gamma

    @classmethod
    def check_options(cls, options, cfg):
        super().check_options(options, cfg)
        check_nonnegative(options, "gamma")
        names = stage_names(cfg.arch)
        feature_names = names[:-1]  # the last stage returns logits, which have no spatial layout
        chosen = options.feature_stages
        unknown = [s for s in chosen if s not in feature_names]
        if not chosen or unknown or len(set(chosen)) != len(chosen):
            problem = (f"names {unknown}, which {cfg.arch} does not have" if unknown
                       else "is empty" if not chosen else "repeats a stage")
            example = ",".join(feature_names[1:4])
            raise UserError(f"method_args.feature_stages={chosen} {problem}; choose distinct stages of {cfg.arch} "
                            f"from {feature_names}, e.g. --set method_args.feature_stages=[{example}]")

    def attention_term(self, student_features: dict[str, torch.Tensor],
                       teacher_features: dict[str, torch.Tensor]) -> torch.Tensor:
        """``gamma * sum_k AT(S_k, T_k)`` over ``feature_stages``."""
        o = self.options
        total = 0.0
        for stage in o.feature_stages:
            s, t = student_features[stage], teacher_features[stage]
            if s.shape[2:] != t.shape[2:]:
                raise UserError(f"kd-at: at stage {stage} the student's features are {tuple(s.shape[2:])} but the "
                                f"teacher's ({self.teacher.path}) are {tuple(t.shape[2:])}; use a teacher trained "
                                f"with the student's architecture and model.variant")
            total = total + losses.attention_loss(s, t, o.attention_reduction)
        return o.gamma * total

    def forward_train(self, images, targets):
        student_features = self.student.forward_features(images)
        teacher_features = self.teacher.forward_features(images)
        last = self.student.stage_names[-1]
        student_logits = student_features[last]
        terms = self.loss_terms(student_logits, teacher_features[last], targets)
        terms["at"] = self.attention_term(student_features, teacher_features)
        return student_logits, terms
