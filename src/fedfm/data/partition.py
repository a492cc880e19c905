"""Partitioners: pure, seeded functions from labels (or a key column) to per-client index lists.

Every example lands in exactly one client. Registered adapters take the ``[partition]`` config.

- ``iid``: a random permutation cut into near-equal parts.
- ``dirichlet``: for each class, client shares ~ Dir(α) (Hsu et al., 2019, "Measuring the Effects
  of Non-Identical Data Distribution"); redrawn until every client has ``min_size`` examples.
- ``shards``: sort by label, cut into ``num_clients × k`` shards, deal k random shards per client
  (McMahan et al., 2017) — at most k classes per client.
- ``natural``: one client per distinct value of a column (e.g. author, hospital, category).
- ``quantity``: IID labels, client sizes ∝ log-normal(0, σ) weights (quantity skew).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from pydantic import BaseModel, Field

from fedfm.registry import Registry


class PartitionError(ValueError):
    """A partition that cannot be made with the given settings."""


def iid(num_examples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    _check(num_examples, num_clients)
    return [np.sort(p) for p in np.array_split(rng.permutation(num_examples), num_clients)]


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 0,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    labels = np.asarray(labels)
    _check(len(labels), num_clients)
    if min_size * num_clients > len(labels):
        raise PartitionError(
            f"partition.min_size={min_size} × num_clients={num_clients} exceeds {len(labels)} examples"
        )
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for k, piece in enumerate(np.split(idx, cuts)):
                parts[k].append(piece)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in result) >= min_size:
            return result
    raise PartitionError(
        f"no Dirichlet(alpha={alpha}) partition gave every client ≥ {min_size} examples in "
        f"{max_tries} draws; lower partition.min_size or raise partition.alpha"
    )


def shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    labels = np.asarray(labels)
    num_shards = num_clients * shards_per_client
    _check(len(labels), num_shards, what="shards (num_clients × classes_per_client)")
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, num_shards)
    deal = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in deal]


def natural(keys: Sequence[object]) -> tuple[list[np.ndarray], list[str]]:
    """One client per distinct key, in sorted key order; returns (parts, key names)."""
    names = sorted({str(k) for k in keys})
    index = {n: i for i, n in enumerate(names)}
    ids = np.array([index[str(k)] for k in keys])
    return [np.flatnonzero(ids == i) for i in range(len(names))], names


def quantity(
    num_examples: int, num_clients: int, sigma: float, rng: np.random.Generator, min_size: int = 1
) -> list[np.ndarray]:
    _check(num_examples, num_clients)
    min_size = max(1, min(min_size, num_examples // num_clients))
    weights = rng.lognormal(0.0, sigma, num_clients)
    spare = num_examples - min_size * num_clients
    sizes = min_size + np.floor(weights / weights.sum() * spare).astype(int)
    sizes[np.argmax(weights)] += num_examples - sizes.sum()
    perm = rng.permutation(num_examples)
    return [np.sort(p) for p in np.split(perm, np.cumsum(sizes)[:-1])]


def _check(num_examples: int, parts: int, what: str = "clients") -> None:
    if parts > num_examples:
        raise PartitionError(f"cannot split {num_examples} examples among {parts} {what}")


Partitioner = Callable[..., list[np.ndarray]]
PARTITIONERS: Registry[Partitioner] = Registry("partitioner")


class MinSizeOptions(BaseModel):
    min_size: int = Field(10, ge=0, description="Minimum examples per client.")


class DirichletOptions(MinSizeOptions):
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (smaller = more non-IID).")


class ShardOptions(BaseModel):
    classes_per_client: int = Field(2, ge=1, description="Label shards per client.")


class QuantityOptions(MinSizeOptions):
    sigma: float = Field(1.0, ge=0, description="Log-normal spread of client sizes.")


class ColumnOptions(BaseModel):
    column: str | None = Field(None, description="The column whose values are clients.")


PARTITIONERS.register("iid")(lambda labels, groups, cfg, rng: iid(len(labels), cfg.num_clients, rng))
PARTITIONERS.register("dirichlet", options=DirichletOptions)(
    lambda labels, groups, cfg, rng: dirichlet(labels, cfg.num_clients, cfg.alpha, rng, cfg.min_size)
)
PARTITIONERS.register("shards", options=ShardOptions)(
    lambda labels, groups, cfg, rng: shards(labels, cfg.num_clients, cfg.classes_per_client, rng)
)
PARTITIONERS.register("quantity", options=QuantityOptions)(
    lambda labels, groups, cfg, rng: quantity(len(labels), cfg.num_clients, cfg.sigma, rng, cfg.min_size)
)


@PARTITIONERS.register("natural", options=ColumnOptions)
def _natural(labels, groups, cfg, rng) -> list[np.ndarray]:
    """``groups`` is the ``partition.column`` values; ``prepare_data`` checks the column exists."""
    parts, _ = natural(groups)
    if len(parts) != cfg.num_clients:
        raise PartitionError(
            f"column {cfg.column!r} has {len(parts)} distinct values, so partition.num_clients "
            f"must be {len(parts)} (got {cfg.num_clients})"
        )
    return parts


_natural.by_column = True  # a capability: clients are the values of partition.column


def by_column(section) -> bool:
    """Whether the configured partitioner makes one client per value of ``partition.column``."""
    return bool(getattr(PARTITIONERS.get(section.method), "by_column", False))


def label_counts(labels: np.ndarray, parts: Sequence[np.ndarray], num_labels: int) -> np.ndarray:
    """A clients × labels matrix of example counts."""
    return np.stack([np.bincount(labels[p], minlength=num_labels) for p in parts])
