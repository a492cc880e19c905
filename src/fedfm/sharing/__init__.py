"""Computation sharing: what a client runs when it cannot run the whole foundation model.

A sharing mode, looked up by ``sharing.mode``, says what clients train (``client_view(cfg)``: the
config of the model they hold, an ordinary run's config) and which model the server evaluates and
exports (``server_model(cfg, label_names)``: a ``ServerModel`` with the FM and how a payload's
keys map onto it, or None when it is the clients' model). ``none``: every client runs the FM.
``offsite``: offsite tuning on an emulator (``fedfm.sharing.offsite``); ``split``: split
fine-tuning, the client running the bottom layers (``fedfm.sharing.split``).
"""

from __future__ import annotations

from fedfm.sharing import offsite as _offsite  # noqa: E402,F401  (registration)
from fedfm.sharing import split as _split  # noqa: E402,F401
from fedfm.sharing import transfer as _transfer  # noqa: E402,F401
from fedfm.sharing.base import SHARING_MODES, RemoteHalves, SharingMode, sharing_mode  # noqa: F401

__all__ = ["SHARING_MODES", "RemoteHalves", "SharingMode", "sharing_mode"]
