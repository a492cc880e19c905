"""The run's metrics log: one JSON object per line, per round (``event: round``) and per client."""

from __future__ import annotations

import json
import math
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


class MetricsLog:
    """Append-only JSONL file that can drop records past a round (when resuming)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def write(self, record: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(_clean(record)) + "\n")
            fh.flush()

    def reset(self) -> None:
        self.path.write_text("")

    def truncate_after(self, round_: int) -> None:
        kept = [r for r in read_jsonl(self.path) if r.get("round", 0) <= round_]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def rounds(self) -> list[dict]:
        return [r for r in read_jsonl(self.path) if r.get("event") == "round"]

    def has_round(self, round_: int) -> bool:
        return any(r["round"] == round_ for r in self.rounds())
