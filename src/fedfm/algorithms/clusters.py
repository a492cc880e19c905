"""Clustered federated learning by IFCA (Ghosh et al. 2020): k global adapters, each client
trains the one with the lowest loss on its own data.

The server state holds the k cluster models side by side in one flat ``Params``, each tensor
under ``cluster{j}/<name>`` (so checkpoints, the server optimizer and the byte counts handle it
unchanged; every client downloads all k, as IFCA's clients do). A client scores each cluster
model on its training rows, picks the lowest loss (ties, as in the first round where all k are
equal, broken by a seeded draw of its own: a random initial assignment), trains that one, and
sends only that cluster's update with the cluster's index. The server averages each cluster's
updates over the clients that picked it; a cluster nobody picked stays where it is.

The server learns each client's cluster. Under secure aggregation that is exactly what the
masking hides, so IFCA refuses secagg (and DP) rather than leak it (docs/personalization.md).
Pure functions of tensors and key names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedfm.types import Params

PREFIX = "cluster{}/"


def stack_clusters(params: Params, k: int) -> Params:
    """The k cluster models, each a copy of ``params``."""
    return {PREFIX.format(j) + name: v.clone() for j in range(k) for name, v in params.items()}


def num_clusters(stacked: Params) -> int:
    return len({key.split("/", 1)[0] for key in stacked})


def cluster_view(stacked: Params, j: int) -> Params:
    """Cluster j's model under the plain tensor names."""
    prefix = PREFIX.format(j)
    return {key[len(prefix) :]: v for key, v in stacked.items() if key.startswith(prefix)}


def as_cluster(params: Params, j: int) -> Params:
    """A model's (or an update's) tensors under cluster j's names."""
    return {PREFIX.format(j) + name: v for name, v in params.items()}


def choose_cluster(losses: Sequence[float], rng: np.random.Generator) -> int:
    """The index of the lowest loss; exact ties broken by ``rng`` (all k equal: a random one).
    A NaN loss is never the lowest; all NaN (no rows to score on): a random one."""
    losses = np.asarray(losses, dtype=float)
    finite = np.flatnonzero(~np.isnan(losses))
    if not len(finite):
        return int(rng.integers(len(losses)))
    best = finite[losses[finite] == losses[finite].min()]
    return int(best[0] if len(best) == 1 else rng.choice(best))


def cluster_index(value, k: int | None) -> int | None:
    """A client's stated cluster as an index in 0..k-1 (any index when ``k`` is None), or None
    for anything else (a bool, NaN, inf, a fraction, a string, out of range)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and (not math.isfinite(value) or value != int(value)):
        return None
    j = int(value)
    return j if j >= 0 and (k is None or j < k) else None


def cluster_update(delta: Params, reference: Params, j: int) -> Params:
    """A client's update for cluster j made whole against the stacked state: its tensors under
    cluster j's names, zeros everywhere else (whatever else it sent is dropped)."""
    import torch

    prefix = PREFIX.format(j)
    return {
        key: (delta[key] if key.startswith(prefix) and key in delta else torch.zeros_like(v))
        for key, v in reference.items()
    }


def combine(per_cluster: dict[int, Params], reference: Params) -> Params:
    """One aggregate over the stacked state: each cluster's tensors from its own aggregate, zeros
    for the clusters nobody picked."""
    import torch

    out = {}
    for key, v in reference.items():
        j = int(key.split("/", 1)[0][len("cluster") :])
        out[key] = per_cluster[j][key] if j in per_cluster else torch.zeros_like(v)
    return out
