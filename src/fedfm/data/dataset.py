"""A labelled text dataset held as plain lists and arrays, plus seeded stratified splitting."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class TextDataset:
    """Texts with integer labels; ``label_names[i]`` names label ``i``; extra columns kept by name."""

    texts: list[str]
    labels: np.ndarray
    label_names: list[str]
    columns: dict[str, list] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def identities(self) -> list[str]:
        """What makes two examples the same (for de-duplication): the text."""
        return self.texts

    def subset(self, indices: Sequence[int] | np.ndarray) -> TextDataset:
        idx = np.asarray(indices, dtype=np.int64)
        return TextDataset(
            texts=[self.texts[i] for i in idx],
            labels=self.labels[idx],
            label_names=self.label_names,
            columns={k: [v[i] for i in idx] for k, v in self.columns.items()},
        )


def encode_labels(raw: Sequence[object]) -> tuple[np.ndarray, list[str]]:
    """Map raw label values to 0..K−1 in sorted order (numbers numerically, else as strings)."""
    values = list(raw)
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        names_sorted = sorted(set(int(v) for v in values))
        index = {v: i for i, v in enumerate(names_sorted)}
        return np.array([index[int(v)] for v in values], dtype=np.int64), [str(v) for v in names_sorted]
    strings = [str(v) for v in values]
    names = sorted(set(strings))
    index = {v: i for i, v in enumerate(names)}
    return np.array([index[s] for s in strings], dtype=np.int64), names


def stratified_split(
    labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (rest, taken) with ``round(fraction·n_c)`` of each class c taken.

    Both parts are sorted; every index lands in exactly one part.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    counts = [int(round(fraction * np.count_nonzero(labels == c))) for c in classes]
    return _take(labels, classes, counts, rng)


def _take(labels: np.ndarray, classes, counts: list[int], rng: np.random.Generator):
    taken: list[np.ndarray] = []
    for c, k in zip(classes, counts, strict=True):
        idx = np.flatnonzero(labels == c)
        taken.append(rng.permutation(idx)[:k])
    chosen = np.sort(np.concatenate(taken)) if taken else np.array([], dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[chosen] = False
    return np.flatnonzero(mask), chosen


def quotas(sizes: list[int], size: int) -> list[int]:
    """``size`` shared out in proportion to ``sizes`` by largest remainders (Hamilton): each
    class gets ⌊share⌋, and the classes with the largest remainders one more until the total is
    exactly ``size`` (ties: the earlier class). Each quota is the rounded share whenever rounding
    already sums to ``size``."""
    total = sum(sizes)
    shares = [size * n / total for n in sizes]
    out = [int(np.floor(s)) for s in shares]
    order = sorted(range(len(sizes)), key=lambda i: (-(shares[i] - out[i]), i))
    for i in order[: size - sum(out)]:
        out[i] += 1
    return out


def stratified_sample(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly ``size`` indices (sorted) with the label proportions of ``labels``, each class's
    share by largest remainders (``quotas``); all of them when ``size`` is not smaller."""
    if size >= len(labels):
        return np.arange(len(labels))
    labels = np.asarray(labels)
    classes = np.unique(labels)
    counts = quotas([int(np.count_nonzero(labels == c)) for c in classes], size)
    return _take(labels, classes, counts, rng)[1]


def first_occurrences(texts: Sequence[str], exclude: Sequence[str] = ()) -> np.ndarray:
    """Indices of the first occurrence of each distinct text, skipping texts in ``exclude``."""
    seen = set(exclude)
    keep = []
    for i, text in enumerate(texts):
        if text not in seen:
            seen.add(text)
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)
