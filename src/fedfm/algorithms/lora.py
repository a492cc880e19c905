"""LoRA-aware aggregation: average the updates' products, not the factors; heterogeneous ranks.

LoRA adapts a weight by ΔW = s·B·A (s = alpha / r). Averaging A and B separately ("naive", what
FedIT-style systems do) gives mean(B)·mean(A), which is not the average of the clients' updates
mean(B·A). ``exact`` aggregates the products (FLoRA, Wang et al., 2024, "stacking": the product
of the stacked factors [w₁B₁ … w_K B_K]·[A₁; …; A_K] is exactly Σ w_k B_k A_k), then returns to
rank r with a truncated SVD M ≈ U_r S_r V_rᵀ (FlexLoRA, Bai et al., 2024). The discarded part has
Frobenius norm² equal to the sum of the discarded σ². The split between the factors is a free
choice (B·A is unchanged by B→B/c, A→c·A); fedfm keeps A at the clients' average norm,
A = c·V_rᵀ and B = U_r S_r / c, so a small aggregate does not shrink both factors and stall
training. ``stack`` keeps the stacked rank instead: as in FLoRA, the averaged product is merged
into the frozen base weights and every client starts the next round from a fresh LoRA, so no
information is truncated (the base weights become part of the global state).

Heterogeneous ranks (``peft.rank_tiers``): one model with r_max = max tier; a client of rank
r_k trains only the first r_k components (A[:r_k], B[:, :r_k]); with the model's scaling
alpha / r_max this is a rank-r_k LoRA with alpha_k = alpha·r_k / r_max. It uploads only those
components. ``naive`` then zero-pads the client factors to r_max and averages them (HetLoRA,
Cho et al., 2024); ``exact`` aggregates products and redistributes by SVD, so each client
receives the best rank-r_k approximation of the global update (its first r_k components).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from fedfm.registry import Registry, bind_options
from fedfm.types import Params

A_TAG, B_TAG = "lora_A", "lora_B"
PRODUCT = "#product"


def lora_pairs(keys: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Module prefix → (A key, B key) for every LoRA pair among ``keys``."""
    keys = set(keys)
    pairs = {}
    for k in keys:
        if f".{A_TAG}." in k:
            b = k.replace(f".{A_TAG}.", f".{B_TAG}.")
            if b in keys:
                pairs[k.split(f".{A_TAG}.")[0]] = (k, b)
    return dict(sorted(pairs.items()))


def stack_factors(factors: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float]):
    """FLoRA stacking: (B_stack, A_stack) with B_stack·A_stack = Σ w_k B_k A_k exactly."""
    b = torch.cat([w * bk for (bk, _), w in zip(factors, weights, strict=True)], dim=1)
    a = torch.cat([ak for _, ak in factors], dim=0)
    return b, a


def svd_factors(
    m: torch.Tensor, rank: int, row_norm: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors (B, A) of the truncated SVD of ``m``, B·A = U_r S_r V_rᵀ.

    A's rows get L2 norm ``row_norm`` (default 1): A = c·V_rᵀ, B = U_r·S_r / c.
    """
    u, s, vh = torch.linalg.svd(m.to(torch.float64), full_matrices=False)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    c = row_norm if row_norm else 1.0
    b, a = u * (s / c), vh * c
    pad = rank - s.numel()  # m has fewer than `rank` dimensions
    if pad > 0:
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])], dim=0)
    return b.to(m.dtype), a.to(m.dtype)


def truncation_error(m: torch.Tensor, rank: int) -> float:
    """‖m − best rank-r approximation‖_F² = Σ of the discarded squared singular values."""
    s = torch.linalg.svdvals(m.to(torch.float64))
    return float((s[rank:] ** 2).sum())


def truncate_rank(params: Mapping[str, torch.Tensor], rank: int) -> Params:
    """The first ``rank`` LoRA components of every pair (other tensors unchanged)."""
    out = dict(params)
    for a_key, b_key in lora_pairs(params).values():
        out[a_key] = params[a_key][:rank]
        out[b_key] = params[b_key][:, :rank]
    return out


def pad_rank(params: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]) -> Params:
    """Zero-pad every LoRA pair back to the shapes of ``like`` (the inverse of ``truncate_rank``)."""
    out = dict(params)
    for a_key, b_key in lora_pairs(like).values():
        a, b = params[a_key], params[b_key]
        full_a, full_b = torch.zeros_like(like[a_key]), torch.zeros_like(like[b_key])
        full_a[: a.shape[0]] = a
        full_b[:, : b.shape[1]] = b
        out[a_key], out[b_key] = full_a, full_b
    return out


def rank_of(update: Mapping[str, torch.Tensor]) -> int | None:
    pairs = lora_pairs(update)
    if not pairs:
        return None
    a_key, _ = next(iter(pairs.values()))
    return int(update[a_key].shape[0])


class FactorMean:
    """``naive``: the weighted mean of each factor (zero-padded to the global rank)."""

    products = False

    def __init__(self) -> None:
        self.a: torch.Tensor | float = 0.0
        self.b: torch.Tensor | float = 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor, weight: float, rank: int) -> None:
        self.a = self.a + weight * a.double()
        self.b = self.b + weight * b.double()

    def result(self, total: float, rank: int, prefix: str, a_key: str, b_key: str, like: Params) -> Params:
        return _factors_delta(self.a / total, self.b / total, a_key, b_key, like)


class ProductMean:
    """The weighted mean of the products B·A (a LoRA on a convolution, A [r, in, k, k] and
    B [out, r, 1, 1], multiplies as matrices), and the clients' mean row norm of A."""

    products = True

    def __init__(self) -> None:
        self.product: torch.Tensor | float = 0.0
        self.a_norm = 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor, weight: float, rank: int) -> None:
        self.product = self.product + weight * (b.double().flatten(1) @ a.double().flatten(1))
        self.a_norm += weight * float(a[:rank].norm()) / math.sqrt(rank)


class ProductSvd(ProductMean):
    """``exact``: the mean product, re-factorised to the global rank by a truncated SVD."""

    def result(self, total: float, rank: int, prefix: str, a_key: str, b_key: str, like: Params) -> Params:
        b, a = svd_factors(self.product / total, rank, self.a_norm / total)
        a, b = a.reshape(like[a_key].shape), b.reshape(like[b_key].shape)
        return _factors_delta(a, b, a_key, b_key, like)


class ProductStack(ProductMean):
    """``stack``: the mean product at full (stacked) rank under ``PREFIX#product``, for the
    caller to merge into the base weights (FLoRA)."""

    def result(self, total: float, rank: int, prefix: str, a_key: str, b_key: str, like: Params) -> Params:
        return {f"{prefix}{PRODUCT}": (self.product / total).to(like[a_key].dtype)}


def _factors_delta(a, b, a_key: str, b_key: str, like: Params) -> Params:
    return {
        a_key: a.to(like[a_key].dtype) - like[a_key],
        b_key: b.to(like[b_key].dtype) - like[b_key],
    }


@dataclass(frozen=True)
class LoraMode:
    """A LoRA aggregation mode carries its maths: ``combine`` makes the accumulator of one LoRA
    pair's client factors (``add`` per client, then ``result`` → the pair's entries of the
    aggregate delta); ``lora_aware``: used for every LoRA run (not only with rank tiers, where
    the configured aggregator would otherwise average the factors); ``merges_into_base``: the
    round folds its products into the base weights."""

    combine: type
    lora_aware: bool = True
    merges_into_base: bool = False

    def __post_init__(self) -> None:
        if not (
            callable(getattr(self.combine, "add", None)) and callable(getattr(self.combine, "result", None))
        ):
            raise TypeError("a LoRA aggregation mode's combine needs add(a, b, weight, rank) and result(...)")


LORA_AGGREGATION: Registry[LoraMode] = Registry("LoRA aggregation mode")
LORA_AGGREGATION.register("naive")(LoraMode(FactorMean, lora_aware=False))
LORA_AGGREGATION.register("exact")(LoraMode(ProductSvd))
LORA_AGGREGATION.register("stack")(LoraMode(ProductStack, merges_into_base=True))


def aggregate_lora(
    updates: Iterable[tuple[Params, float]],
    global_params: Params,
    mode: str | LoraMode,
    rank: int,
    options: dict | None = None,
) -> Params:
    """Aggregate delta over (possibly rank-truncated) client deltas, LoRA pairs by ``mode``.

    Client factors are rebuilt as (global truncated to the client's rank) + delta and zero-padded to
    the global rank; each LoRA pair is combined by the mode's accumulator (``naive``: weighted mean
    of the padded factors; ``exact``: weighted mean of the products, re-factorised to ``rank`` by
    SVD; ``stack``: ``PREFIX#product`` holds the weighted mean product Σ w_k B_k A_k / Σ w_k at full
    (stacked) rank, for the caller to merge into the base weights, FLoRA). Other tensors: weighted
    mean of deltas. ``options``: the mode's own (keyword arguments of its accumulator). Returns
    new − global, so the server optimizer steps with it like any aggregate
    (FedAvg lands exactly).
    """
    mode = LORA_AGGREGATION.get(mode) if isinstance(mode, str) else mode
    pairs = lora_pairs(global_params)
    paired = {k for ab in pairs.values() for k in ab}
    combined = {prefix: mode.combine(**(options or {})) for prefix in pairs}
    sums: dict[str, torch.Tensor] = {}
    total = 0.0
    for delta, weight in updates:
        r = rank_of(delta) or rank
        start = truncate_rank(global_params, r) if r != rank else global_params
        factors = pad_rank({k: start[k] + delta[k] for k in delta}, global_params)
        w = float(weight)
        total += w
        for k in delta:
            if k not in paired:
                sums[k] = sums.get(k, 0) + w * delta[k].double()
        for prefix, (a_key, b_key) in pairs.items():
            combined[prefix].add(factors[a_key], factors[b_key], w, r)
    if total <= 0:
        from fedfm.algorithms.aggregators import EmptyCohortError

        raise EmptyCohortError("no updates to aggregate")
    out: Params = {k: (sums[k] / total).to(g.dtype) for k, g in global_params.items() if k not in paired}
    for prefix, (a_key, b_key) in pairs.items():
        out.update(combined[prefix].result(total, rank, prefix, a_key, b_key, global_params))
    return out


def aggregation_rule(strategy, rank_tiers, rank: int, aggregator):
    """(updates, θ) → aggregate delta: LoRA-aware when the mode (or rank tiers) asks for it, else
    the configured aggregator over (delta, weight) pairs."""
    mode = LORA_AGGREGATION.get(strategy.lora_aggregation)
    if mode.lora_aware or rank_tiers:  # the accumulator's keyword-only parameters are its options
        return functools.partial(_lora_rule, mode, rank, bind_options(mode.combine, strategy))
    return functools.partial(_plain_rule, aggregator)


def _lora_rule(mode: LoraMode, rank: int, options: dict, updates, params):
    return aggregate_lora(updates, params, mode, rank, options)


def _plain_rule(aggregator, updates, params):
    return aggregator(updates)


def check_lora(cfg) -> None:
    """What the LoRA aggregation modes and rank tiers compose with (config validation calls this)."""
    from fedfm.algorithms.aggregators import is_linear
    from fedfm.algorithms.server_optimizers import make_server_optimizer

    s, mode = cfg.strategy, LORA_AGGREGATION.get(cfg.strategy.lora_aggregation)
    modes = "strategy.lora_aggregation = 'exact'/'stack' and peft.rank_tiers"
    if (mode.lora_aware or cfg.peft.rank_tiers) and cfg.peft.method != "lora":
        raise ValueError(f"{modes} need peft.method = 'lora'")
    if cfg.peft.dora and cfg.peft.method != "lora":
        raise ValueError("peft.dora is a kind of LoRA: it needs peft.method = 'lora'")
    if cfg.peft.dora and (mode.lora_aware or cfg.peft.rank_tiers):
        raise ValueError(
            f"peft.dora with strategy.lora_aggregation = {s.lora_aggregation!r} or peft.rank_tiers: those "
            "combine or pad the products B·A, while DoRA normalises W + B·A per column and rescales it by "
            "its magnitude vector, which they do not account for; use 'naive' without rank tiers"
        )
    if (mode.lora_aware or cfg.peft.rank_tiers) and not is_linear(s):
        raise ValueError(
            f"{modes} aggregate with the weighted mean; "
            f"strategy.aggregator = {s.aggregator!r} is not supported with them"
        )
    if mode.merges_into_base and not getattr(make_server_optimizer(s), "adds_aggregate", False):
        raise ValueError(
            f"strategy.lora_aggregation = {s.lora_aggregation!r} merges the average into the base "
            "weights (FedAvg): "
            "it needs server_optimizer = 'sgd', server_lr = 1.0, server_momentum = 0"
        )
