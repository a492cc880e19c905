"""Server state as a value, and per-client state, committed together after every round.

One SQLite file, ``checkpoint/state.sqlite``, holds the server state (θ, optimizer state, SCAFFOLD
control, DP ledger, round) as one row and every client's own state (SCAFFOLD control variate,
top-k residual) as one row per client. A round writes the server row and the rows of the clients
whose state changed in **one transaction**, so a crash at any point (even ``kill -9``) leaves the
state after the last finished round — server and clients consistent — and a round's write costs
the cohort's states, not every client's (at 1,000 SCAFFOLD clients the old single-file checkpoint
rewrote 310 MB a round). SQLite's journal makes the commit atomic and durable (``synchronous =
FULL``); each row carries a SHA-256 so a damaged file is reported as such, never half-read.

Rows hold ``torch.save`` bytes of plain dicts of tensors and numbers, read back with
``weights_only=True`` (no pickled code). A run folder of fedfm 0.1 (``checkpoint/state.pt``)
still resumes.
"""

from __future__ import annotations

import hashlib
import io
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedfm.types import Params

FORMAT = 2
FILENAME = "state.sqlite"
LEGACY = "state.pt"  # fedfm 0.1: one torch file, rewritten whole every round


class CheckpointError(ValueError):
    """A checkpoint that is missing where one is required, or damaged; the message says which."""


@dataclass
class ServerState:
    """Everything the round loop needs to continue: θ, optimizer and objective state, round."""

    round: int
    params: Params
    optimizer_state: dict
    server_control: Params | None = None
    objective_state: Params | None = None  # an objective's server half (FedDyn's h)
    engine_state: dict = field(default_factory=dict)
    elapsed_s: float = 0.0
    comm: dict = field(default_factory=dict)  # cumulative bytes up / down
    merged: dict = field(default_factory=dict)  # stack mode: ΔW merged into each LoRA layer's base
    privacy: dict = field(default_factory=dict)  # DP ledger and clip norm (fedfm.privacy.plan)
    clock: dict = field(default_factory=dict)  # virtual clock; FedBuff's buffer and in-flight updates


def _dumps(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _loads(blob: bytes, digest: str, what: str, path: Path):
    if hashlib.sha256(blob).hexdigest() != digest:
        raise CheckpointError(f"{path}: {what} is damaged (checksum mismatch); the run cannot resume from it")
    try:
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: {what} does not load ({type(err).__name__}: {err})") from None


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)  # explicit BEGIN / COMMIT below
    db.execute("PRAGMA synchronous = FULL")
    db.execute(
        "CREATE TABLE IF NOT EXISTS server (id INTEGER PRIMARY KEY CHECK (id = 0), format INTEGER, "
        "round INTEGER, sha256 TEXT, state BLOB)"
    )
    db.execute(
        "CREATE TABLE IF NOT EXISTS clients (client INTEGER PRIMARY KEY, round INTEGER, sha256 TEXT, "
        "state BLOB)"
    )
    return db


def save_checkpoint(
    folder: str | Path, state: ServerState, clients: Mapping[int, dict] | None = None
) -> Path:
    """Commit the server state and the changed clients' states in one transaction."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILENAME
    blob = _dumps(state.__dict__)
    rows = [(int(k), state.round, *_blob_row(v)) for k, v in (clients or {}).items()]
    db = _connect(path)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute(
            "INSERT OR REPLACE INTO server VALUES (0, ?, ?, ?, ?)",
            (FORMAT, state.round, hashlib.sha256(blob).hexdigest(), blob),
        )
        db.executemany("INSERT OR REPLACE INTO clients VALUES (?, ?, ?, ?)", rows)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    finally:
        db.close()
    (folder / LEGACY).unlink(missing_ok=True)  # a resumed 0.1 folder now lives in the database
    return path


def _open(path: Path) -> sqlite3.Connection:
    """A connection for reading an existing file. Read-write on purpose: a commit cut short by a
    crash leaves a hot journal, which only a writable connection rolls back (to the last commit)."""
    return sqlite3.connect(path)


def _blob_row(value: dict) -> tuple[str, bytes]:
    blob = _dumps(value)
    return hashlib.sha256(blob).hexdigest(), blob


def load_checkpoint(folder: str | Path) -> ServerState | None:
    """The last committed server state, or None when the folder has no checkpoint."""
    folder = Path(folder)
    path = folder / FILENAME
    if not path.is_file():
        return _load_legacy(folder / LEGACY)
    try:
        db = _open(path)
        try:
            row = db.execute("SELECT format, sha256, state FROM server WHERE id = 0").fetchone()
        finally:
            db.close()
    except sqlite3.DatabaseError as err:
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({err}); the run cannot resume from it"
        ) from None
    if row is None:
        return None  # created, never committed
    fmt, digest, blob = row
    if fmt != FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format {fmt}")
    return ServerState(**_loads(blob, digest, "the server state", path))


def _load_legacy(path: Path) -> ServerState | None:
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path} does not load ({type(err).__name__}: {err})") from None
    if payload.pop("format", None) != 1:
        raise CheckpointError(f"{path}: unsupported checkpoint format")
    return ServerState(**payload)


class ClientStore:
    """Read access to the committed per-client states of a checkpoint folder (one row per client)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / FILENAME

    def get(self, client_id: int) -> dict | None:
        if not self.path.is_file():
            legacy = _load_legacy(self.folder / LEGACY)
            states = legacy.engine_state.get("client_states", {}) if legacy else {}
            return states.get(str(client_id))
        db = _open(self.path)
        try:
            row = db.execute(
                "SELECT sha256, state FROM clients WHERE client = ?", (int(client_id),)
            ).fetchone()
        except sqlite3.DatabaseError as err:
            raise CheckpointError(f"{self.path} is not a readable checkpoint ({err})") from None
        finally:
            db.close()
        return None if row is None else _loads(row[1], row[0], f"client {client_id}'s state", self.path)

    def all(self) -> dict[int, dict]:
        """Every stored client state (tests and tools; a round never needs this)."""
        if not self.path.is_file():
            return {}
        db = _open(self.path)
        try:
            rows = db.execute("SELECT client, sha256, state FROM clients").fetchall()
        finally:
            db.close()
        return {k: _loads(blob, d, f"client {k}'s state", self.path) for k, d, blob in rows}

    def written_in(self, round_: int) -> list[int]:
        """The clients whose state the commit of ``round_`` wrote."""
        db = _open(self.path)
        try:
            return [
                k
                for (k,) in db.execute(
                    "SELECT client FROM clients WHERE round = ? ORDER BY client", (round_,)
                )
            ]
        finally:
            db.close()
