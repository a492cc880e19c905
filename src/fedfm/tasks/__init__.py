"""Tasks: what a kind of learning problem needs, registered by its module in ``TASKS``.

A ``TaskKind`` entry carries everything a ``task.kind`` decides: how its data is loaded, how its
model is built, how examples become the task object (batches and loss), how the server evaluates
a model, what the console shows, what its export records, and which config combinations it
cannot run. Nothing outside ``fedfm.tasks`` branches on ``task.kind``: the run looks the kind up.
"""

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
    own_metric: tuple = ("accuracy", True)
    labels_in_export: bool = False
    check: Callable | None = None
    batchable: bool = False
    check_batched: Callable | None = None
    defaults: list = field(default_factory=list)


TASKS: Registry[TaskKind] = Registry("task")


def task_kind(cfg) -> TaskKind:
    return TASKS.get(cfg.task.kind)


from fedfm.tasks import classification as _classification  # noqa: E402,F401  (registration)
from fedfm.tasks import image as _image  # noqa: E402,F401
from fedfm.tasks import instruction as _instruction  # noqa: E402,F401
from fedfm.tasks import preference as _preference  # noqa: E402,F401

__all__ = ["TASKS", "TaskKind", "task_kind"]
