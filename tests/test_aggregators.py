import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfm.algorithms.aggregators import AGGREGATORS, EmptyCohortError, weighted_mean


def test_weighted_mean_hand_computed():
    # (1·[1, 2] + 3·[5, 6]) / 4 = [4, 5]
    out = weighted_mean([({"w": torch.tensor([1.0, 2.0])}, 1.0), ({"w": torch.tensor([5.0, 6.0])}, 3.0)])
    assert torch.equal(out["w"], torch.tensor([4.0, 5.0]))


def test_uniform_weights_give_plain_average():
    out = weighted_mean([({"a": torch.tensor([0.0])}, 1.0), ({"a": torch.tensor([3.0])}, 1.0)])
    assert out["a"].item() == pytest.approx(1.5)


def test_consumes_a_stream_once():
    gen = (({"a": torch.tensor([float(i)])}, 1.0) for i in range(4))
    assert weighted_mean(gen)["a"].item() == pytest.approx(1.5)


def test_empty_and_zero_weight_cohorts_raise():
    with pytest.raises(EmptyCohortError):
        weighted_mean([])
    with pytest.raises(EmptyCohortError):
        weighted_mean([({"a": torch.ones(1)}, 0.0)])
    with pytest.raises(ValueError, match="non-negative"):
        weighted_mean([({"a": torch.ones(1)}, -1.0)])


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=3),
    weights=st.lists(st.floats(0.1, 100), min_size=1, max_size=6),
)
def test_identical_updates_average_to_themselves(values, weights):
    delta = {"w": torch.tensor(values, dtype=torch.float32)}
    out = weighted_mean([(delta, w) for w in weights])
    torch.testing.assert_close(out["w"], delta["w"], rtol=1e-6, atol=1e-5)


def test_registered_by_name():
    assert AGGREGATORS.get("mean") is weighted_mean
    with pytest.raises(KeyError, match="registered: bulyan, geometric_median, krum, mean"):
        AGGREGATORS.get("median-typo")
