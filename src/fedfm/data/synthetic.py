"""Synthetic data in a run: the modes (how FM-made rows are used) and mixing them into the
clients' data.

Synthetic-data modes (``synthetic.mode``): what each does, looked up by name.

Synthetic examples in a run: loaded once, appended after the real training rows, never tested on.

* ``augment``: each client gets ``augment_per_client`` synthetic examples, spread evenly over the
  classes (``augment_classes = "all"``) or over the classes it has no example of (``"missing"``).
  Synthetic data is public, so clients may draw the same examples.
* ``only``: the synthetic set replaces the clients' data and goes through the configured
  partitioner — the same pipeline and budget with only the data changed (the synthetic-only
  baseline).
* ``warmup``: the server trains the global state on the whole synthetic set before round 1
  (``fedfm.server.warmup``, called by the round loop).

The server test split is cut from real data before any of this, and synthetic texts that equal a
test text are dropped, so no synthetic example can reach the test set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedfm.data.dataset import TextDataset, first_occurrences, stratified_sample
from fedfm.data.sources import DataError, _read_rows, rows_to_dataset
from fedfm.registry import Registry
from fedfm.seeding import numpy_rng


@dataclass(frozen=True)
class SyntheticMode:
    """``loads``: reads ``synthetic.path``; ``augment``: clients get synthetic rows beside their
    own; ``warmup``: the server trains on them before round 1; ``replaces``: synthetic data alone
    (the synthetic-only baseline)."""

    loads: bool = True
    augment: bool = False
    warmup: bool = False
    replaces: bool = False


SYNTHETIC_MODES: Registry[SyntheticMode] = Registry("synthetic mode")
SYNTHETIC_MODES.register("none")(SyntheticMode(loads=False))
SYNTHETIC_MODES.register("warmup")(SyntheticMode(warmup=True))
SYNTHETIC_MODES.register("augment")(SyntheticMode(augment=True))
SYNTHETIC_MODES.register("both")(SyntheticMode(augment=True, warmup=True))
SYNTHETIC_MODES.register("only")(SyntheticMode(replaces=True))


def synthetic_mode(cfg) -> SyntheticMode:
    return SYNTHETIC_MODES.get(cfg.synthetic.mode)


def check_synthetic(cfg) -> None:
    sy = cfg.synthetic
    if not synthetic_mode(cfg).loads:
        return
    if not sy.path:
        raise ValueError(
            f"synthetic.mode = {sy.mode!r} needs synthetic.path (a JSONL file from `fedfm synth`)"
        )
    if not Path(sy.path).expanduser().is_file():
        raise ValueError(f"synthetic.path {sy.path!r} is not a file")


def load_synthetic(path: str | Path, label_names: list[str], exclude: list[str], max_examples, seed: int):
    """The synthetic examples of ``path`` as a dataset labelled like the real data.

    Labels must be names of the real data's classes; texts equal to one in ``exclude`` (the test
    set) are dropped, as are repeats.
    """
    rows = _read_rows(Path(path), "jsonl")
    data = rows_to_dataset(rows, "text", "label", f"synthetic.path {path}", label_names)
    data = data.subset(first_occurrences(data.texts, exclude=exclude))
    if not len(data):
        raise DataError(f"synthetic.path {path}: no examples left after dropping repeats and test texts")
    if max_examples and max_examples < len(data):
        data = data.subset(stratified_sample(data.labels, max_examples, numpy_rng(seed, "synthetic-cap")))
    return TextDataset(data.texts, data.labels, data.label_names)


def concat(real: TextDataset, synthetic: TextDataset) -> TextDataset:
    """Real rows first, then synthetic ones; extra columns are ``None`` on synthetic rows."""
    columns = {k: list(v) + [None] * len(synthetic) for k, v in real.columns.items()}
    labels = np.concatenate([real.labels, synthetic.labels]).astype(np.int64)
    return TextDataset(real.texts + synthetic.texts, labels, real.label_names, columns)


def augment_rows(
    client_labels: np.ndarray,
    synthetic_labels: np.ndarray,
    per_client: int,
    classes: str,
    rng: np.random.Generator,
) -> np.ndarray:
    """Indices into the synthetic set for one client: ``per_client`` of them, as even over the
    chosen classes as the pool allows (the pool of a class may run short), drawn without
    replacement. ``classes = "missing"`` chooses the classes absent from ``client_labels``."""
    present = set(np.unique(client_labels).tolist())
    pool_classes = [c for c in np.unique(synthetic_labels).tolist() if classes == "all" or c not in present]
    if not pool_classes:
        return np.array([], dtype=np.int64)
    pools = {c: rng.permutation(np.flatnonzero(synthetic_labels == c)) for c in pool_classes}
    chosen: list[int] = []
    for depth in range(max(len(p) for p in pools.values())):  # round-robin over the classes
        for c in pool_classes:
            if len(chosen) < per_client and depth < len(pools[c]):
                chosen.append(int(pools[c][depth]))
    return np.sort(np.asarray(chosen, dtype=np.int64))
