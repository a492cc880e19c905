"""Client sampling: which clients train in a round, drawn from (seed, round) alone.

In a DP run the cohort is privacy-relevant (amplification by sampling assumes nobody can predict
it): the loop then passes an ``rng`` from the run's ``NoiseSource`` (the OS CSPRNG by default).

``fixed`` draws exactly m of N without replacement; ``poisson`` includes each client
independently with probability q = m / N, so cohorts vary in size (what DP accounting with
Poisson subsampling assumes). m comes from ``clients_per_round`` or ``fraction``.
"""

from __future__ import annotations

from fedfm.seeding import numpy_rng


def cohort_size(num_clients: int, clients_per_round: int | None, fraction: float) -> int:
    if clients_per_round:
        return min(clients_per_round, num_clients)
    return max(1, min(num_clients, round(fraction * num_clients)))


def sample_cohort(num_clients: int, size: int, seed: int, round_: int, rng=None) -> list[int]:
    """``size`` distinct client ids, sorted, uniformly without replacement."""
    if size >= num_clients:
        return list(range(num_clients))
    rng = rng or numpy_rng(seed, round_, "cohort")
    return sorted(int(c) for c in rng.choice(num_clients, size=size, replace=False))


def poisson_cohort(num_clients: int, rate: float, seed: int, round_: int, rng=None) -> list[int]:
    """Each client independently with probability ``rate`` (may be empty), sorted."""
    rng = rng or numpy_rng(seed, round_, "cohort")
    return [int(c) for c in (rng.random(num_clients) < rate).nonzero()[0]]


def sampling_rate(num_clients: int, cohort: int) -> float:
    """q = m / N: the inclusion probability of one client, for either sampling method."""
    return cohort / num_clients
