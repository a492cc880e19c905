"""The sharing seam: SharingMode and the registry its members join (the package imports them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedfm.registry import Registry


@dataclass(frozen=True)
class RemoteHalves:
    """A mode whose clients and server exchange messages during local training (split's cut), as
    a deployment runs it: ``client(cfg, data)`` → (bundle, task, cut hook) of a deployed client;
    ``server(cfg, bundle, task, label_names)`` → the server's sessions; ``check(cfg)`` raises
    ``ValueError`` for what the deployed exchange cannot run."""

    client: Callable
    server: Callable
    check: Callable | None = None


@dataclass(frozen=True)
class SharingMode:
    """A computation-sharing mode and the capabilities other parts ask of it.

    ``changes_model``: clients hold something other than the FM (False only for ``none``);
    ``held(cfg)`` → (θ → the part of it a client holds and is sent), when that is not all of θ;
    ``client_weights(bundle, cfg)`` → tensors a deployed client fetches beside the global state
    (offsite's distilled emulator) or None; ``remote``: the two halves of a deployed per-batch
    exchange (``RemoteHalves``)."""

    client_view: Callable  # (cfg) → the config of the model clients train
    server_model: Callable  # (cfg, label_names) → ServerModel | None
    check: Callable | None = None  # (cfg) → raises ValueError naming a field
    describe: Callable | None = None  # (cfg) → dict recorded in metrics.jsonl ("sharing" event)
    prepare_bundle: Callable | None = None  # (bundle, cfg): after the clients' model is built
    protocol: str | None = None  # the run protocol this mode runs as (transfer: its own loop)
    # (cfg, clients' bundle, server model, held-out texts, console) → a record for metrics.jsonl
    # or None: once the run's models and state are set up (offsite's distillation)
    prepare_run: Callable | None = None
    changes_model: bool = True
    held: Callable | None = None
    client_weights: Callable | None = None
    remote: RemoteHalves | None = None


SHARING_MODES: Registry[SharingMode] = Registry("sharing mode")

SHARING_MODES.register("none")(SharingMode(lambda cfg: cfg, lambda cfg, labels: None, changes_model=False))


def sharing_mode(cfg) -> SharingMode:
    """The configured sharing mode (``sharing.mode``)."""
    return SHARING_MODES.get(cfg.sharing.mode)
