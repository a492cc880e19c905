"""Canary clients against client-level DP, as fedfm runs it: an empirical ε next to the reported one.

2·k canary clients each hold one update, a random direction of norm C (the clip norm, so clipping
leaves it whole). A fair coin decides, for each, whether it joins the federation. Every round,
each joined canary is sampled like any client (probability q, the run's sampling rate) and its
update goes through the server's DP aggregation exactly as a real client's does:
``dp.server_sums`` (clip, sum, clipped-bit count) and ``PrivacyPlan.server_half`` (noise of
std z_Δ·C, division by the expected cohort, the ledger charged, adaptive clipping) — the code of a
run, with the run's z, C, cohort, rounds and accountant. The adversary sees the final model delta
(the sum of the released aggregates) and scores each canary by its cosine with it. From the
scores: Steinke et al.'s one-run 95% lower bound (all canaries, their coins the truth) and Andrew
et al.'s estimate (joined canaries against those left out). ε reported is the plan's own
accountant over the same ledger.

What is left out, and why it is sound to: the real clients' updates. In d dimensions a random
unit canary's cosine with any fixed vector is about 1/√d, so real updates only add interference —
they make the attack weaker, never stronger; the audit is of the mechanism in the attacker's best
case. d is the run's trainable size capped at ``max_dim`` (isotropic noise: only its projection on
the canaries' span reaches the scores, and the cap keeps 1/√d interference under 0.5%).

``noise_factor`` scales the noise the mechanism adds while the ledger charges the configured z:
a deliberately broken mechanism (0.1 divides the noise by 10) for the test that the audit catches
one. It is a parameter of this function only, never a run setting.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedfm.audit.epsilon import andrew_estimate, one_run_lower_bound
from fedfm.privacy import dp
from fedfm.seeding import numpy_rng, torch_generator


def central_plan(cfg, num_clients: int, dim: int, epsilon: float | None = None, note=lambda _: None):
    """The run's ``PrivacyPlan`` (its cohort from its sampling); with ``epsilon``, the same run
    under central client-level DP calibrated for that ε (the audit's DP column, or a canary audit
    of a config that has no DP of its own)."""
    from fedfm.algorithms.sampling import cohort_size
    from fedfm.privacy.plan import PrivacyPlan

    if epsilon is not None:
        privacy = cfg.privacy.model_copy(
            update={"dp": "client", "target_epsilon": epsilon, "noise_multiplier": None, "noise": "central"}
        )
        cfg = cfg.model_copy(update={"privacy": privacy})
    cohort = cohort_size(num_clients, cfg.sampling.clients_per_round, cfg.sampling.fraction)
    return PrivacyPlan(cfg, num_clients, cohort, dim, note=note)


def canary_audit(
    plan,
    canaries: int = 400,
    seed: int = 0,
    max_dim: int = 65_536,
    noise_factor: float = 1.0,
    beta: float = 0.05,
    progress=None,
) -> dict:
    """Run the DP aggregation of ``plan`` (a ``fedfm.privacy.plan.PrivacyPlan``) over its rounds with
    ``canaries`` canary clients (about half joined) and return the reported ε, the one-run lower
    bound and the estimate."""
    if plan.distributed:
        raise ValueError("the canary audit covers central noise (privacy.noise = 'central')")
    if canaries < 20:
        raise ValueError("the canary audit needs at least 20 canaries")
    rng = numpy_rng(seed, "canary-audit")
    dim = int(min(plan.dim, max_dim))
    state = plan.initial_state()
    clip_norm = state["clip_norm"]
    directions = rng.standard_normal((canaries, dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    joined = rng.random(canaries) < 0.5
    rate = plan.sampling.rate
    noise = torch_generator(seed, "canary-audit-noise")
    z_delta = plan.z_delta
    plan.z_delta = z_delta * noise_factor
    total = torch.zeros(dim, dtype=torch.float64)
    try:
        for t in range(1, plan.rounds + 1):
            sampled = np.flatnonzero(joined & (rng.random(canaries) < rate))
            c = state["clip_norm"]
            updates = ({"w": torch.from_numpy(directions[i] * c)} for i in sampled)
            summed, count, n = dp.server_sums(updates, c)
            if summed is None:
                summed, count = {"w": torch.zeros(dim, dtype=torch.float64)}, 0.0
            aggregate = plan.server_half(state, t, summed, count, n, noise)
            total += aggregate["w"].double()
            if progress:
                progress(t, plan.rounds)
    finally:
        plan.z_delta = z_delta
    final = total.numpy()
    cosines = directions @ final / max(np.linalg.norm(final), 1e-300)
    reported = plan.epsilon(state["ledger"])
    delta = plan.cfg.delta
    bound = one_run_lower_bound(cosines, joined, delta=delta, beta=beta)
    estimate = andrew_estimate(cosines[joined], cosines[~joined], delta)
    return {
        "reported_epsilon": reported,
        "delta": delta,
        "rounds": plan.rounds,
        "noise_multiplier": plan.z,
        "clip_norm": clip_norm,
        "sampling_rate": rate,
        "dimension": dim,
        "canaries": canaries,
        "joined": int(joined.sum()),
        "noise_factor": noise_factor,
        **bound,
        **estimate,
        "bound_exceeds_reported": bool(bound["epsilon_lower_bound"] > reported),
        "interference_bound": 1 / math.sqrt(dim),
    }
