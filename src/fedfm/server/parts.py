"""The typed pieces of a run that scoring, baselines and exports read: never the driver itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedfm.config import RunConfig
from fedfm.models.build import ModelBundle
from fedfm.tasks.setup import FederatedData
from fedfm.types import Params


def _no_state(client_id: int) -> dict | None:
    return None


@dataclass(frozen=True)
class RunParts:
    """A run's config, data, model bundle and task (``task``: the task kind's object, with
    ``train``, ``test``, ``batch``, ``loss``, ``evaluate``), where training started, whether its
    clients are remote, each client's kept state (``client_state(k)``: personal tensors), IFCA's
    cluster sizes in the last round, and the cohort sampler (``sample(t)``)."""

    cfg: RunConfig
    data: FederatedData
    bundle: ModelBundle
    task: object
    initial_params: Params
    sample: Callable[[int], list[int]]
    remote: bool = False
    client_state: Callable[[int], dict | None] = _no_state
    cluster_sizes: list[int] | None = None
