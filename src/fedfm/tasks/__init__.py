"""Tasks: what a kind of learning problem needs, registered by its module in ``TASKS``.

A ``TaskKind`` entry carries everything a ``task.kind`` decides: how its data is loaded, how its
model is built, how examples become the task object (batches and loss), how the server evaluates
a model, what the console shows, what its export records, and which config combinations it
cannot run. Nothing outside ``fedfm.tasks`` branches on ``task.kind``: the run looks the kind up.
"""

from __future__ import annotations

from fedfm.tasks import classification as _classification  # noqa: E402,F401  (registration)
from fedfm.tasks import image as _image  # noqa: E402,F401
from fedfm.tasks import instruction as _instruction  # noqa: E402,F401
from fedfm.tasks import preference as _preference  # noqa: E402,F401
from fedfm.tasks.base import TASKS, TaskKind, task_kind  # noqa: F401

__all__ = ["TASKS", "TaskKind", "task_kind"]
