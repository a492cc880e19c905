"""Byzantine-robust aggregators: pure functions from a list of (delta, weight) to one delta.

Each reads the cohort one tensor name at a time (``Cohort.blocks``: the n × size matrix of that
tensor across the updates), so that updates spilled to disk by a deployment (``fedfm.wire.stream``)
are never all in memory at once: the server holds one tensor of every update, the distances
between updates (n × n) and the result. Each documents how many Byzantine clients f it tolerates,
and refuses a cohort too small for it with ``CohortTooSmallError``.

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
from collections.abc import Callable, Iterable, Iterator

import torch
from pydantic import BaseModel, Field

from fedfm.algorithms.aggregators import AGGREGATORS, EmptyCohortError, aggregator_options
from fedfm.types import Params


class CohortTooSmallError(EmptyCohortError):
    """The cohort has too few updates for the rule's Byzantine assumption."""


class Cohort:
    """The updates of a round, read one tensor name at a time (in sorted name order)."""

    def __init__(self, updates: Iterable[tuple[Params, float]]) -> None:
        items = list(updates)
        if not items:
            raise EmptyCohortError("no updates to aggregate")
        self.deltas = [d for d, _ in items]
        self.weights = torch.tensor([float(w) for _, w in items], dtype=torch.float64)
        self.n = len(items)
        self.keys = sorted(self.deltas[0])
        self.meta: dict[str, tuple[torch.Size, torch.dtype]] = {}  # name → (shape, dtype), once read

    def blocks(
        self, rows: list[int] | None = None
    ) -> Iterator[tuple[str, torch.Tensor, torch.Size, torch.dtype]]:
        """(name, the rows' values of that tensor as a float64 matrix, its shape, its dtype)."""
        for k in self.keys:
            picked = range(self.n) if rows is None else rows
            tensors = [self.deltas[i][k] for i in picked]
            self.meta[k] = (tensors[0].shape, tensors[0].dtype)
            block = torch.stack([t.reshape(-1).to(torch.float64) for t in tensors])
            del tensors
            yield k, block, *self.meta[k]

    def map(self, per_coordinate: Callable[[torch.Tensor], torch.Tensor], rows=None) -> Params:
        """Each tensor of the aggregate from its block (n × size → size)."""
        return {k: per_coordinate(b).reshape(shape).to(dtype) for k, b, shape, dtype in self.blocks(rows)}

    def squared_distances(self) -> torch.Tensor:
        """‖Δ_i − Δ_j‖² for every pair, summed block by block (n × n, float64)."""
        d2 = torch.zeros(self.n, self.n, dtype=torch.float64)
        for _, b, _, _ in self.blocks():
            d2 += torch.stack([(b - b[i]).pow(2).sum(dim=1) for i in range(self.n)])
        return d2

    def squared_norms(self, centre: Params | None = None) -> torch.Tensor:
        """‖Δ_i − c‖² for every update (c: 0, or a point given tensor by tensor)."""
        out = torch.zeros(self.n, dtype=torch.float64)
        for k, b, _, _ in self.blocks():
            if centre is not None:
                b = b - centre[k].reshape(-1)
            out += b.pow(2).sum(dim=1)
        return out


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


def krum_scores(d2: torch.Tensor, f: int) -> torch.Tensor:
    """Sum of squared distances from each update to its n − f − 2 nearest others (``d2``: the
    squared distances between them)."""
    n = d2.shape[0]
    d2 = d2.clone()
    d2.fill_diagonal_(float("inf"))
    nearest, _ = torch.sort(d2, dim=1)
    return nearest[:, : max(n - f - 2, 1)].sum(dim=1)


@AGGREGATORS.register("median")
def median(updates: Iterable[tuple[Params, float]]) -> Params:
    return Cohort(updates).map(coordinate_median)


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
    cohort = Cohort(updates)
    k = math.floor(trim_ratio * cohort.n)
    _require(cohort.n, 2 * k + 1, "trimmed_mean", f"n > 2·⌊β·n⌋ with β = {trim_ratio}")
    return cohort.map(lambda x: coordinate_trimmed_mean(x, k))


@AGGREGATORS.register("krum", options=ByzantineOptions)
def krum(updates: Iterable[tuple[Params, float]], *, byzantine: int = 1) -> Params:
    return multi_krum(updates, byzantine=byzantine, krum_m=1)


@AGGREGATORS.register("multi_krum", options=MultiKrumOptions)
def multi_krum(
    updates: Iterable[tuple[Params, float]], *, byzantine: int = 1, krum_m: int | None = None
) -> Params:
    cohort = Cohort(updates)
    n = cohort.n
    _require(n, 2 * byzantine + 3, "krum", f"n ≥ 2f + 3 with f = {byzantine}")
    m = n - byzantine if krum_m is None else min(krum_m, n)
    chosen = torch.argsort(krum_scores(cohort.squared_distances(), byzantine), stable=True)[:m]
    return cohort.map(lambda x: x.mean(dim=0), rows=chosen.tolist())


@AGGREGATORS.register("bulyan", options=ByzantineOptions)
def bulyan(updates: Iterable[tuple[Params, float]], *, byzantine: int = 1) -> Params:
    cohort = Cohort(updates)
    n, f = cohort.n, byzantine
    _require(n, 4 * f + 3, "bulyan", f"n ≥ 4f + 3 with f = {f}")
    d2 = cohort.squared_distances()
    remaining = list(range(n))
    selected = []
    for _ in range(n - 2 * f):  # repeated Krum over what is left
        sub = d2[remaining][:, remaining]
        scores = krum_scores(sub, f) if len(remaining) > 2 else torch.zeros(len(remaining))
        best = int(torch.argmin(scores))
        selected.append(remaining.pop(best))
    beta = len(selected) - 2 * f

    def closest_to_median(s: torch.Tensor) -> torch.Tensor:
        closest = torch.argsort((s - coordinate_median(s)).abs(), dim=0, stable=True)[:beta]
        return torch.gather(s, 0, closest).mean(dim=0)

    return cohort.map(closest_to_median, rows=selected)


@AGGREGATORS.register("norm_bound", options=NormBoundOptions)
def norm_bound(updates: Iterable[tuple[Params, float]], *, norm_bound: float = 1.0) -> Params:
    cohort = Cohort(updates)
    w = cohort.weights
    if w.sum() <= 0:
        raise EmptyCohortError("the aggregation weights sum to zero")
    scale = torch.clamp(norm_bound / cohort.squared_norms().sqrt().clamp_min(1e-12), max=1.0)
    return cohort.map(lambda x: (x * (scale * w)[:, None]).sum(dim=0) / w.sum())


@AGGREGATORS.register("geometric_median", options=WeiszfeldOptions)
def geometric_median(
    updates: Iterable[tuple[Params, float]], *, gm_iters: int = 10, gm_eps: float = 1e-6
) -> Params:
    """Weighted geometric median, smoothed Weiszfeld (RFA); uses the example weights."""
    cohort = Cohort(updates)
    w = cohort.weights
    if w.sum() <= 0:
        raise EmptyCohortError("the aggregation weights sum to zero")
    alpha = w / w.sum()
    mix = lambda a: lambda x: (a[:, None] * x).sum(dim=0) / a.sum()  # noqa: E731
    z = {k: mix(alpha)(b) for k, b, _, _ in cohort.blocks()}  # float64, flat
    for _ in range(gm_iters):
        beta = alpha / torch.clamp(cohort.squared_norms(z).sqrt(), min=gm_eps)
        z_new = {k: mix(beta)(b) for k, b, _, _ in cohort.blocks()}
        moved = math.sqrt(sum(float((z_new[k] - z[k]).pow(2).sum()) for k in z))
        size = math.sqrt(sum(float(v.pow(2).sum()) for v in z.values()))
        z = z_new
        if moved <= gm_eps * max(1.0, size):
            break
    return {k: z[k].reshape(shape).to(dtype) for k, (shape, dtype) in cohort.meta.items()}


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
