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
``weights_only=True`` (no pickled code). A state whose tensors exceed ``INLINE_MAX`` bytes (a
full fine-tuning θ with FedAdam's two moments passes SQLite's 1,000,000,000-byte row limit long
before it fills a disk) keeps its tensors in a safetensors file beside the database instead,
named by its SHA-256; the row holds the rest and the file's name and digest. The file is written
and fsynced, then renamed into place and the folder fsynced, and only then is the row committed,
so a kill at any point leaves the last committed row and the file it names whole; files no
committed row names (the previous round's, one cut short) are removed after the next commit. A
run folder of fedfm 0.1 (``checkpoint/state.pt``) still resumes.
"""

from __future__ import annotations

import hashlib
import io
import os
import sqlite3
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedfm.reporting.metrics import fsync_folder
from fedfm.types import Params

FORMAT = 2
FORMAT_FILES = 3  # the row names a safetensors file holding the state's tensors
FILENAME = "state.sqlite"
LEGACY = "state.pt"  # fedfm 0.1: one torch file, rewritten whole every round
INLINE_MAX = 256 << 20  # bytes of tensors a row holds itself; a larger state's go to a file
TENSOR = "__tensor__"  # the skeleton's stand-in for a tensor kept in the file


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


def _split(value, tensors: dict):
    """``value`` with every tensor replaced by ``{TENSOR: key}`` and put in ``tensors``."""
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value
        return {TENSOR: key}
    if isinstance(value, dict):
        return {k: _split(v, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_split(v, tensors) for v in value)
    return value


def _join(value, tensors: Mapping):
    if isinstance(value, dict):
        if set(value) == {TENSOR}:
            return tensors[value[TENSOR]]
        return {k: _join(v, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_join(v, tensors) for v in value)
    return value


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_tensors(folder: Path, stem: str, tensors: dict) -> tuple[str, str]:
    """``tensors`` as ``{stem}-{sha256}.safetensors`` in ``folder``, durable before it is named;
    → (file name, digest)."""
    from safetensors.torch import save_file

    seen, flat = set(), {}
    for key, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        flat[key] = t.clone() if ptr in seen else t  # safetensors refuses shared storage
        seen.add(ptr)
    tmp = folder / f".{stem}.tmp-{os.getpid()}"
    save_file(flat, str(tmp))
    fsync_folder(tmp)  # a file syncs the same way
    digest = _file_digest(tmp)
    name = f"{stem}-{digest}.safetensors"
    os.replace(tmp, folder / name)
    fsync_folder(folder)
    return name, digest


def _row(value: dict, folder: Path, stem: str, inline_max: int) -> tuple[int, str, bytes]:
    """(format, digest, blob) of a state: inline while its tensors are at most ``inline_max``
    bytes, else its tensors in a file (``_write_tensors``) that the blob names."""
    tensors: dict = {}
    skeleton = _split(value, tensors)
    if sum(t.numel() * t.element_size() for t in tensors.values()) <= inline_max:
        return FORMAT, *_blob_row(value)
    name, digest = _write_tensors(folder, stem, tensors)
    blob = _dumps({"skeleton": skeleton, "file": name, "sha256": digest})
    return FORMAT_FILES, hashlib.sha256(blob).hexdigest(), blob


def _value(fmt: int, blob: bytes, digest: str, what: str, path: Path):
    """The state a row holds (reading its tensor file when it names one)."""
    value = _loads(blob, digest, what, path)
    if fmt == FORMAT:
        return value
    if fmt != FORMAT_FILES:
        raise CheckpointError(f"{path}: unsupported checkpoint format {fmt}")
    from safetensors.torch import load_file

    file = path.parent / str(value["file"])
    if not file.is_file():
        raise CheckpointError(f"{path}: {what}'s tensors ({file.name}) are missing; the run cannot resume")
    if _file_digest(file) != value["sha256"]:
        raise CheckpointError(f"{file}: {what}'s tensors are damaged (checksum mismatch)")
    return _join(value["skeleton"], load_file(str(file)))


def _temporaries(folder: Path) -> list[Path]:
    """Tensor files this module began and never renamed (a write cut short)."""
    return [*folder.glob(".server.tmp-*"), *folder.glob(".client-*.tmp-*")]


def _remove_unnamed(folder: Path, db: sqlite3.Connection) -> None:
    """Tensor files no committed row names (the rows before this commit, or a write cut short)."""
    named = set()
    for (blob,) in db.execute(
        "SELECT state FROM server WHERE format = ? UNION ALL SELECT state FROM clients WHERE format = ?",
        (FORMAT_FILES, FORMAT_FILES),
    ):
        named.add(torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)["file"])
    for file in [*folder.glob("*.safetensors"), *_temporaries(folder)]:
        if file.name not in named:
            file.unlink(missing_ok=True)


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
    columns = [row[1] for row in db.execute("PRAGMA table_info(clients)")]
    if "format" not in columns:  # a database written before client rows could name a file
        db.execute(f"ALTER TABLE clients ADD COLUMN format INTEGER DEFAULT {FORMAT}")
    return db


def save_checkpoint(
    folder: str | Path,
    state: ServerState,
    clients: Mapping[int, dict] | None = None,
    inline_max: int = INLINE_MAX,
) -> Path:
    """Commit the server state and the changed clients' states in one transaction (a state whose
    tensors exceed ``inline_max`` bytes: its tensors in a file, durable before the commit)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILENAME
    fmt, digest, blob = _row(state.__dict__, folder, "server", inline_max)
    rows = []
    for k, v in (clients or {}).items():
        c_fmt, c_digest, c_blob = _row(v, folder, f"client-{int(k)}", inline_max)
        rows.append((int(k), state.round, c_digest, c_blob, c_fmt))
    db = _connect(path)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT OR REPLACE INTO server VALUES (0, ?, ?, ?, ?)", (fmt, state.round, digest, blob))
        db.executemany(
            "INSERT OR REPLACE INTO clients (client, round, sha256, state, format) VALUES (?, ?, ?, ?, ?)",
            rows,
        )
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    else:  # committed: what no row names any more goes; failing to remove it loses nothing
        if any(folder.glob("*.safetensors")) or _temporaries(folder):
            try:
                _remove_unnamed(folder, db)
            except OSError as err:
                warnings.warn(f"{folder}: an old checkpoint file could not be removed ({err})", stacklevel=2)
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
    if fmt not in (FORMAT, FORMAT_FILES):
        raise CheckpointError(f"{path}: unsupported checkpoint format {fmt}")
    return ServerState(**_value(fmt, blob, digest, "the server state", path))


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
            row = db.execute("SELECT * FROM clients WHERE client = ?", (int(client_id),)).fetchone()
        except sqlite3.DatabaseError as err:
            raise CheckpointError(f"{self.path} is not a readable checkpoint ({err})") from None
        finally:
            db.close()
        return None if row is None else self._state(row)

    def _state(self, row: tuple) -> dict:
        """A client row (client, round, sha256, state[, format]) as the state it holds."""
        fmt = row[4] if len(row) > 4 and row[4] is not None else FORMAT
        return _value(fmt, row[3], row[2], f"client {row[0]}'s state", self.path)

    def all(self) -> dict[int, dict]:
        """Every stored client state (tests and tools; a round never needs this)."""
        if not self.path.is_file():
            return {}
        db = _open(self.path)
        try:
            rows = db.execute("SELECT * FROM clients").fetchall()
        finally:
            db.close()
        return {row[0]: self._state(row) for row in rows}

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
