"""Client-level differential privacy (DP-FedAvg), as pure functions on named tensors.

McMahan, Ramage, Talwar, Zhang (2018), "Learning Differentially Private Recurrent Language
Models": each client's delta is clipped to L2 norm C, the server sums the clipped deltas, adds
Gaussian noise N(0, (z·C)² I) and divides by the *expected* cohort size m — a fixed denominator,
with every client weighted equally. That is the weighting the analysis assumes (sensitivity C
per client), so fedfm requires ``strategy.weighting = "uniform"`` under client-level DP.

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy (2021), "Differentially Private Learning
with Adaptive Clipping"): each client also reports b_k = 1[‖Δ_k‖ ≤ C]; the server forms the
noised fraction b̄ = (Σ b_k + N(0, σ_b²)) / m and updates C ← C · exp(−η (b̄ − γ)), tracking the
γ-quantile of update norms. The privacy cost of the b_k is paid by splitting the total noise
multiplier z between the two sums: z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2).

Noise is added either centrally (the server, after summing) or distributed: every client adds a
share N(0, (z·C)²/m), so that m shares sum to the central noise; that mode is meant for secure
aggregation, where the server never sees an unnoised sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedfm.types import Params


@dataclass(frozen=True)
class DpRound:
    """What clients are told about this round's DP: the clip norm and their noise share's std."""

    clip_norm: float
    delta_noise_share: float = 0.0  # std of each client's noise share on Δ (distributed mode)
    count_noise_share: float = 0.0  # std of each client's noise share on b_k (distributed, adaptive)
    adaptive: bool = False


def global_norm(params: Params) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in params.values()))


def clip(delta: Params, clip_norm: float) -> tuple[Params, float]:
    """Δ · min(1, C / ‖Δ‖₂) and the norm before clipping."""
    norm = global_norm(delta)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: v * factor for k, v in delta.items()}, norm


def gaussian_like(params: Params, std: float, generator: torch.Generator) -> Params:
    """Independent N(0, std²) for every entry, drawn in float64 then cast, from ``generator``."""
    return {
        k: (torch.randn(v.shape, generator=generator, dtype=torch.float64) * std).to(v.dtype)
        for k, v in params.items()
    }


def add(a: Params, b: Params) -> Params:
    return {k: a[k] + b[k] for k in a}


def split_noise(noise_multiplier: float, count_stddev: float | None) -> float:
    """z_Δ for the update sum when σ_b of the clipped-count sum uses part of z (Andrew et al. Thm 1).

    ``count_stddev`` None means fixed clipping: all noise goes to the update.
    """
    if count_stddev is None:
        return noise_multiplier
    rest = noise_multiplier**-2 - (2 * count_stddev) ** -2
    if rest <= 0:
        raise ValueError(
            f"privacy.clipped_count_stddev = {count_stddev} is too small for noise multiplier "
            f"{noise_multiplier:.4g}: it needs 2·σ_b > z (raise it, or use fixed clipping)"
        )
    return rest**-0.5


def adapt_clip(clip_norm: float, unclipped_fraction: float, target_quantile: float, lr: float) -> float:
    """Geometric update C · exp(−η (b̄ − γ)): fewer unclipped than γ → C grows, more → shrinks."""
    return clip_norm * math.exp(-lr * (unclipped_fraction - target_quantile))


def client_half(delta: Params, dp: DpRound, generator: torch.Generator) -> tuple[Params, float]:
    """Clip, then add this client's noise share (distributed mode). Returns (Δ, b_k)."""
    clipped, norm = clip(delta, dp.clip_norm)
    unclipped = 1.0 if norm <= dp.clip_norm else 0.0
    if dp.delta_noise_share > 0:
        clipped = add(clipped, gaussian_like(clipped, dp.delta_noise_share, generator))
    if dp.count_noise_share > 0:
        unclipped += float(torch.randn((), generator=generator, dtype=torch.float64)) * dp.count_noise_share
    return clipped, unclipped


def noisy_mean(total: Params, expected_cohort: float, noise_std: float, generator: torch.Generator) -> Params:
    """(Σ Δ_k + N(0, noise_std² I)) / m — the server half; ``noise_std`` 0 in distributed mode."""
    if noise_std > 0:
        total = add(total, gaussian_like(total, noise_std, generator))
    return {k: v / expected_cohort for k, v in total.items()}
