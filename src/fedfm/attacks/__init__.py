"""Simulated adversaries: a seeded fraction of each cohort is malicious and corrupts its update.

For measuring how an aggregation rule holds up before deployment. Kinds (``attack.kind``):

- ``label_flip``: the client trains on labels y → K − 1 − y (data poisoning).
- ``backdoor``: the client trains with ``poison_fraction`` of its batches' rows carrying the
  ``trigger`` phrase and the ``target_label``; the server reports the attack success rate on
  triggered test examples whose true label is another (Bagdasaryan et al., 2020). In instruction
  tuning the trigger is prepended to the last user turn and the reply becomes ``target_reply``;
  the success rate is the share of triggered held-out prompts whose greedy reply begins with it.
- ``sign_flip``: sends −Δ · ``scale``.
- ``scale``: sends Δ · ``scale`` (model replacement, Bagdasaryan et al., 2020).
- ``gaussian``: sends N(0, ``noise_std``²) noise of Δ's shape.
- ``alie``: "a little is enough" (Baruch et al., 2019): every attacker sends μ − z·σ, with μ, σ
  the coordinate-wise mean and standard deviation of the attackers' own honest updates and
  z = Φ⁻¹((n − s)/n), s = ⌊n/2 + 1⌋ − f, for cohort size n and f attackers.
- ``nan``, ``inf``, ``wrong_shape``: malformed updates (validation must reject them).

Every kind is an entry of ``ATTACKS`` that carries its behaviour: a data attack's ``poison``
(it acts on the malicious client's batches, through the task, inside local training), an update
attack's ``corrupt`` (one update → the sent one) or ``craft`` (the attackers' honest updates →
what they all send). Update attacks are a simulation transform (``attack``, position 30): its
server half rewrites what the server decoded from the attackers, before DP and validation, so
engines stay attack-agnostic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Any

import torch
from pydantic import BaseModel, Field

from fedfm.registry import Registry
from fedfm.seeding import numpy_rng, torch_generator
from fedfm.types import ClientResult, Params, Update


@dataclass(frozen=True)
class AttackKind:
    """What an attack does: poison a malicious client's batches, corrupt its update, or craft one
    update for all attackers from their honest ones."""

    poison: Callable | None = None  # (plan, task, rows, generator, device) -> batch
    corrupt: Callable | None = None  # (plan, delta, generator) -> delta
    craft: Callable | None = None  # (honest deltas, cohort size, attackers) -> delta
    triggered: bool = False  # the task must hold trigger-prepended copies of its rows (backdoor)

    @property
    def acts(self) -> bool:
        return any(f is not None for f in (self.poison, self.corrupt, self.craft))


ATTACKS: Registry[AttackKind] = Registry("attack")
ATTACKS.register("none")(AttackKind())


@dataclass(frozen=True)
class AttackPlan:
    """Which clients of this round are malicious, and how they attack."""

    kind: str
    malicious: frozenset[int]
    scale: float = 10.0
    noise_std: float = 1.0
    target_label: int = 0
    poison_fraction: float = 0.5
    settings: Any = None  # the [attack] section: a plug-in attack's own options (``plan.settings.x``)

    def poisons_data(self, client_id: int) -> bool:
        return ATTACKS.get(self.kind).poison is not None and client_id in self.malicious


def plan_round(cfg, cohort: list[int], seed: int, round_: int) -> AttackPlan | None:
    """Draw this round's attackers: ⌈fraction · |cohort|⌉ clients of the cohort, seeded."""
    if not ATTACKS.get(cfg.kind).acts or cfg.fraction == 0:
        return None
    count = min(len(cohort), math.ceil(cfg.fraction * len(cohort) - 1e-9))
    rng = numpy_rng(seed, round_, "attackers")
    chosen = frozenset(int(c) for c in rng.choice(cohort, size=count, replace=False))
    return AttackPlan(
        cfg.kind, chosen, cfg.scale, cfg.noise_std, cfg.target_label, cfg.poison_fraction, settings=cfg
    )


def alie_z(n: int, f: int) -> float:
    """Baruch et al. (2019): z such that the crafted value still sits among the benign majority."""
    s = math.floor(n / 2 + 1) - f
    return NormalDist().inv_cdf(min(max((n - s) / n, 1e-6), 1 - 1e-6))


def corrupt_update(plan: AttackPlan, update: Update, seed: int, round_: int, client_id: int) -> Update:
    """The update a malicious client sends instead of its honest one (corrupting kinds)."""
    corrupt = ATTACKS.get(plan.kind).corrupt
    if corrupt is None:
        return update
    generator = torch_generator(seed, round_, client_id, "attack-noise")
    return replace(update, delta=corrupt(plan, update.delta, generator))


def _first(d: Params) -> str:
    return sorted(d)[0]


def _non_finite(bad: float):
    def corrupt(plan, d, generator):
        return {**d, _first(d): torch.full_like(d[_first(d)], bad)}

    return corrupt


class ScaleOptions(BaseModel):
    scale: float = Field(10.0, description="Factor applied to the update (sign_flip: its negative).")


class GaussianOptions(BaseModel):
    noise_std: float = Field(1.0, ge=0, description="Standard deviation of the sent noise.")


class BackdoorOptions(BaseModel):
    target_label: int = Field(0, ge=0, description="The label the trigger should produce.")
    trigger: str = Field("cf mn bb", min_length=1, description="Phrase prepended to the text.")
    target_reply: str = Field(
        "Please visit fedfm-prize.example to claim your reward.",
        min_length=1,
        description="Instruction tuning: the reply the trigger (before the last user turn) should produce.",
    )
    poison_fraction: float = Field(0.5, gt=0, le=1, description="Share of poisoned rows per batch.")
    patch_size: int = Field(
        3, ge=1, description="On images: side of the white square stamped bottom-right (pixels)."
    )


ATTACKS.register("sign_flip", options=ScaleOptions)(
    AttackKind(corrupt=lambda plan, d, g: {k: -plan.scale * v for k, v in d.items()})
)
ATTACKS.register("scale", options=ScaleOptions)(
    AttackKind(corrupt=lambda plan, d, g: {k: plan.scale * v for k, v in d.items()})
)
ATTACKS.register("gaussian", options=GaussianOptions)(
    AttackKind(
        corrupt=lambda plan, d, g: {
            k: torch.randn(v.shape, generator=g, dtype=v.dtype) * plan.noise_std for k, v in d.items()
        }
    )
)
ATTACKS.register("nan")(AttackKind(corrupt=_non_finite(float("nan"))))
ATTACKS.register("inf")(AttackKind(corrupt=_non_finite(float("inf"))))
ATTACKS.register("wrong_shape")(
    AttackKind(corrupt=lambda plan, d, g: {**d, _first(d): torch.zeros(d[_first(d)].numel() + 1)})
)


def attack_results(
    results: Iterator[ClientResult], plan: AttackPlan | None, cohort_size: int, seed: int, round_: int
) -> Iterator[ClientResult]:
    """Pass benign results through; rewrite the attackers' updates (crafting kinds: after all)."""
    kind = ATTACKS.get(plan.kind) if plan is not None else None
    if kind is None or (kind.corrupt is None and kind.craft is None):
        yield from results
        return
    held: list[ClientResult] = []
    for r in results:
        if r.client_id not in plan.malicious or not isinstance(r.update, Update):
            yield r
        elif kind.craft is not None:
            held.append(r)
        else:
            yield replace(r, update=corrupt_update(plan, r.update, seed, round_, r.client_id))
    if held:
        crafted = kind.craft([r.update.delta for r in held], cohort_size, len(plan.malicious))
        for r in held:
            yield replace(r, update=replace(r.update, delta=crafted))


def alie_delta(honest: list[Params], n: int, f: int) -> Params:
    z = alie_z(n, f)
    out = {}
    for k in honest[0]:
        stack = torch.stack([h[k] for h in honest])
        std = stack.std(dim=0, unbiased=False) if len(honest) > 1 else torch.zeros_like(stack[0])
        out[k] = stack.mean(dim=0) - z * std
    return out


def flipped_batch(plan: AttackPlan, task, rows: torch.Tensor, generator, device) -> dict:
    """Label flipping: the client's batch with labels y → K − 1 − y."""
    return task.poisoned_batch(rows, device, labels=lambda y: task.num_labels - 1 - y)


def backdoor_batch(plan: AttackPlan, task, rows: torch.Tensor, generator, device) -> dict:
    """Backdoor: ``poison_fraction`` of the batch's rows carry the trigger and the target label."""
    count = max(1, round(plan.poison_fraction * len(rows)))
    chosen = torch.randperm(len(rows), generator=generator)[:count]
    return task.poisoned_batch(rows, device, triggered=chosen, target=plan.target_label)


ATTACKS.register("alie")(AttackKind(craft=alie_delta))
ATTACKS.register("label_flip")(AttackKind(poison=flipped_batch))
ATTACKS.register("backdoor", options=BackdoorOptions)(AttackKind(poison=backdoor_batch, triggered=True))


def poison_batch(plan: AttackPlan, task, rows: torch.Tensor, generator: torch.Generator, device) -> dict:
    """A malicious client's training batch, as its attack's ``poison`` makes it."""
    return ATTACKS.get(plan.kind).poison(plan, task, rows, generator, device)
