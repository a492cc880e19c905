"""Server state as a value: written atomically after every round, read back to resume.

A run killed at any point (even ``kill -9``) resumes from the last finished round: the file is
written to a temporary name and renamed, so a half-written checkpoint is never read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedfm.types import Params

FORMAT = 1
FILENAME = "state.pt"


@dataclass
class ServerState:
    """Everything the round loop needs to continue: θ, optimizer and objective state, round."""

    round: int
    params: Params
    optimizer_state: dict
    server_control: Params | None = None
    engine_state: dict = field(default_factory=dict)
    elapsed_s: float = 0.0
    comm: dict = field(default_factory=dict)  # cumulative bytes up / down
    merged: dict = field(default_factory=dict)  # stack mode: ΔW merged into each LoRA layer's base
    privacy: dict = field(default_factory=dict)  # DP ledger and clip norm (fedfm.privacy.plan)


def save_checkpoint(folder: str | Path, state: ServerState) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILENAME
    tmp = folder / f".{FILENAME}.tmp-{os.getpid()}"
    payload = {"format": FORMAT, **state.__dict__}
    with open(tmp, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(folder: str | Path) -> ServerState | None:
    path = Path(folder) / FILENAME
    if not path.is_file():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.pop("format", None) != FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format")
    return ServerState(**payload)
