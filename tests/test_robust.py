"""Byzantine-robust aggregators: identical updates pass through; hand-built breakdown cases."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfm.algorithms.robust import (
    CohortTooSmallError,
    bulyan,
    coordinate_median,
    geometric_median,
    krum,
    median,
    multi_krum,
    norm_bound,
    trimmed_mean,
)

RULES = {
    "median": lambda u: median(u),
    "trimmed_mean": lambda u: trimmed_mean(u, trim_ratio=0.2),
    "krum": lambda u: krum(u, byzantine=1),
    "multi_krum": lambda u: multi_krum(u, byzantine=1),
    "bulyan": lambda u: bulyan(u, byzantine=1),
    "norm_bound": lambda u: norm_bound(u, norm_bound=1e6),
    "geometric_median": lambda u: geometric_median(u),
}


def ups(values, weights=None):
    """Scalar-per-client updates as {"w": tensor([v])}, or vectors when v is a list."""
    weights = weights or [1.0] * len(values)
    return [
        ({"w": torch.tensor(v if isinstance(v, list) else [v], dtype=torch.float32)}, w)
        for v, w in zip(values, weights, strict=True)
    ]


@settings(max_examples=25, deadline=None)
@given(
    vec=st.lists(st.floats(-100, 100), min_size=2, max_size=4),
    rule=st.sampled_from(sorted(RULES)),
    weights=st.lists(st.floats(0.5, 50), min_size=7, max_size=7),
)
def test_identical_updates_come_back_unchanged(vec, rule, weights):
    updates = [({"w": torch.tensor(vec), "b": torch.tensor([vec[0]])}, w) for w in weights]
    out = RULES[rule](updates)
    torch.testing.assert_close(out["w"], torch.tensor(vec), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out["b"], torch.tensor([vec[0]]), atol=1e-4, rtol=1e-5)


def test_median_resists_a_minority_and_breaks_at_half():
    assert median(ups([1, 1, 1, 100, -100]))["w"].item() == 1
    assert median(ups([1, 1, 100, 100, 100]))["w"].item() == 100  # 3 of 5 attackers: broken
    assert coordinate_median(torch.tensor([[1.0], [3.0]])).item() == 2  # even count: middle mean


def test_trimmed_mean_tolerates_k_and_breaks_beyond():
    assert trimmed_mean(ups([1, 1, 1, 1, 100]), trim_ratio=0.2)["w"].item() == pytest.approx(1)
    assert trimmed_mean(ups([1, 1, 1, 100, 100]), trim_ratio=0.2)["w"].item() == pytest.approx(34)


def test_krum_picks_the_honest_cluster():
    honest = [[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.1, 0.1]]
    out = krum(ups([*honest, [100.0, 100.0]]), byzantine=1)["w"]
    assert out.abs().max() <= 0.1
    out = multi_krum(ups([*honest, [100.0, 100.0]]), byzantine=1)["w"]  # mean of the 4 best
    torch.testing.assert_close(out, torch.tensor([0.05, 0.05]))


def test_bulyan_removes_outliers_per_coordinate():
    values = [[0.0], [0.1], [-0.1], [0.05], [-0.05], [1000.0], [0.02]]
    assert abs(bulyan(ups(values), byzantine=1)["w"].item()) < 0.1


def test_norm_bound_clips_the_scaled_update():
    out = norm_bound(ups([[3.0, 4.0], [0.0, 0.0]]), norm_bound=1.0)["w"]  # [3,4] → [0.6,0.8]
    torch.testing.assert_close(out, torch.tensor([0.3, 0.4]))


def test_geometric_median_ignores_far_minority():
    out = geometric_median(ups([[0.0, 0.0]] * 3 + [[100.0, 100.0]] * 2), gm_iters=100)["w"]
    assert out.norm() < 1.0
    # the mean would be at [40, 40]


def test_each_rule_refuses_a_cohort_too_small():
    with pytest.raises(CohortTooSmallError, match="krum needs at least 5 updates"):
        krum(ups([1, 2, 3, 4]), byzantine=1)
    with pytest.raises(CohortTooSmallError, match="bulyan needs at least 7"):
        bulyan(ups([1, 2, 3, 4, 5, 6]), byzantine=1)
    with pytest.raises(CohortTooSmallError, match="trimmed_mean"):
        trimmed_mean(ups([1, 2]), trim_ratio=0.5)
