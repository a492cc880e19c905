"""The run's metrics log: one JSON object per line, per round (``event: round``) and per client."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def _clean(value):
    """JSON has no NaN/Inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return records


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a crash at any point leaves one whole version."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX: the directory entry itself must be synced)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Temporary files an earlier crash left behind (``.name.tmp-PID``); removed, and returned."""
    stale = [p for p in Path(folder).glob(".*.tmp-*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


class MetricsLog:
    """Append-only JSONL file that can drop records past a round (when resuming)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def write(self, record: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(_clean(record)) + "\n")
            fh.flush()

    def reset(self) -> None:
        write_atomically(self.path, "")

    def truncate_after(self, round_: int) -> None:
        """Drop records past ``round_`` (a resumed run rewrites them): a new file, fsynced, renamed
        over the old one, then the folder fsynced — a crash leaves the old file or the new, whole."""
        kept = [r for r in read_jsonl(self.path) if r.get("round", 0) <= round_]
        write_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def rounds(self) -> list[dict]:
        return [r for r in read_jsonl(self.path) if r.get("event") == "round"]

    def has_round(self, round_: int) -> bool:
        return any(r["round"] == round_ for r in self.rounds())
