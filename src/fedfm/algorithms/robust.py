"""Byzantine-robust aggregators: pure functions from a list of (delta, weight) to one delta.

Each works on the updates flattened to vectors, documents how many Byzantine clients f it
tolerates, and refuses a cohort too small for it with ``CohortTooSmallError``.

- ``median``: coordinate-wise median (Yin et al., 2018). Breakdown point 1/2: tolerates f < n/2.
- ``trimmed_mean``: per coordinate, drop the ⌊βn⌋ largest and smallest values and average the
  rest (Yin et al., 2018). Tolerates f ≤ ⌊βn⌋; needs n > 2⌊βn⌋.
- ``krum`` / ``multi_krum``: score each update by the sum of squared distances to its n − f − 2
  nearest neighbours; Krum returns the best-scored update, Multi-Krum the mean of the m best
  (Blanchard et al., 2017). Needs n ≥ 2f + 3.
- ``bulyan``: select n − 2f updates by repeated Krum, then per coordinate average the n − 4f
  values closest to the median (El Mhamdi et al., 2018). Needs n ≥ 4f + 3.
- ``norm_bound``: scale every update to L2 norm ≤ C, then take the weighted mean (Sun et al.,
  2019, "Can You Really Backdoor Federated Learning?"). Bounds any one client's influence by
  C·w_k/Σw; tolerates no f in the worst case, but blunts scaling attacks.
- ``geometric_median``: the weighted geometric median by smoothed Weiszfeld iterations (RFA,
  Pillutla et al., 2022). Breakdown point 1/2 of the total weight.

Unless stated, the rules ignore the example weights (an attacker can lie about its count).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from pydantic import BaseModel, Field

from fedfm.algorithms.aggregators import AGGREGATORS, EmptyCohortError, aggregator_options
from fedfm.types import Params


class CohortTooSmallError(EmptyCohortError):
    """The cohort has too few updates for the rule's Byzantine assumption."""


def flatten(params: Params) -> torch.Tensor:
    return torch.cat([params[k].reshape(-1).to(torch.float64) for k in sorted(params)])


def unflatten(vector: torch.Tensor, like: Params) -> Params:
    out, offset = {}, 0
    for k in sorted(like):
        n = like[k].numel()
        out[k] = vector[offset : offset + n].reshape(like[k].shape).to(like[k].dtype)
        offset += n
    return out


def _stack(updates: Iterable[tuple[Params, float]]) -> tuple[torch.Tensor, torch.Tensor, Params]:
    items = list(updates)
    if not items:
        raise EmptyCohortError("no updates to aggregate")
    vectors = torch.stack([flatten(d) for d, _ in items])
    weights = torch.tensor([float(w) for _, w in items], dtype=torch.float64)
    return vectors, weights, items[0][0]


def _require(n: int, needed: int, rule: str, assumption: str) -> None:
    if n < needed:
        raise CohortTooSmallError(f"{rule} needs at least {needed} updates ({assumption}), got {n}")


def coordinate_median(x: torch.Tensor) -> torch.Tensor:
    """Per-coordinate median; the mean of the two middle values for an even count."""
    s, _ = torch.sort(x, dim=0)
    n = x.shape[0]
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def coordinate_trimmed_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    s, _ = torch.sort(x, dim=0)
    return s[k : x.shape[0] - k].mean(dim=0)


def krum_scores(x: torch.Tensor, f: int) -> torch.Tensor:
    """Sum of squared distances from each row to its n − f − 2 nearest other rows."""
    d2 = torch.cdist(x, x).pow(2)
    n = x.shape[0]
    d2.fill_diagonal_(float("inf"))
    nearest, _ = torch.sort(d2, dim=1)
    return nearest[:, : max(n - f - 2, 1)].sum(dim=1)


@AGGREGATORS.register("median")
def median(updates: Iterable[tuple[Params, float]]) -> Params:
    x, _, like = _stack(updates)
    return unflatten(coordinate_median(x), like)


class TrimOptions(BaseModel):
    trim_ratio: float = Field(0.1, ge=0, lt=0.5, description="Share β cut from each end, per coordinate.")


class ByzantineOptions(BaseModel):
    byzantine: int = Field(1, ge=0, description="Byzantine clients f tolerated.")


class MultiKrumOptions(ByzantineOptions):
    krum_m: int | None = Field(None, ge=1, description="Updates averaged (default n − f).")


class NormBoundOptions(BaseModel):
    norm_bound: float = Field(1.0, gt=0, description="L2 bound each update is scaled to.")


class WeiszfeldOptions(BaseModel):
    gm_iters: int = Field(10, ge=1, description="Smoothed Weiszfeld iterations.")


@AGGREGATORS.register("trimmed_mean", options=TrimOptions)
def trimmed_mean(updates: Iterable[tuple[Params, float]], *, trim_ratio: float = 0.1) -> Params:
    x, _, like = _stack(updates)
    n = x.shape[0]
    k = math.floor(trim_ratio * n)
    _require(n, 2 * k + 1, "trimmed_mean", f"n > 2·⌊β·n⌋ with β = {trim_ratio}")
    return unflatten(coordinate_trimmed_mean(x, k), like)


@AGGREGATORS.register("krum", options=ByzantineOptions)
def krum(updates: Iterable[tuple[Params, float]], *, byzantine: int = 1) -> Params:
    return multi_krum(updates, byzantine=byzantine, krum_m=1)


@AGGREGATORS.register("multi_krum", options=MultiKrumOptions)
def multi_krum(
    updates: Iterable[tuple[Params, float]], *, byzantine: int = 1, krum_m: int | None = None
) -> Params:
    x, _, like = _stack(updates)
    n = x.shape[0]
    _require(n, 2 * byzantine + 3, "krum", f"n ≥ 2f + 3 with f = {byzantine}")
    m = n - byzantine if krum_m is None else min(krum_m, n)
    chosen = torch.argsort(krum_scores(x, byzantine), stable=True)[:m]
    return unflatten(x[chosen].mean(dim=0), like)


@AGGREGATORS.register("bulyan", options=ByzantineOptions)
def bulyan(updates: Iterable[tuple[Params, float]], *, byzantine: int = 1) -> Params:
    x, _, like = _stack(updates)
    n, f = x.shape[0], byzantine
    _require(n, 4 * f + 3, "bulyan", f"n ≥ 4f + 3 with f = {f}")
    remaining = list(range(n))
    selected = []
    for _ in range(n - 2 * f):  # repeated Krum over what is left
        scores = krum_scores(x[remaining], f) if len(remaining) > 2 else torch.zeros(len(remaining))
        best = int(torch.argmin(scores))
        selected.append(remaining.pop(best))
    s = x[selected]
    beta = s.shape[0] - 2 * f
    med = coordinate_median(s)
    closest = torch.argsort((s - med).abs(), dim=0, stable=True)[:beta]
    return unflatten(torch.gather(s, 0, closest).mean(dim=0), like)


@AGGREGATORS.register("norm_bound", options=NormBoundOptions)
def norm_bound(updates: Iterable[tuple[Params, float]], *, norm_bound: float = 1.0) -> Params:
    x, w, like = _stack(updates)
    norms = x.norm(dim=1, keepdim=True)
    scale = torch.clamp(norm_bound / norms.clamp_min(1e-12), max=1.0)
    if w.sum() <= 0:
        raise EmptyCohortError("the aggregation weights sum to zero")
    return unflatten((x * scale * w[:, None]).sum(dim=0) / w.sum(), like)


@AGGREGATORS.register("geometric_median", options=WeiszfeldOptions)
def geometric_median(
    updates: Iterable[tuple[Params, float]], *, gm_iters: int = 10, gm_eps: float = 1e-6
) -> Params:
    """Weighted geometric median, smoothed Weiszfeld (RFA); uses the example weights."""
    x, w, like = _stack(updates)
    if w.sum() <= 0:
        raise EmptyCohortError("the aggregation weights sum to zero")
    alpha = w / w.sum()
    z = (alpha[:, None] * x).sum(dim=0)
    for _ in range(gm_iters):
        beta = alpha / torch.clamp((x - z).norm(dim=1), min=gm_eps)
        z_new = (beta[:, None] * x).sum(dim=0) / beta.sum()
        if torch.norm(z_new - z) <= gm_eps * max(1.0, float(torch.norm(z))):
            z = z_new
            break
        z = z_new
    return unflatten(z, like)


def _krum_cohort(byzantine: int = 1, **_) -> int:
    return 2 * byzantine + 3


def _bulyan_cohort(byzantine: int = 1, **_) -> int:
    return 4 * byzantine + 3


for _rule in (median, trimmed_mean, krum, multi_krum, bulyan, norm_bound, geometric_median):
    _rule.bounds_influence = True  # robust or bounding: one client's influence is bounded
krum.min_cohort = multi_krum.min_cohort = _krum_cohort  # n ≥ 2f + 3
bulyan.min_cohort = _bulyan_cohort  # n ≥ 4f + 3


def min_cohort(strategy) -> int:
    """The fewest updates the configured rule accepts: its ``min_cohort(**its options)``
    capability (1 for rules that declare none)."""
    rule = AGGREGATORS.get(strategy.aggregator)
    needs = getattr(rule, "min_cohort", None)
    return 1 if needs is None else int(needs(**aggregator_options(strategy)))
