"""Computation sharing: what a client runs when it cannot run the whole foundation model.

A sharing mode, looked up by ``sharing.mode``, says what clients train (``client_view(cfg)``: the
config of the model they hold, an ordinary run's config) and which model the server evaluates and
exports (``server_model(cfg, label_names)``: a ``ServerModel`` with the FM and how a payload's
keys map onto it, or None when it is the clients' model). ``none``: every client runs the FM.
``offsite``: offsite tuning on an emulator (``fedfm.sharing.offsite``); ``split``: split
fine-tuning, the client running the bottom layers (``fedfm.sharing.split``).
"""

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
    prepare_run: Callable | None = (
        None  # (run): once its models and state are set up (offsite's distillation)
    )


SHARING_MODES: Registry[SharingMode] = Registry("sharing mode")

SHARING_MODES.register("none")(SharingMode(lambda cfg: cfg, lambda cfg, labels: None))

from fedfm.sharing import offsite as _offsite  # noqa: E402,F401  (registration)
from fedfm.sharing import split as _split  # noqa: E402,F401
from fedfm.sharing import transfer as _transfer  # noqa: E402,F401

__all__ = ["SHARING_MODES", "SharingMode"]
