"""``kd``: Hinton KD from one frozen pre-trained teacher (Hinton, Vinyals & Dean, NIPS-W 2015).

``L = alpha * CE(z_S, y) + beta * T^2 * KL(softmax(z_T / T) || softmax(z_S / T))``, logged as the
terms ``ce`` and ``kd`` (:func:`cmtkd.losses.kd_kl`, :func:`cmtkd.losses.soft_targets`).

The teacher is the ``model.pt`` of a finished run (usually ``fp`` or ``qat``) of the student's
architecture on the same dataset: ``--set method_args.teacher=runs/fp-resnet18``. It is loaded by
:func:`cmtkd.teachers.load_teacher`, stays frozen and in eval mode (its BatchNorm statistics never
move), and its SHA-256 goes to ``metrics.json`` (``teacher_sha256``); pin it with
``method_args.teacher_sha256`` to refuse any other file.

Defaults (ASSUMPTIONS.md): ``alpha = 1``, ``beta = 0.5`` are CMT-KD's CE/KL weights (PAPER §5), so
the baselines differ from CMT-KD only in where the soft targets come from; ``T = 4`` is the common
choice for CIFAR-scale KD (Hinton et al. fix none of them).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cmtkd import losses
from cmtkd.errors import UserError
from cmtkd.methods.base import Method, check_loss_weights, cross_entropy
from cmtkd.teachers import FrozenTeacher, check_sha256_option, teacher_metadata


class KD(Method):
    teachers_help = "a finished `cmtkd train --method fp|qat` run of the same arch and dataset (any bit-width)"

    @dataclass
    class Options:
        teacher: str = ""                   # run directory (or its model.pt) of the pre-trained teacher
        teacher_sha256: str | None = None   # refuse a teacher file with another hash
        alpha: float = 1.0                  # weight of the student's cross-entropy
        beta: float = 0.5                   # weight of T^2 * KL to the teacher's soft targets
        temperature: float = 4.0            # softmax temperature T of the soft targets

    @classmethod
    def check_options(cls, options, cfg):
        if not options.teacher:
            raise UserError(f"method {cfg.method} needs a pre-trained teacher: --set method_args.teacher=RUN_DIR "
                            f"(a finished `cmtkd train --method fp|qat --arch {cfg.arch}` run)")
        if options.teacher_sha256 is not None:
            check_sha256_option(options.teacher_sha256, "method_args.teacher_sha256")
        check_loss_weights(options)

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        self.student = self.build_network(cfg.w_bits, cfg.a_bits)
        self.teacher = self.load_frozen_teacher(self.options.teacher, self.options.teacher_sha256)

    def load_frozen_teacher(self, path: str, sha256: str | None) -> FrozenTeacher:
        """A teacher of the student's architecture trained on the same dataset (any bit-width)."""
        return FrozenTeacher(path, arch=self.cfg.arch, num_classes=self.info.num_classes,
                             in_channels=self.info.in_channels, image_size=self.info.image_size,
                             expected_sha256=sha256)

    def loss_terms(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   targets: torch.Tensor) -> dict[str, torch.Tensor]:
        o = self.options
        target_probs = losses.soft_targets(teacher_logits, o.temperature)
        return {"ce": o.alpha * cross_entropy(student_logits, targets),
                "kd": o.beta * losses.kd_kl(student_logits, target_probs, o.temperature)}

    def forward_train(self, images, targets):
        student_logits = self.student(images)
        return student_logits, self.loss_terms(student_logits, self.teacher(images), targets)

    def param_groups(self):
        # The teacher has no trainable parameters, so it is in no group.
        return [self.network_group("student", self.student, self.cfg.w_bits, self.cfg.a_bits)]

    def metadata(self):
        return teacher_metadata([self.teacher])
