import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfm.config import PartitionSection
from fedfm.data.partition import (
    PARTITIONERS,
    PartitionError,
    dirichlet,
    label_counts,
    natural,
    shards,
)

labels_strategy = st.lists(st.integers(0, 4), min_size=20, max_size=200).map(np.array)


def assert_exact_cover(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == n
    assert np.array_equal(np.sort(joined), np.arange(n))


@settings(max_examples=30, deadline=None)
@given(
    labels=labels_strategy,
    num_clients=st.integers(1, 8),
    seed=st.integers(0, 2**16),
    method=st.sampled_from(["iid", "dirichlet", "shards", "quantity"]),
)
def test_every_example_lands_in_exactly_one_client(labels, num_clients, seed, method):
    cfg = PartitionSection(
        method=method,
        num_clients=num_clients,
        alpha=0.3,
        min_size=0,
        classes_per_client=2,
        sigma=1.5,
    )
    parts = PARTITIONERS.get(method)(labels, None, cfg, np.random.default_rng(seed))
    assert len(parts) == num_clients
    assert_exact_cover(parts, len(labels))


def test_same_seed_same_partition_and_other_seed_differs():
    labels = np.repeat(np.arange(5), 40)
    a = dirichlet(labels, 10, 0.5, np.random.default_rng(1))
    b = dirichlet(labels, 10, 0.5, np.random.default_rng(1))
    c = dirichlet(labels, 10, 0.5, np.random.default_rng(2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_dirichlet_min_size_and_skew():
    labels = np.repeat(np.arange(5), 100)
    parts = dirichlet(labels, 10, 0.1, np.random.default_rng(0), min_size=5)
    assert min(len(p) for p in parts) >= 5
    counts = label_counts(labels, parts, 5)
    # alpha = 0.1 is strongly non-IID: most clients are dominated by one class
    assert np.mean(counts.max(axis=1) / counts.sum(axis=1)) > 0.6
    with pytest.raises(PartitionError, match="min_size"):
        dirichlet(labels, 10, 0.5, np.random.default_rng(0), min_size=100)


def test_shards_give_at_most_k_classes():
    labels = np.repeat(np.arange(10), 20)
    parts = shards(labels, 10, 2, np.random.default_rng(0))
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)


def test_natural_one_client_per_key():
    parts, names = natural(["b", "a", "b", "c"])
    assert names == ["a", "b", "c"]
    assert [list(p) for p in parts] == [[1], [0, 2], [3]]
    cfg = PartitionSection(method="natural", column="site", num_clients=2)
    with pytest.raises(PartitionError, match="must be 3"):
        PARTITIONERS.get("natural")(np.zeros(4), ["b", "a", "b", "c"], cfg, None)


def test_too_many_clients_is_a_clear_error():
    with pytest.raises(PartitionError, match="cannot split 3 examples among 5 clients"):
        PARTITIONERS.get("iid")(
            np.zeros(3),
            None,
            PartitionSection(method="iid", num_clients=5),
            np.random.default_rng(0),
        )
