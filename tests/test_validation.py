import torch

from fedfm.transforms.validation import update_problem
from fedfm.types import Update

REF = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}


def good():
    return {"a": torch.ones(2, 3), "b": torch.ones(4)}


def test_valid_update_passes():
    assert update_problem(Update(good(), 5), REF) is None


def test_every_malformed_kind_is_named():
    d = good()
    d["a"] = torch.full((2, 3), float("nan"))
    assert "NaN or Inf" in update_problem(Update(d, 5), REF)
    d = good()
    d["b"] = torch.ones(5)
    assert "shape (5,) != expected (4,)" in update_problem(Update(d, 5), REF)
    d = good()
    d["b"] = torch.ones(4, dtype=torch.float64)
    assert "dtype" in update_problem(Update(d, 5), REF)
    d = good()
    del d["b"]
    assert "missing ['b']" in update_problem(Update(d, 5), REF)
    assert "positive integer" in update_problem(Update(good(), 0), REF)
