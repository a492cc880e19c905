"""Privacy accounting for client-level DP-FedAvg, on Google's ``dp-accounting`` library.

One round of DP-FedAvg is a sampled Gaussian mechanism: a cohort is drawn from the N clients,
each clipped update has L2 norm at most C, and Gaussian noise of standard deviation σ = z·C is
added to the sum. What the accountant is fed depends on the neighbouring relation, because the
*sensitivity* of the sum does:

* ``poisson``: every client joins with probability q; neighbours add or remove one client, which
  moves the sum by at most C → ``PoissonSampledDpEvent(q, Gaussian(σ / C = z))`` (RDP or PLD).
* ``fixed``: m of N clients without replacement; neighbours *replace* one client's data by
  another's, which moves the sum by up to 2C → ``SampledWithoutReplacementDpEvent(N, m,
  Gaussian(σ / 2C = z / 2))`` (RDP only; the relation TensorFlow Privacy and TFF use for
  fixed-size cohorts). With every client in every round there is no amplification:
  ``Gaussian(z / 2)`` under the same replace-one relation.

dp-accounting's Gaussian event takes the noise *relative to the sensitivity*; passing z under
replace-one (as fedfm 0.1 did) under-reports ε by 2.5–17.5×. The ledger records z per
round (the charged multiplier σ / (κ·C), with κ ≥ 1 the sensitivity growth of a round's encoding)
and this module alone turns it into an event, so that a test against an independent accountant
pins the convention.

Rounds of the distributed Skellam mechanism (``fedfm.privacy.skellam``) are ledger entries of
their own kind and compose by RDP.

The ledger is a list of plain dicts, one per charged round, so it checkpoints as a value and a
resumed run recomputes exactly the ε of an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dp_accounting
from absl import logging as absl_logging
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

NeighborRel = dp_accounting.NeighboringRelation
absl_logging.set_verbosity(absl_logging.ERROR)  # RDP's per-order convergence notes are not for users


@dataclass(frozen=True)
class Sampling:
    """How a round's cohort is drawn: ``fixed`` (m of N) or ``poisson`` (each with probability q)."""

    method: str
    population: int
    cohort: int  # m for fixed; the expected size q·N (rounded) for poisson
    rate: float  # m / N or q

    @property
    def relation(self) -> NeighborRel:
        return NeighborRel.ADD_OR_REMOVE_ONE if self.method == "poisson" else NeighborRel.REPLACE_ONE

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of the clipped sum, in units of C: 1 (add/remove) or 2 (replace one)."""
        return 1.0 if self.method == "poisson" else 2.0

    def event(self, noise_multiplier: float) -> dp_event.DpEvent:
        """One round's event for σ = z·C: the Gaussian's multiplier is σ over the sensitivity."""
        gaussian = dp_event.GaussianDpEvent(noise_multiplier / self.sensitivity)
        if self.method == "poisson":
            return dp_event.PoissonSampledDpEvent(self.rate, gaussian)
        if self.cohort >= self.population:
            return gaussian  # everyone every round: no amplification
        return dp_event.SampledWithoutReplacementDpEvent(self.population, self.cohort, gaussian)


def make_accountant(kind: str, sampling: Sampling) -> dp_accounting.PrivacyAccountant:
    if kind == "pld":
        if sampling.method != "poisson":
            raise ValueError("the PLD accountant supports Poisson sampling only; use 'rdp' for fixed cohorts")
        return pld_privacy_accountant.PLDAccountant(NeighborRel.ADD_OR_REMOVE_ONE, 1e-3)
    return rdp_privacy_accountant.RdpAccountant(neighboring_relation=sampling.relation)


def epsilon(ledger: list[dict], delta: float, kind: str, sampling: Sampling) -> float:
    """ε at ``delta`` after every round in ``ledger`` (rounds with equal noise are composed at once)."""
    if not ledger:
        return 0.0
    skellam_rounds = [e for e in ledger if e.get("mechanism") == "skellam"]
    if skellam_rounds:
        if len(skellam_rounds) != len(ledger):
            raise ValueError("a ledger mixes Gaussian and Skellam rounds; fedfm runs one mechanism per run")
        from fedfm.privacy import skellam

        return skellam.epsilon(skellam_rounds, delta)
    counts: dict[float, int] = {}
    for entry in ledger:
        z = float(entry["noise_multiplier"])
        counts[z] = counts.get(z, 0) + 1
    accountant = make_accountant(kind, sampling)
    for z, count in counts.items():
        if z == 0:
            return math.inf
        accountant.compose(sampling.event(z), count)
    return float(accountant.get_epsilon(delta))


def calibrate_noise(target_epsilon: float, delta: float, rounds: int, kind: str, sampling: Sampling) -> float:
    """The smallest noise multiplier z whose ε after ``rounds`` rounds is at most ``target_epsilon``."""

    def make_event(z: float) -> dp_event.DpEvent:
        return dp_event.SelfComposedDpEvent(sampling.event(z), rounds)

    def solve(accountant_kind: str, low: float, high: float) -> float:
        try:
            return dp_accounting.calibrate_dp_mechanism(
                lambda: make_accountant(accountant_kind, sampling),
                make_event,
                target_epsilon,
                delta,
                bracket_interval=dp_accounting.ExplicitBracketInterval(low, high),
                tol=1e-4,
            )
        except ValueError as err:
            raise ValueError(
                f"no noise multiplier in [{low:g}, {high:g}] reaches ε = {target_epsilon} at δ = {delta} "
                f"over {rounds} rounds ({err})"
            ) from None

    z = solve("rdp", 0.05, 1e3)
    if kind == "pld":  # PLD is tighter (smaller z); search below the RDP answer, where it is fast
        z = solve("pld", 0.5 * z, 1.01 * z)
    # Brent's method returns a value within tol of the optimum; step up until the budget holds.
    while epsilon([{"noise_multiplier": z}] * rounds, delta, kind, sampling) > target_epsilon:
        z *= 1.0001
    return float(z)
