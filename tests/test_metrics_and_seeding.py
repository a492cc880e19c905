import numpy as np
import pytest

from fedfm.algorithms.sampling import cohort_size, sample_cohort
from fedfm.data.dataset import encode_labels, stratified_split
from fedfm.seeding import derive_seed
from fedfm.tasks.metrics import accuracy, macro_f1, summarize_clients


def test_accuracy_and_macro_f1_hand_computed():
    preds, labels = np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2])
    assert accuracy(preds, labels) == 0.75
    # class 0: tp1 fp1 fn0 → 2/3; class 1: tp1 fp0 fn1 → 2/3; class 2: 1 → mean 7/9
    assert macro_f1(preds, labels, 3) == pytest.approx(7 / 9)


def test_client_summary_worst_decile():
    s = summarize_clients([0.5] + [1.0] * 9)
    assert s["client_accuracy_mean"] == pytest.approx(0.95)
    assert s["client_accuracy_worst10"] == 0.5


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(0, 1, 2, "train") == derive_seed(0, 1, 2, "train")
    assert len({derive_seed(0, r, c, "train") for r in range(5) for c in range(5)}) == 25
    assert derive_seed(0, "x") != derive_seed(1, "x")


def test_cohort_sampling_is_seeded_sorted_and_sized():
    assert cohort_size(10, None, 0.5) == 5
    assert cohort_size(10, 3, 0.5) == 3
    a = sample_cohort(100, 10, seed=0, round_=3)
    assert a == sample_cohort(100, 10, seed=0, round_=3) and a == sorted(a) and len(set(a)) == 10
    assert a != sample_cohort(100, 10, seed=0, round_=4)
    assert sample_cohort(4, 4, 0, 1) == [0, 1, 2, 3]


def test_stratified_split_keeps_proportions_and_covers():
    labels = np.array([0] * 50 + [1] * 30)
    rest, taken = stratified_split(labels, 0.2, np.random.default_rng(0))
    assert sorted(np.concatenate([rest, taken])) == list(range(80))
    assert np.bincount(labels[taken]).tolist() == [10, 6]


def test_encode_labels_sorted():
    ids, names = encode_labels(["b", "a", "b"])
    assert names == ["a", "b"] and ids.tolist() == [1, 0, 1]
    ids, names = encode_labels([10, 2, 10])
    assert names == ["2", "10"] and ids.tolist() == [1, 0, 1]
