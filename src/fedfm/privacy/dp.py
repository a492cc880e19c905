"""Client-level differential privacy (DP-FedAvg), as pure functions on named tensors.

McMahan, Ramage, Talwar, Zhang (2018), "Learning Differentially Private Recurrent Language
Models": each client's delta is clipped to L2 norm C, the clipped deltas are summed, Gaussian
noise N(0, (z·C)² I) is added and the sum divided by the *expected* cohort size m — a fixed
denominator, with every client weighted equally. That is the weighting the analysis assumes
(each client moves the sum by at most C), so fedfm requires ``strategy.weighting = "uniform"``.

Where the clipping happens: with central noise and no secure aggregation the (trusted) server
clips every update it receives and computes each clipped bit itself, so no client-reported value
enters the mechanism. Under secure aggregation the server sees only sums, so clients clip.

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy (2021), "Differentially Private Learning
with Adaptive Clipping"): with b_k = 1[‖Δ_k‖ ≤ C], the noised *centred* count
S = Σ (b_k − ½) + N(0, σ_b²) gives the unclipped fraction b̄ = (S + m/2) / m, and
C ← C · exp(−η (b̄ − γ)) tracks the γ-quantile of update norms. Centring matters: under
add/remove-one neighbours a centred bit moves S by ½, an uncentred one by 1. The update sum and
the count are one Gaussian mechanism whose multiplier combines both parts:

    z_eff⁻² = (σ_Δ / s_Δ)⁻² + (σ_b / s_b)⁻²   (σ over sensitivity, per part)

Add/remove: s_Δ = C, s_b = ½; replace-one: s_Δ = 2C, s_b = 1. Either way, charging the run's z
(relative to C; the accountant divides by the relation's factor) and spending σ_Δ = z_Δ·C with
z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) on the update makes the mechanism run equal the one charged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedfm.types import Params


@dataclass(frozen=True)
class DpRound:
    """What clients that clip (under secure aggregation) are told: the clip norm, adaptive or not."""

    clip_norm: float
    adaptive: bool = False


def global_norm(params: Params) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in params.values()))


def clip(delta: Params, clip_norm: float) -> tuple[Params, float]:
    """Δ · min(1, C / ‖Δ‖₂) and the norm before clipping (a non-finite norm is an error)."""
    norm = global_norm(delta)
    if not math.isfinite(norm):
        raise ValueError("cannot clip an update with NaN or infinite entries")
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
    """z_Δ for the update sum when the centred clipped-count sum takes σ_b of z (Andrew et al. Thm 1).

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


def clipped_bit(norm: float, clip_norm: float) -> float:
    """b = 1[‖Δ‖ ≤ C]."""
    return 1.0 if norm <= clip_norm else 0.0


def unclipped_fraction(noisy_centred_count: float, expected_cohort: float) -> float | None:
    """b̄ = (S + m/2) / m, clamped to [0, 1] (post-processing); None when S is not finite."""
    if not math.isfinite(noisy_centred_count):
        return None
    fraction = (noisy_centred_count + expected_cohort / 2) / expected_cohort
    return min(1.0, max(0.0, fraction))


def adapt_clip(clip_norm: float, unclipped_fraction: float, target_quantile: float, lr: float) -> float:
    """Geometric update C · exp(−η (b̄ − γ)): fewer unclipped than γ → C grows, more → shrinks."""
    return clip_norm * math.exp(-lr * (unclipped_fraction - target_quantile))


def client_half(delta: Params, dp: DpRound, slack: float = 0.0) -> tuple[Params, float]:
    """Clip (a client under secure aggregation). Returns (clip(Δ), b). ``slack``: how much the
    encoding may add to the norm (fixed-point rounding), taken off C so the encoded vector stays
    within it; the bit still compares with C."""
    if dp.clip_norm <= slack:
        raise ValueError(f"clip norm {dp.clip_norm:.3g} is below the fixed-point slack {slack:.3g}")
    clipped, norm = clip(delta, dp.clip_norm - slack)
    return clipped, clipped_bit(norm, dp.clip_norm)


def server_sums(deltas, clip_norm: float) -> tuple[Params | None, float, int]:
    """Central DP at the server: Σ clip(Δ_k) (accumulated in float64, returned in each tensor's
    dtype), the centred count Σ (b_k − ½), and how many updates."""
    total, dtypes, count, n = None, {}, 0.0, 0
    for delta in deltas:
        clipped, norm = clip(delta, clip_norm)
        count += clipped_bit(norm, clip_norm) - 0.5
        n += 1
        if total is None:
            total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in clipped.items()}
            dtypes = {k: v.dtype for k, v in clipped.items()}
        for k, v in clipped.items():
            total[k] += v.double()
    if total is not None:
        total = {k: v.to(dtypes[k]) for k, v in total.items()}
    return total, count, n


def noisy_mean(total: Params, expected_cohort: float, noise_std: float, generator: torch.Generator) -> Params:
    """(Σ Δ_k + N(0, noise_std² I)) / m — the server half; ``noise_std`` 0 in distributed mode."""
    if noise_std > 0:
        total = add(total, gaussian_like(total, noise_std, generator))
    return {k: v / expected_cohort for k, v in total.items()}
