"""Shared by the experiment scripts: run one configured cell, keep results resumable in JSON."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Hashable
from pathlib import Path


def run_cell(overrides: list[str]):
    """Run the default experiment with ``overrides`` in a temporary folder; (result, seconds)."""
    import fedfm

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = fedfm.run(None, output=Path(tmp) / "r", overrides=overrides, progress=False)
    return result, time.perf_counter() - start


class CellStore:
    """Finished cells by key, saved after each one, so an interrupted experiment resumes."""

    def __init__(self, path: str | Path, key: Callable[[dict], Hashable]) -> None:
        self.path, self.key = Path(path), key
        rows = json.loads(self.path.read_text()) if self.path.exists() else []
        self.cells = {key(r): r for r in rows}

    def __contains__(self, key: Hashable) -> bool:
        return key in self.cells

    def add(self, row: dict) -> None:
        self.cells[self.key(row)] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(list(self.cells.values()), indent=1))


def run_grid(args, store: CellStore, grid, make_cell, describe, markdown) -> None:
    """Run every not-yet-finished cell of ``grid`` (key tuples), print a line per cell, then the
    markdown table of all finished cells (also written to ``args.md`` when given)."""
    for key in grid:
        if key in store:  # resumable: finished cells are kept
            continue
        c = make_cell(*key)
        store.add(c)
        print(describe(c), flush=True)
    table = markdown(list(store.cells.values()))
    print(table)
    if args.md:
        Path(args.md).write_text(table + "\n")
