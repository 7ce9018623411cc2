"""Distillation losses shared by CMT-KD and the baselines (each exists once, here).

- :func:`kd_kl` — Hinton et al. (2015): ``T^2 * KL(p || softmax(z/T))`` for a target distribution p.
- :func:`min_logit_ensemble` — KDCL-MinLogit (Guo et al., CVPR 2020): shift every model's logits so
  the true-class logit is 0, take the element-wise minimum over models.
- :func:`attention_map` / :func:`attention_loss` — attention transfer (Zagoruyko & Komodakis,
  ICLR 2017) with p = 2.
"""
from __future__ import annotations

import typing
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

AtReduction = Literal["mean", "sum"]
AT_REDUCTIONS = typing.get_args(AtReduction)


def kd_kl(student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(target || softmax(student/T))``, averaged over the batch (the target is constant)."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=1)
    p = target_probs.detach().float()
    kl = (p * (torch.log(p.clamp_min(1e-12)) - log_q)).sum(dim=1)
    return temperature**2 * kl.mean()


def soft_targets(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.softmax(logits.detach().float() / temperature, dim=1)


def min_logit_ensemble(logits: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """KDCL-MinLogit ensemble logit (detached): per model ``z - z[target]``, then the element-wise
    minimum over models. The true-class entry is 0 for every model, so the minimum picks, for each
    wrong class, the model most confident against it."""
    shifted = [z.detach().float() - z.detach().float().gather(1, targets[:, None]) for z in logits]
    return torch.stack(shifted, dim=0).amin(dim=0)


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """AT (p = 2): channel mean of squared activations, flattened over positions, L2-normalised."""
    am = features.float().pow(2).mean(dim=1).flatten(1)
    return F.normalize(am, p=2, dim=1)


def attention_loss(student_features: torch.Tensor, target_features: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Squared distance between attention maps. ``mean``: over batch and positions (the AT authors'
    code); ``sum``: summed over positions, averaged over the batch. The choice rescales gamma."""
    diff = (attention_map(student_features) - attention_map(target_features)).pow(2)
    if reduction == "mean":
        return diff.mean()
    if reduction == "sum":
        return diff.sum(dim=1).mean()
    raise ValueError(f"unknown attention-loss reduction {reduction!r}; choose one of {AT_REDUCTIONS}")
