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
    taken: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = int(round(fraction * len(idx)))
        taken.append(rng.permutation(idx)[:k])
    chosen = np.sort(np.concatenate(taken)) if taken else np.array([], dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[chosen] = False
    return np.flatnonzero(mask), chosen


def stratified_sample(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """About ``size`` indices with the label proportions of ``labels`` (sorted)."""
    if size >= len(labels):
        return np.arange(len(labels))
    _, taken = stratified_split(labels, size / len(labels), rng)
    return taken


def first_occurrences(texts: Sequence[str], exclude: Sequence[str] = ()) -> np.ndarray:
    """Indices of the first occurrence of each distinct text, skipping texts in ``exclude``."""
    seen = set(exclude)
    keep = []
    for i, text in enumerate(texts):
        if text not in seen:
            seen.add(text)
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)
