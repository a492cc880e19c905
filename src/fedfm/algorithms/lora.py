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

from fedfm.registry import Registry
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


def aggregate_lora(
    updates: Iterable[tuple[Params, float]], global_params: Params, mode: str, rank: int
) -> Params:
    """Aggregate delta over (possibly rank-truncated) client deltas, LoRA pairs by ``mode``.

    Client factors are rebuilt as (global truncated to the client's rank) + delta and zero-padded to
    the global rank. ``naive``: weighted mean of the padded factors. ``exact``: weighted mean of the
    products, re-factorised to ``rank`` by SVD. Other tensors: weighted mean of deltas. Returns
    new − global, so the server optimizer steps with it like any aggregate (FedAvg lands exactly).
    ``stack``: instead of factors, ``PREFIX#product`` holds the weighted mean product Σ w_k B_k A_k
    / Σ w_k at full (stacked) rank, for the caller to merge into the base weights (FLoRA).
    """
    pairs = lora_pairs(global_params)
    paired = {k for ab in pairs.values() for k in ab}
    sums: dict[str, torch.Tensor] = {}
    a_norms: dict[str, float] = {}
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
            if mode in ("exact", "stack"):
                # LoRA on a convolution: A [r, in, k, k] and B [out, r, 1, 1] multiply as matrices
                prod = factors[b_key].double().flatten(1) @ factors[a_key].double().flatten(1)
                sums[prefix] = sums.get(prefix, 0) + w * prod
                rms_row = float(factors[a_key][:r].norm()) / math.sqrt(r)
                a_norms[prefix] = a_norms.get(prefix, 0.0) + w * rms_row
            else:
                for key in (a_key, b_key):
                    sums[key] = sums.get(key, 0) + w * factors[key].double()
    if total <= 0:
        from fedfm.algorithms.aggregators import EmptyCohortError

        raise EmptyCohortError("no updates to aggregate")
    out: Params = {}
    for k, g in global_params.items():
        if k not in paired:
            out[k] = (sums[k] / total).to(g.dtype)
    for prefix, (a_key, b_key) in pairs.items():
        if mode == "stack":
            out[f"{prefix}{PRODUCT}"] = (sums[prefix] / total).to(global_params[a_key].dtype)
            continue
        if mode == "exact":
            b, a = svd_factors(sums[prefix] / total, rank, a_norms[prefix] / total)
            a, b = a.reshape(global_params[a_key].shape), b.reshape(global_params[b_key].shape)
        else:
            a, b = sums[a_key] / total, sums[b_key] / total
        out[a_key] = a.to(global_params[a_key].dtype) - global_params[a_key]
        out[b_key] = b.to(global_params[b_key].dtype) - global_params[b_key]
    return out


@dataclass(frozen=True)
class LoraMode:
    """A LoRA aggregation mode: whether it aggregates LoRA-aware (products or padded factors;
    always so with rank tiers) and whether the round merges its products into the base weights."""

    lora_aware: bool
    merges_into_base: bool = False


LORA_AGGREGATION: Registry[LoraMode] = Registry("LoRA aggregation mode")
LORA_AGGREGATION.register("naive")(LoraMode(lora_aware=False))
LORA_AGGREGATION.register("exact")(LoraMode(lora_aware=True))
LORA_AGGREGATION.register("stack")(LoraMode(lora_aware=True, merges_into_base=True))


def aggregation_rule(strategy, rank_tiers, rank: int, aggregator):
    """(updates, θ) → aggregate delta: LoRA-aware when the mode (or rank tiers) asks for it, else
    the configured aggregator over (delta, weight) pairs."""
    name = strategy.lora_aggregation
    if LORA_AGGREGATION.get(name).lora_aware or rank_tiers:
        return functools.partial(_lora_rule, name, rank)
    return functools.partial(_plain_rule, aggregator)


def _lora_rule(mode: str, rank: int, updates, params):
    return aggregate_lora(updates, params, mode, rank)


def _plain_rule(aggregator, updates, params):
    return aggregator(updates)


def check_lora(cfg) -> None:
    """What the LoRA aggregation modes and rank tiers compose with (config validation calls this)."""
    s, mode = cfg.strategy, LORA_AGGREGATION.get(cfg.strategy.lora_aggregation)
    modes = "strategy.lora_aggregation = 'exact'/'stack' and peft.rank_tiers"
    if (mode.lora_aware or cfg.peft.rank_tiers) and cfg.peft.method != "lora":
        raise ValueError(f"{modes} need peft.method = 'lora'")
    if (mode.lora_aware or cfg.peft.rank_tiers) and s.aggregator != "mean":
        raise ValueError(
            f"{modes} aggregate with the weighted mean; "
            f"strategy.aggregator = {s.aggregator!r} is not supported with them"
        )
    if mode.merges_into_base and (s.server_optimizer, s.server_lr, s.server_momentum) != ("sgd", 1, 0):
        raise ValueError(
            f"strategy.lora_aggregation = {s.lora_aggregation!r} merges the average into the base "
            "weights (FedAvg): "
            "it needs server_optimizer = 'sgd', server_lr = 1.0, server_momentum = 0"
        )
