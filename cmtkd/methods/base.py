"""The method contract (after mdistiller's Distiller): a method is an ``nn.Module`` that owns every
network it trains, returns ``(logits, {loss_name: weighted_loss})`` from :meth:`forward_train` (the
engine sums the dict and logs every term), and declares its optimizer parameter groups. The engine
never needs to know which method it runs."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cmtkd.errors import UserError
from cmtkd.models import build_model
from cmtkd.teachers import stand_ins

if TYPE_CHECKING:
    from cmtkd.config import RunConfig
    from cmtkd.data import DataInfo


def default_weight_decay(w_bits: int, a_bits: int) -> float:
    """docs/method.md §6 (SECONDARY): 2.5e-5 for 1-2-bit models, 1e-4 otherwise. We call a network
    "1-2-bit" when both its weights and its activations have at most 2 bits (ASSUMPTIONS.md)."""
    return 2.5e-5 if max(w_bits, a_bits) <= 2 else 1e-4


def check_nonnegative(options, key: str) -> None:
    """``method_args.KEY`` must be a finite number >= 0 (NaN and inf would only show as a diverged run)."""
    value = getattr(options, key)
    if not (math.isfinite(value) and value >= 0):
        raise UserError(f"method_args.{key} must be a finite number >= 0, got {value!r}")


def check_loss_weights(options, nonnegative: tuple[str, ...] = ("alpha", "beta")) -> None:
    """Shared option checks of the distillation methods: loss weights finite and >= 0, temperature
    finite and > 0."""
    for key in nonnegative:
        check_nonnegative(options, key)
    if not (math.isfinite(options.temperature) and options.temperature > 0):
        raise UserError(f"method_args.temperature must be a finite number > 0, got {options.temperature!r}")


def arch_config(cfg: "RunConfig", info: "DataInfo", w_bits: int, a_bits: int) -> dict:
    """The keyword arguments of :func:`cmtkd.models.build_model` for one network of run ``cfg`` on a
    dataset described by ``info`` (stored in model.pt as its arch_config)."""
    from cmtkd.models import alexnet_channels

    variant = cfg.model.variant if cfg.model.variant != "auto" else info.variant
    config = dict(
        arch=cfg.arch, num_classes=info.num_classes, in_channels=info.in_channels,
        variant=variant, width=cfg.model.width, w_bits=w_bits, a_bits=a_bits,
        policy=cfg.model.policy, weight_quant=cfg.model.weight_quant,
        act_quant=cfg.model.act_quant, quant_layout=cfg.model.quant_layout,
    )
    channels = alexnet_channels(cfg.model.alexnet_channels, variant)
    if cfg.arch == "alexnet" and channels != "torchvision":  # files of torchvision's stay as they were
        config["alexnet_channels"] = channels
    return config


class Method(nn.Module):
    """A training method. Its options (``method_args``) are the fields of its ``Options`` dataclass,
    typed (``Literal[...]`` for a choice): :func:`cmtkd.config.method_options` coerces and checks
    them once, when the run config is resolved."""

    default_bits = 2  # w_bits/a_bits when the user gives none
    # Options this method fixes (an ablation of another method): the user may leave them at the
    # default or give the pinned value; anything else is an error.
    pinned: ClassVar[dict[str, Any]] = {}
    # Options an earlier version of this method name had, each with the line that explains what
    # became of them (a renamed method): an old run's config fails with that line, not "unknown key".
    retired_options: ClassVar[dict[str, str]] = {}
    # What this method's teachers must be, after the option syntax that `cmtkd list METHOD` derives
    # from the catalog (cmtkd.options_doc.teachers_text); empty: that syntax says enough.
    teachers_help: ClassVar[str] = ""

    @dataclass
    class Options:
        pass

    @classmethod
    def derive_options(cls, options, cfg: "RunConfig"):
        """Options computed from the given ones (after the pins), as a new Options object."""
        return options

    @classmethod
    def check_options(cls, options, cfg: "RunConfig") -> None:
        """Raise UserError for options this method cannot run with (checks beyond the field types)."""

    def __init__(self, cfg: "RunConfig", info: "DataInfo"):
        super().__init__()
        self.cfg = cfg
        self.info = info
        # cfg is resolved (cmtkd.config.resolve): method_args holds every option, already checked.
        self.options = self.Options(**cfg.method_args)

    # -- building blocks -------------------------------------------------------------------
    def arch_config(self, w_bits: int, a_bits: int) -> dict:
        """Everything needed to rebuild one network of this run (stored in model.pt)."""
        return arch_config(self.cfg, self.info, w_bits, a_bits)

    def build_network(self, w_bits: int, a_bits: int) -> nn.Module:
        """A network of this run at (w_bits, a_bits): from scratch, or from ``model.init_from``."""
        config = self.arch_config(w_bits, a_bits)
        network = build_model(**config)
        if self.cfg.model.init_from and not stand_ins():  # (a config check reads no model file)
            from cmtkd.initialization import initialize_from

            digest = initialize_from(network, self.cfg.model.init_from, config)
            self.init_metadata = {"init_from": self.cfg.model.init_from, "init_sha256": digest}
        return network

    def network_group(self, name: str, module: nn.Module, w_bits: int, a_bits: int, lr_mult: float = 1.0) -> dict:
        wd = self.cfg.optim.weight_decay
        if wd is None:
            wd = default_weight_decay(w_bits, a_bits)
        params = [p for p in module.parameters() if p.requires_grad]
        return {"name": name, "params": params, "weight_decay": wd, "lr_mult": lr_mult}

    # -- the contract ------------------------------------------------------------------------
    student: nn.Module

    def forward_train(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(images)

    def param_groups(self) -> list[dict]:
        """Optimizer groups: dicts with name, params, weight_decay, lr_mult. Together they must cover
        every trainable parameter exactly once (the engine checks)."""
        raise NotImplementedError

    def eval_models(self) -> dict[str, nn.Module]:
        """Networks whose validation accuracy is logged each epoch; 'student' is the one selected."""
        return {"student": self.student}

    def student_arch_config(self) -> dict:
        """What model.pt stores to rebuild the selected network (``student``)."""
        return self.arch_config(self.cfg.w_bits, self.cfg.a_bits)

    @classmethod
    def network_from_model_file(cls, blob: dict, path, fix: str, what: str = "model file") -> nn.Module:
        """The network of a checked model.pt of this method (``cmtkd evaluate``); one network unless
        the method saves several (:func:`cmtkd.checkpoint.is_network_set`)."""
        from cmtkd.checkpoint import build_network

        return build_network(blob, path, fix, what)

    def log_scalars(self) -> dict[str, float]:
        """Extra per-epoch values for history.csv (e.g. importance weights)."""
        return {}

    def metadata(self) -> dict:
        """Extra entries for metrics.json (e.g. teacher checkpoint hashes)."""
        return {}

    # metrics.json entries of model.init_from (set by build_network)
    init_metadata: dict = {}


class JointPeers(Method):
    """A student and n teachers of its architecture (teacher i at ``options.teacher_bits[i]`` bits,
    weights and activations) trained together from scratch, no fusion: the scaffolding the mutual
    learning baselines (``dml``, ``kdcl``) share. A subclass gives ``loss_terms`` and ``metadata``."""

    def __init__(self, cfg: "RunConfig", info: "DataInfo"):
        super().__init__(cfg, info)
        self.teacher_bits = list(self.options.teacher_bits)
        self.student = self.build_network(cfg.w_bits, cfg.a_bits)
        self.teachers = nn.ModuleList(self.build_network(b, b) for b in self.teacher_bits)
        # Same names as CMT-KD's teachers, so history.csv columns line up across methods.
        self.teacher_names = [f"teacher{i}_w{b}a{b}" for i, b in enumerate(self.teacher_bits)]

    def loss_terms(self, student_logits: torch.Tensor, teacher_logits: list[torch.Tensor],
                   targets: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward_train(self, images, targets):
        student_logits = self.student(images)
        teacher_logits = [teacher(images) for teacher in self.teachers]
        return student_logits, self.loss_terms(student_logits, teacher_logits, targets)

    def param_groups(self):
        groups = [self.network_group("student", self.student, self.cfg.w_bits, self.cfg.a_bits)]
        groups += [self.network_group(name, teacher, b, b)  # weight decay by the teacher's own bit-width
                   for name, teacher, b in zip(self.teacher_names, self.teachers, self.teacher_bits)]
        return groups

    def eval_models(self):
        return {"student": self.student, **dict(zip(self.teacher_names, self.teachers))}


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets)
