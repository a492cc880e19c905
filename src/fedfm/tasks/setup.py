"""Build everything a run needs from its config: data splits, client partition, model, task."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedfm.client.steps import ClientJob
from fedfm.config import RunConfig
from fedfm.data.dataset import TextDataset, first_occurrences, stratified_sample, stratified_split
from fedfm.data.partition import PARTITIONERS, PartitionError, by_column, label_counts, natural
from fedfm.data.synthetic import synthetic_mode
from fedfm.models.build import ModelBundle
from fedfm.seeding import numpy_rng
from fedfm.tasks import task_kind


@dataclass(frozen=True)
class FederatedData:
    """The server's test set and every client's training (and optional local test) rows."""

    train: TextDataset
    test: TextDataset
    client_train: list[np.ndarray]
    client_test: list[np.ndarray]
    synthetic_rows: np.ndarray = field(default_factory=lambda: np.array([], dtype=np.int64))
    client_names: tuple[str, ...] = ()  # natural partitioning: client k is the column's k-th value

    @property
    def num_real(self) -> int:
        """Rows of ``train`` that are real; synthetic rows (if any) follow them."""
        return len(self.train) - len(self.synthetic_rows)

    @property
    def num_clients(self) -> int:
        return len(self.client_train)

    def partition_summary(self, method: str) -> dict:
        """Per client: real examples by label, and synthetic ones counted apart."""
        names, n_real = self.train.label_names, self.num_real
        real = [rows[rows < n_real] for rows in self.client_train]
        synth = [rows[rows >= n_real] for rows in self.client_train]
        counts = label_counts(self.train.labels, real, self.train.num_labels)
        synth_counts = label_counts(self.train.labels, synth, self.train.num_labels)
        summary = {
            "method": method,
            "num_clients": self.num_clients,
            "label_names": names,
            "num_train": n_real,
            "num_test": len(self.test),
            # the server test split by label: the majority-class baseline a classifier must beat
            "test_label_counts": dict(
                zip(names, map(int, np.bincount(self.test.labels, minlength=len(names))), strict=True)
            )
            if len(self.test) and np.issubdtype(np.asarray(self.test.labels).dtype, np.integer)
            else {},
            "clients": [
                {
                    "client": k,
                    **({"name": self.client_names[k]} if self.client_names else {}),
                    "num_train": int(len(real[k])),
                    "num_local_test": int(len(self.client_test[k])),
                    "label_counts": dict(zip(names, map(int, row), strict=True)),
                }
                for k, row in enumerate(counts)
            ],
        }
        if len(self.synthetic_rows):
            summary["num_synthetic"] = int(len(self.synthetic_rows))
            for k, row in enumerate(synth_counts):
                summary["clients"][k]["num_synthetic"] = int(len(synth[k]))
                summary["clients"][k]["synthetic_label_counts"] = dict(zip(names, map(int, row), strict=True))
        return summary


def conflicting_labels(identities, labels) -> int:
    """Repeated rows whose label differs from the label of the row's first occurrence."""
    if labels is None or len(labels) != len(identities):
        return 0
    first: dict = {}
    conflicts = 0
    for identity, label in zip(identities, labels, strict=True):
        if identity in first:
            conflicts += int(first[identity] != label)
        else:
            first[identity] = label
    return conflicts


def load_splits(cfg: RunConfig) -> tuple[TextDataset, TextDataset]:
    """The source's training rows and the server's test split (de-duplicated, subsampled)."""
    seed, d = cfg.run.seed, cfg.data
    train, test = task_kind(cfg).load_source(d)
    if d.deduplicate:  # BBC News, for one, holds 98 exact duplicates that would leak into the test split
        seen = train.identities()
        before = (len(train), len(test) if test is not None else 0)
        conflicting = conflicting_labels(seen, train.labels)
        train = train.subset(first_occurrences(seen))
        if test is not None:
            test = test.subset(first_occurrences(test.identities(), exclude=seen))
        dropped = before[0] - len(train), before[1] - (len(test) if test is not None else 0)
        if sum(dropped):
            import warnings

            from fedfm.data.sources import DataNote

            also = f" and {dropped[1]} test rows also in training or repeated" if dropped[1] else ""
            if conflicting:
                also += (
                    f"; {conflicting} of the dropped training rows had a label other than their first "
                    "copy's (the first copy's label was kept)"
                )
            warnings.warn(
                DataNote(f"data.deduplicate dropped {dropped[0]} duplicate training rows{also}"),
                stacklevel=2,
            )
    if test is None:
        rest, held = stratified_split(train.labels, d.test_fraction, numpy_rng(seed, "test-split"))
        train, test = train.subset(rest), train.subset(held)
    if d.max_examples:
        train = train.subset(stratified_sample(train.labels, d.max_examples, numpy_rng(seed, "sub-train")))
    if d.max_test_examples:
        test = test.subset(stratified_sample(test.labels, d.max_test_examples, numpy_rng(seed, "sub-test")))
    return train, test


def server_only_data(cfg: RunConfig) -> FederatedData:
    """A deployed server's view: its test split, and no client rows (clients hold their own data)."""
    train, test = load_splits(cfg)
    empty = [np.array([], dtype=np.int64) for _ in range(cfg.partition.num_clients)]
    return FederatedData(train.subset([]), test, empty, list(empty))


def prepare_data(cfg: RunConfig) -> FederatedData:
    """Load the source, hold out the server test split, partition the rest among clients."""
    seed, d = cfg.run.seed, cfg.data
    train, test = load_splits(cfg)
    synthetic, mode = None, synthetic_mode(cfg)
    if mode.loads:
        from fedfm.data.synthetic import load_synthetic

        sy = cfg.synthetic
        synthetic = load_synthetic(sy.path, train.label_names, test.texts, sy.max_examples, seed)
        if mode.replaces:  # the synthetic-only baseline: the same pipeline on synthetic data alone
            train, synthetic = synthetic, None
    p = cfg.partition
    groups = train.columns.get(p.column) if p.column else None
    if p.column and groups is None:
        raise PartitionError(
            f"partition.column {p.column!r} is not a column of the data; "
            f"columns: {', '.join(train.columns) or 'none'}"
        )
    parts = PARTITIONERS.get(p.method)(train.labels, groups, p, numpy_rng(seed, "partition"))
    names = tuple(natural(groups)[1]) if by_column(p) else ()
    client_train, client_test = [], []
    for k, part in enumerate(parts):
        part = np.asarray(part, dtype=np.int64)
        if d.client_test_fraction > 0:
            rest, held = stratified_split(
                train.labels[part], d.client_test_fraction, numpy_rng(seed, "client-test", k)
            )
            client_train.append(part[rest])
            client_test.append(part[held])
        else:
            client_train.append(part)
            client_test.append(np.array([], dtype=np.int64))
    if mode.replaces:
        return FederatedData(train, test, client_train, client_test, np.arange(len(train)), names)
    real = FederatedData(train, test, client_train, client_test, client_names=names)
    return real if synthetic is None else with_synthetic(real, synthetic, cfg)


def with_synthetic(data: FederatedData, synthetic: TextDataset, cfg: RunConfig) -> FederatedData:
    """Append the synthetic rows after the real ones; with augmentation, hand clients their share."""
    from fedfm.data.synthetic import augment_rows, concat

    n, sy = len(data.train), cfg.synthetic
    client_train = data.client_train
    if synthetic_mode(cfg).augment:
        client_train = []
        for k, rows in enumerate(data.client_train):
            rng = numpy_rng(cfg.run.seed, "synthetic-augment", k)
            extra = augment_rows(
                data.train.labels[rows], synthetic.labels, sy.augment_per_client, sy.augment_classes, rng
            )
            client_train.append(np.concatenate([rows, n + extra]))
    rows = np.arange(n, n + len(synthetic))
    return FederatedData(
        concat(data.train, synthetic), data.test, client_train, data.client_test, rows, data.client_names
    )


def build_bundle(cfg: RunConfig, label_names: list[str]) -> ModelBundle:
    """The task kind's model with its PEFT method applied, seeded; the sharing mode's additions
    (split fine-tuning's cut) on it."""
    from fedfm.registry import registry_for

    bundle = task_kind(cfg).build_bundle(cfg, label_names)
    prepare = registry_for("sharing mode").get(cfg.sharing.mode).prepare_bundle
    if prepare is not None:
        prepare(bundle, cfg)
    return bundle


@dataclass(frozen=True)
class BundleBuilder:
    """A picklable way to build the run's model bundle again (a Ray worker builds its own): the
    sections a model is built from, and the label names — not the run's whole config."""

    sections: dict  # task, model, peft, training and run, as RunConfig.model_dump() gives them
    label_names: list[str]

    @classmethod
    def of(cls, cfg: RunConfig, label_names) -> BundleBuilder:
        dumped = cfg.model_dump()
        return cls({k: dumped[k] for k in ("task", "model", "peft", "training", "run")}, list(label_names))

    def __call__(self) -> ModelBundle:
        return build_bundle(RunConfig.model_validate(self.sections), self.label_names)


def build_task(cfg: RunConfig, data: FederatedData):
    """(model bundle, task object) for the configured task kind."""
    bundle = build_bundle(cfg, data.train.label_names)
    return bundle, task_kind(cfg).build(cfg, data, bundle)


def client_jobs(data: FederatedData, peft_cfg) -> list[ClientJob]:
    """Every client's training rows and, with ``peft.rank_tiers``, its LoRA rank tier.

    ``round_robin``: client k gets tier k mod len(tiers). ``by_size`` (a capacity rule): clients
    sorted by data size are cut into len(tiers) near-equal groups, the largest clients getting the
    largest rank. ``per_client``: ``rank_tiers[k]`` is client k's rank.
    """
    tiers = sorted(peft_cfg.rank_tiers or [])
    ranks: list[int | None] = [None] * data.num_clients
    if tiers:
        if peft_cfg.rank_assignment == "per_client":
            ranks = list(peft_cfg.rank_tiers)
        elif peft_cfg.rank_assignment == "round_robin":
            ranks = [tiers[k % len(tiers)] for k in range(data.num_clients)]
        else:
            order = np.argsort([len(rows) for rows in data.client_train], kind="stable")
            for group, members in enumerate(np.array_split(order, len(tiers))):
                for k in members:
                    ranks[int(k)] = tiers[group]
    return [ClientJob(k, rows, ranks[k]) for k, rows in enumerate(data.client_train)]
