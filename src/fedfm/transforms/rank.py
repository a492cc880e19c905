"""Rank cut (heterogeneous LoRA, ``peft.rank_tiers``): a client of rank r sends only the first r
components of each LoRA pair (A[:r], B[:, :r]); the LoRA-aware aggregation pads them back."""

from __future__ import annotations

from dataclasses import replace

from fedfm.algorithms.lora import truncate_rank
from fedfm.transforms.base import Passthrough, transform


class RankCut(Passthrough):
    name = "rank"

    def client(self, payload, step):
        if step.job.rank is None:
            return payload
        return replace(payload, delta=truncate_rank(payload.delta, step.job.rank))


def _check(cfg) -> None:
    from fedfm.algorithms.objectives import make_objective
    from fedfm.attacks import ATTACKS

    if not cfg.peft.rank_tiers:
        return
    if make_objective(cfg.strategy).uses_control_variates:
        raise ValueError(
            f"strategy.objective = {cfg.strategy.objective!r} is not supported with peft.rank_tiers"
        )
    if ATTACKS.get(cfg.attack.kind).craft is not None:
        raise ValueError(
            f"attack.kind = {cfg.attack.kind!r} is not supported with peft.rank_tiers (ranks differ)"
        )


@transform("rank", 10, check=_check)
def rank_cut(cfg) -> RankCut | None:
    return RankCut() if cfg.peft.rank_tiers else None
