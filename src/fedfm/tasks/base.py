"""The tasks seam: TaskKind and the registry its members join (the package imports them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fedfm.registry import Registry


@dataclass(frozen=True)
class TaskKind:
    """One kind of task.

    ``load_source(data_cfg)`` → (train, test or None); ``build_bundle(cfg, label_names)`` → the
    model with its PEFT method; ``build(cfg, data, bundle)`` → the task object (``batch``,
    ``loss``, ``evaluate``; the task's data); ``evaluator(cfg, data)`` → ``evaluate(bundle,
    task) → dict`` of server metrics (with a ``status`` text); ``columns``: the console's table;
    ``has_head``: its model ends in a classification head (personal heads: FedPer, FedRep);
    ``layer_stack``: its model is a text transformer whose stack of layers can be cut or thinned
    (split fine-tuning, offsite tuning); ``features``: a classifier on a backbone's pooled
    features (FedPFT fits them);
    ``own_metric``: (metric, higher is better) that scores a client on its own held-out data
    (personalization) and a baseline; ``labels_in_export``: whether the exported model records
    ``num_labels`` / ``id2label`` / ``label2id``; ``check(cfg)`` raises ``ValueError`` naming a
    field the kind cannot run with;
    ``batchable``: it has ``segment_losses`` for the batched engine, and ``check_batched(cfg,
    who)`` refuses what a group cannot train; ``defaults``: groups of dotted config fields the
    kind sets when the user's config leaves out a group's first field (an image task's model,
    with its input size, and its dataset).
    """

    load_source: Callable
    build_bundle: Callable
    build: Callable
    evaluator: Callable
    columns: list = field(default_factory=list)
    has_head: bool = False
    layer_stack: bool = False
    features: bool = False
    own_metric: tuple = ("accuracy", True)
    labels_in_export: bool = False
    check: Callable | None = None
    batchable: bool = False
    check_batched: Callable | None = None
    defaults: list = field(default_factory=list)


TASKS: Registry[TaskKind] = Registry("task")


def task_kind(cfg) -> TaskKind:
    return TASKS.get(cfg.task.kind)
