"""Simulated adversaries: a seeded fraction of each cohort is malicious and corrupts its update.

For measuring how an aggregation rule holds up before deployment. Kinds (``attack.kind``):

- ``label_flip``: the client trains on labels y → K − 1 − y (data poisoning).
- ``backdoor``: the client trains with ``poison_fraction`` of its batches' rows carrying the
  ``trigger`` phrase and the ``target_label``; the server reports the attack success rate on
  triggered test examples whose true label is another (Bagdasaryan et al., 2020).
- ``sign_flip``: sends −Δ · ``scale``.
- ``scale``: sends Δ · ``scale`` (model replacement, Bagdasaryan et al., 2020).
- ``gaussian``: sends N(0, ``noise_std``²) noise of Δ's shape.
- ``alie``: "a little is enough" (Baruch et al., 2019): every attacker sends μ − z·σ, with μ, σ
  the coordinate-wise mean and standard deviation of the attackers' own honest updates and
  z = Φ⁻¹((n − s)/n), s = ⌊n/2 + 1⌋ − f, for cohort size n and f attackers.
- ``nan``, ``inf``, ``wrong_shape``: malformed updates (validation must reject them).

Data attacks act inside local training (``RoundContext.attack``); update attacks rewrite what
the server decoded from the attackers, before validation, so engines stay attack-agnostic.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from statistics import NormalDist

import torch

from fedfm.seeding import numpy_rng, torch_generator
from fedfm.tasks.classification import Encoded
from fedfm.types import ClientResult, Params, Update

DATA_ATTACKS = {"label_flip", "backdoor"}


@dataclass(frozen=True)
class AttackPlan:
    """Which clients of this round are malicious, and how they attack."""

    kind: str
    malicious: frozenset[int]
    scale: float = 10.0
    noise_std: float = 1.0
    target_label: int = 0
    poison_fraction: float = 0.5

    def poisons_data(self, client_id: int) -> bool:
        return self.kind in DATA_ATTACKS and client_id in self.malicious


def plan_round(cfg, cohort: list[int], seed: int, round_: int) -> AttackPlan | None:
    """Draw this round's attackers: ⌈fraction · |cohort|⌉ clients of the cohort, seeded."""
    if cfg.kind == "none" or cfg.fraction == 0:
        return None
    count = min(len(cohort), math.ceil(cfg.fraction * len(cohort) - 1e-9))
    rng = numpy_rng(seed, round_, "attackers")
    chosen = frozenset(int(c) for c in rng.choice(cohort, size=count, replace=False))
    return AttackPlan(cfg.kind, chosen, cfg.scale, cfg.noise_std, cfg.target_label, cfg.poison_fraction)


def alie_z(n: int, f: int) -> float:
    """Baruch et al. (2019): z such that the crafted value still sits among the benign majority."""
    s = math.floor(n / 2 + 1) - f
    return NormalDist().inv_cdf(min(max((n - s) / n, 1e-6), 1 - 1e-6))


def corrupt_update(plan: AttackPlan, update: Update, seed: int, round_: int, client_id: int) -> Update:
    """The update a malicious client sends instead of its honest one (all kinds but alie)."""
    d = update.delta
    if plan.kind == "sign_flip":
        delta = {k: -plan.scale * v for k, v in d.items()}
    elif plan.kind == "scale":
        delta = {k: plan.scale * v for k, v in d.items()}
    elif plan.kind == "gaussian":
        g = torch_generator(seed, round_, client_id, "attack-noise")
        delta = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) * plan.noise_std for k, v in d.items()}
    elif plan.kind in ("nan", "inf"):
        bad = float("nan") if plan.kind == "nan" else float("inf")
        first = sorted(d)[0]
        delta = {**d, first: torch.full_like(d[first], bad)}
    elif plan.kind == "wrong_shape":
        first = sorted(d)[0]
        delta = {**d, first: torch.zeros(d[first].numel() + 1)}
    else:
        return update
    return replace(update, delta=delta)


def attack_results(
    results: Iterator[ClientResult], plan: AttackPlan | None, cohort_size: int, seed: int, round_: int
) -> Iterator[ClientResult]:
    """Pass benign results through; rewrite the attackers' updates (alie: after seeing them all)."""
    if plan is None or plan.kind in DATA_ATTACKS:
        yield from results
        return
    held: list[ClientResult] = []
    for r in results:
        if r.client_id not in plan.malicious or r.update is None:
            yield r
        elif plan.kind == "alie":
            held.append(r)
        else:
            yield replace(r, update=corrupt_update(plan, r.update, seed, round_, r.client_id))
    if held:
        crafted = alie_delta([r.update.delta for r in held], cohort_size, len(plan.malicious))
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


def poison_batch(plan: AttackPlan, task, rows: torch.Tensor, generator: torch.Generator, device) -> dict:
    """A malicious client's training batch: flipped labels, or triggered rows with the target label."""
    train = task.train
    ids, mask, labels = (
        train.input_ids[rows].clone(),
        train.attention_mask[rows].clone(),
        train.labels[rows].clone(),
    )
    if plan.kind == "label_flip":
        labels = task.num_labels - 1 - labels
    else:  # backdoor
        count = max(1, round(plan.poison_fraction * len(rows)))
        chosen = torch.randperm(len(rows), generator=generator)[:count]
        triggered = task.triggered_train
        ids[chosen] = triggered.input_ids[rows[chosen]]
        mask[chosen] = triggered.attention_mask[rows[chosen]]
        labels[chosen] = plan.target_label
    return task.batch(Encoded(ids, mask, labels), torch.arange(len(rows)), device)
