"""Knowledge distillation through logits: the losses and the ensemble (pure functions).

``distillation_loss`` is Hinton et al.'s soft-target loss, τ² · KL(softmax(t/τ) ‖ softmax(s/τ))
averaged over examples (τ² keeps its gradient's scale comparable across temperatures);
``ensemble_logits`` is FedDF's / FedMKT's teacher: the clients' logits averaged with weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """τ² · mean over rows of KL(softmax(teacher/τ) ‖ softmax(student/τ)); the teacher is a target
    (no gradient flows into it)."""
    t = temperature
    target = F.log_softmax(teacher.detach() / t, dim=-1)
    return (
        t * t * F.kl_div(F.log_softmax(student / t, dim=-1), target, log_target=True, reduction="batchmean")
    )


def ensemble_logits(logits: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ w_k z_k / Σ w_k over the clients' logits on the same rows."""
    if not logits or len(logits) != len(weights):
        raise ValueError("ensemble_logits needs one weight per client's logits, and at least one")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("ensemble weights must sum to a positive number")
    return sum(w * z for w, z in zip(weights, logits, strict=True)) / total
