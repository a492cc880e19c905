"""Client-level DP as a transform (``privacy.dp = "client"``), and the clear-statement check of
example-level DP (``privacy.dp = "example"``, DP-SGD, whose noise is a step variant of training).

Client half: under secure aggregation, clients clip (the server only sees sums); the clipped bit
is left in the step's notes for the masking half to encode. Server half: the reduce becomes DP's
noised fixed-denominator mean — over server-clipped dense updates (central noise, no secure
aggregation), or over the unmasked sums of a secure round. With DP-SGD the server half checks
that the mechanism each client states it ran is the configured one, and charges it.
"""

from __future__ import annotations

from dataclasses import replace

from fedfm.algorithms.aggregators import EmptyCohortError, is_linear
from fedfm.privacy import dp
from fedfm.transforms.base import Passthrough, transform
from fedfm.types import Aggregate, ClientResult, Summed, Update


class ClientDp(Passthrough):
    name = "dp"

    def prepare(self, rnd) -> dict:
        return {"dp": rnd.privacy.client_settings(rnd.privacy_state), "noise": rnd.privacy.noise}

    def client(self, payload, step):
        if not isinstance(step.ctx.dp, dp.DpRound):  # central noise without secure aggregation
            return payload
        layout = step.ctx.secure.layout if step.ctx.secure is not None else None
        slack = layout.rounding_slack if layout is not None and layout.skellam is None else 0.0
        delta, step.notes["clipped_bit"] = dp.client_half(payload.delta, step.ctx.dp, slack)
        return replace(payload, delta=delta)

    def server(self, stream, rnd, reduce):
        if rnd.privacy.plan is None:  # example-level: the clear statements are checked and charged
            return _stated(stream, rnd), reduce
        return stream, lambda items: _dp_mean(items, rnd)


def _stated(stream, rnd):
    for item in stream:
        if isinstance(item, ClientResult) and isinstance(item.update, Update):
            problem = rnd.vet_and_charge(item.client_id, item.update.metrics, item.update.num_examples)
            if problem is not None:
                rnd.tally.reject(item.client_id, problem)
                continue
        yield item


def _dp_mean(items, rnd) -> Aggregate:
    """The noised mean: of the unmasked sums, or of the dense updates the server clips itself."""
    first = next(items, None)
    if isinstance(first, Summed):
        sums, skellam = first.sums, rnd.secure.layout.skellam
        count = sums.scalars["unclipped"]
        delta, new = rnd.privacy.aggregate_sums(
            rnd.privacy_state, rnd.t, sums.delta, count, first.contributors, skellam
        )
        return Aggregate(delta, new)

    def deltas():
        if first is not None:
            yield first.update.delta
        for item in items:
            yield item.update.delta

    delta, new = rnd.privacy.aggregate_updates(rnd.privacy_state, rnd.t, deltas())
    if delta is None:
        raise EmptyCohortError("no updates to aggregate")
    return Aggregate(delta, new)


def _build(cfg) -> ClientDp | None:
    from fedfm.privacy.guarantees import dp_mode

    return ClientDp() if dp_mode(cfg).active else None


def _check(cfg) -> None:
    """What DP composes with, and why the rest does not."""
    from fedfm.algorithms.objectives import make_objective
    from fedfm.privacy.guarantees import dp_mode, require_privacy_extra

    p, s, mode = cfg.privacy, cfg.strategy, dp_mode(cfg)
    if mode.active:
        require_privacy_extra("privacy.dp")
    if mode.active and p.noise_multiplier is None and p.target_epsilon is None:
        raise ValueError(f"privacy.dp = {p.dp!r} needs privacy.noise_multiplier or privacy.target_epsilon")
    if p.accountant == "pld" and cfg.sampling.method != "poisson":
        raise ValueError("privacy.accountant = 'pld' needs sampling.method = 'poisson' (use 'rdp' for fixed)")
    if mode.client_level:
        if s.weighting != "uniform":
            raise ValueError(
                "privacy.dp = 'client' bounds each client's influence by C, which example-count weights "
                "would break: set strategy.weighting = 'uniform'"
            )
        if not is_linear(s):
            raise ValueError(
                f"privacy.dp = 'client' is analysed for the noised mean; strategy.aggregator = "
                f"{s.aggregator!r} has no such guarantee"
            )
        if make_objective(s).uses_control_variates:
            raise ValueError(f"privacy.dp = 'client' does not protect {s.objective}'s control variates")
        if p.noise == "distributed" and not cfg.secagg.enabled:
            raise ValueError(
                "privacy.noise = 'distributed' needs secagg.enabled = true: one client's noise share "
                "alone protects little once the server sees it"
            )
    elif mode.example_level and (not make_objective(s).per_example or cfg.peft.rank_tiers):
        raise ValueError(
            "privacy.dp = 'example' (DP-SGD) needs strategy.objective = 'plain' and no peft.rank_tiers: "
            "proximal terms and control variates are not per-example gradients"
        )
    if mode.example_level and cfg.training.optimizer == "adamw8bit":
        raise ValueError("privacy.dp = 'example' (DP-SGD) with training.optimizer = 'adamw8bit' is not built")
    if mode.example_level and cfg.peft.dora:
        raise ValueError(
            "privacy.dp = 'example' (DP-SGD) with peft.dora: Opacus computes per-example gradients of "
            "standard layers, and DoRA's column-normalised layer is not one; use LoRA or client-level DP"
        )
    if p.noise == "distributed" and p.accountant == "pld":
        raise ValueError("privacy.accountant = 'pld' applies to central noise; distributed noise uses RDP")
    if not mode.active and p.noise_seed is not None:
        raise ValueError("privacy.noise_seed applies to runs with privacy.dp")
    if not mode.client_level and (p.noise == "distributed" or p.adaptive_clipping):
        raise ValueError("privacy.noise and privacy.adaptive_clipping apply to privacy.dp = 'client'")
    if mode.client_level and lora_aware(cfg):
        raise ValueError("privacy.dp = 'client' needs strategy.lora_aggregation = 'naive' and no rank tiers")


def lora_aware(cfg) -> bool:
    from fedfm.algorithms.lora import LORA_AGGREGATION

    return LORA_AGGREGATION.get(cfg.strategy.lora_aggregation).lora_aware or bool(cfg.peft.rank_tiers)


transform("dp", 20, check=_check)(_build)
