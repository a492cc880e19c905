"""The sharing seam: SharingMode and the registry its members join (the package imports them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedfm.registry import Registry


@dataclass(frozen=True)
class SharingMode:
    client_view: Callable  # (cfg) → the config of the model clients train
    server_model: Callable  # (cfg, label_names) → ServerModel | None
    check: Callable | None = None  # (cfg) → raises ValueError naming a field
    describe: Callable | None = None  # (cfg) → dict recorded in metrics.jsonl ("sharing" event)
    prepare_bundle: Callable | None = None  # (bundle, cfg): after the clients' model is built
    protocol: str | None = None  # the run protocol this mode runs as (transfer: its own loop)
    # (cfg, clients' bundle, server model, held-out texts, console) → a record for metrics.jsonl
    # or None: once the run's models and state are set up (offsite's distillation)
    prepare_run: Callable | None = None


SHARING_MODES: Registry[SharingMode] = Registry("sharing mode")

SHARING_MODES.register("none")(SharingMode(lambda cfg: cfg, lambda cfg, labels: None))
