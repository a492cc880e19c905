"""Structured logs: every console note, warning and round row as one JSON line.

A run writes ``RUN/log.jsonl`` (the dashboard streams it); ``fedfm server --log-json PATH`` and
``fedfm client --log-json PATH`` write another copy where a log collector reads (``-``: stdout).
Each line: ``{"time": ISO 8601 UTC, "level": "info" | "warning", "source": "run" | "server" |
"client", "message": text}``, a round row also with ``"round"`` and its metrics. Writing is
thread-safe (a deployed server notes from its RPC threads) and never fails the run: an unwritable
log is said once and dropped.
"""

from __future__ import annotations

import datetime
import json
import sys
import threading
from pathlib import Path

_sinks: list[JsonLog] = []
_lock = threading.Lock()


class JsonLog:
    def __init__(self, path: str | Path, source: str, key: str) -> None:
        self.path, self.source, self.key = str(path), source, key
        self.fh = sys.stdout if self.path == "-" else open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, level: str, message: str, fields: dict) -> None:
        line = {
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
            "level": level,
            "source": self.source,
            "message": message,
            **fields,
        }
        self.fh.write(json.dumps(line, default=str) + "\n")
        self.fh.flush()

    def close(self) -> None:
        if self.fh is not sys.stdout:
            self.fh.close()


def attach(path: str | Path, source: str, key: str = "cli") -> JsonLog:
    """Start copying every message to ``path`` (JSON lines) until ``detach``. One log per ``key``
    at a time: a run's folder log (``key="run"``) replaces the previous run's in a process that
    runs several (a sweep), and ``--log-json`` (``key="cli"``) stays beside it."""
    sink = JsonLog(path, source, key)
    with _lock:
        for old in [s for s in _sinks if s.key == key]:
            _sinks.remove(old)
            old.close()
        _sinks.append(sink)
    return sink


def detach(sink: JsonLog) -> None:
    with _lock:
        if sink in _sinks:
            _sinks.remove(sink)
    sink.close()


def emit(level: str, message: str, **fields) -> None:
    """One message to every attached log (nothing when none is)."""
    with _lock:
        for sink in list(_sinks):
            try:
                sink.write(level, message, fields)
            except (OSError, ValueError) as err:  # a full disk or a closed file: drop this log
                _sinks.remove(sink)
                print(f"warning: structured log {sink.path} dropped: {err}", file=sys.stderr)


def logged(say, level: str = "info"):
    """``say`` (a print-like function) that also emits each message (clients' notes)."""

    def both(text, *args, **kwargs):
        say(text, *args, **kwargs)
        emit(level, str(text))

    return both


def tail(path: str | Path, lines: int = 30) -> list[dict]:
    """The last ``lines`` records of a JSON-lines log (the dashboard's view of a run's log)."""
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for raw in p.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]:
        try:
            out.append(json.loads(raw))
        except json.JSONDecodeError:
            continue
    return out
