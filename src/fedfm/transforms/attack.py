"""Simulated update attacks as a transform (``attack.kind``, position 30): the attackers are drawn
in ``prepare`` (data attacks read the plan during local training, through the task); the server
half rewrites the attackers' updates after decoding and before DP and validation."""

from __future__ import annotations

from fedfm.attacks import ATTACKS, attack_results, plan_round
from fedfm.transforms.base import Passthrough, transform


class UpdateAttack(Passthrough):
    """The simulation transform: this round's attackers are drawn in ``prepare`` (data attacks
    read the plan during training); the server half rewrites the attackers' updates."""

    name = "attack"

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def prepare(self, rnd) -> dict:
        rnd.attack = plan_round(self.cfg, rnd.cohort, rnd.seed, rnd.t)
        return {"attack": rnd.attack}

    def server(self, stream, rnd, reduce):
        return attack_results(stream, rnd.attack, len(rnd.cohort), rnd.seed, rnd.t), reduce


@transform("attack", 30)
def update_attack(cfg) -> UpdateAttack | None:
    return UpdateAttack(cfg.attack) if ATTACKS.get(cfg.attack.kind).acts else None
