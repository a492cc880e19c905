"""Aggregators: pure functions from a stream of (delta, weight) pairs to one aggregate delta.

``mean`` is FedAvg's weighted mean (McMahan et al., 2017, "Communication-Efficient Learning of
Deep Networks from Decentralized Data"). It keeps a running weighted sum and never holds every
client's update, so server memory does not grow with the cohort.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch

from fedfm.registry import Registry, bind_options
from fedfm.types import Params

Aggregator = Callable[[Iterable[tuple[Params, float]]], Params]
AGGREGATORS: Registry[Aggregator] = Registry("aggregator")


class EmptyCohortError(ValueError):
    """Raised when there is nothing to aggregate."""


def _accumulate(updates: Iterable[tuple[Params, float]]) -> tuple[Params, dict, float]:
    """Σ_k w_k Δ_k in float64, each tensor's dtype, and Σ_k w_k; streamed."""
    total: dict[str, torch.Tensor] | None = None
    dtypes: dict[str, torch.dtype] = {}
    weight_sum = 0.0
    for delta, weight in updates:
        if weight < 0:
            raise ValueError(f"aggregation weight must be non-negative, got {weight}")
        if total is None:
            total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in delta.items()}
            dtypes = {k: v.dtype for k, v in delta.items()}
        for k, v in delta.items():
            total[k].add_(v.to(torch.float64), alpha=float(weight))
        weight_sum += float(weight)
    if total is None:
        raise EmptyCohortError("no updates to aggregate")
    return total, dtypes, weight_sum


def weighted_sum(updates: Iterable[tuple[Params, float]]) -> Params:
    """Σ_k w_k Δ_k (DP-FedAvg divides by a fixed m itself)."""
    total, dtypes, _ = _accumulate(updates)
    return {k: v.to(dtypes[k]) for k, v in total.items()}


@AGGREGATORS.register("mean")
def weighted_mean(updates: Iterable[tuple[Params, float]]) -> Params:
    """Σ_k w_k Δ_k / Σ_k w_k, accumulated in float64 for stability, returned in each tensor's dtype."""
    total, dtypes, weight_sum = _accumulate(updates)
    if weight_sum <= 0:
        raise EmptyCohortError("the aggregation weights sum to zero")
    # each float64 sum is freed as its result is made: the peak is the sums, not sums + result
    return {k: (total.pop(k) / weight_sum).to(dtypes[k]) for k in list(total)}


# capabilities other parts ask: ``linear``, the aggregate is Σ w·Δ / Σ w and can be computed from
# sums (secure aggregation, client-level DP, LoRA-aware modes); ``bounds_influence``, one client
# cannot move the aggregate arbitrarily far (robust and bounding rules declare it; a rule that
# does not is treated as unbounded)
weighted_mean.linear = True


def is_linear(strategy) -> bool:
    """Whether the configured aggregator is the weighted mean of the updates (computable from sums)."""
    return bool(getattr(AGGREGATORS.get(strategy.aggregator), "linear", False))


def bounds_influence(strategy) -> bool:
    """Whether the configured aggregator bounds one client's influence on the aggregate."""
    return bool(getattr(AGGREGATORS.get(strategy.aggregator), "bounds_influence", False))


def aggregator_options(strategy) -> dict:
    """The configured aggregator's keyword parameters (``trim_ratio``, ``byzantine``, a plug-in's
    own options, ...) bound from the ``[strategy]`` section by name."""
    return bind_options(AGGREGATORS.get(strategy.aggregator), strategy)


def make_aggregator(strategy) -> Aggregator:
    """The configured aggregator with its keyword parameters bound (``aggregator_options``)."""
    return functools.partial(AGGREGATORS.get(strategy.aggregator), **aggregator_options(strategy))
