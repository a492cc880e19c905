"""Rerun catalogue entries and judge them against the committed results.

A rerun writes its results under ``benchmarks/results/reproduced/`` (``<name>.json``, or
``<name>.quick.json`` at the quick size), beside the committed ones, and a comparison
(``comparison.md``, ``comparison.json``) of every entry rerun by the call. An entry measured on a
GPU is skipped where none is present ("needs a GPU; committed result only").
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from fedfm.reproduce.catalogue import Entry
from fedfm.reproduce.judge import Verdict, judge, passed, table
from fedfm.reproduce.results import measurements, signature, stamp, write

REPRODUCED = Path("benchmarks") / "results" / "reproduced"


@dataclass
class Outcome:
    entry: Entry
    quick: bool
    status: str  # "judged", "skipped: <why>", "failed: <why>"
    fresh: Path | None = None
    wall_s: float = 0.0
    verdicts: list[Verdict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        if self.status.startswith(("skipped", "recorded")):
            return True
        return self.status == "judged" and passed(self.verdicts)


def gpu_present() -> bool:
    import torch

    return torch.cuda.is_available()


def run_sweep_entry(entry: Entry, root: Path, out: Path, quick: bool, note: Callable[[str], None]) -> None:
    """The entry's sweep (at the quick size: its ``quick_set`` and ``quick_seeds``) into a
    results file at ``out``. Its cells run under ``benchmarks/results/reproduced/cells/``; a call
    stopped part-way (a crash, Ctrl-C) resumes from the cells it finished, and the folder is
    removed once the results file is written."""
    import shutil

    import fedfm
    from fedfm.reporting.sweep import load_sweep
    from fedfm.reproduce.sweeps import sweep_measurements

    source = root / entry.sweep
    data = tomllib.loads(source.read_text())
    sweep = data["sweep"]
    if sweep.get("base"):
        sweep["base"] = str((source.parent / sweep["base"]).resolve())
    if quick and entry.quick_seeds:
        sweep.setdefault("grid", {})["run.seed"] = list(entry.quick_seeds)
    overrides = list(entry.quick_set) if quick else []
    cells = root / REPRODUCED / "cells" / Path(entry.results_path(quick)).stem
    if (cells / "cells.toml").is_file() and (cells / "cells.toml").read_text() != tomli_w.dumps(data):
        shutil.rmtree(cells)  # cells of another version of the sweep: not resumed
    if cells.is_dir():
        note(f"    resuming the cells finished earlier in {cells}")
    cells.mkdir(parents=True, exist_ok=True)
    earlier = [json.loads(p.read_text()) for p in cells.glob("*/cell.json")]
    with tempfile.TemporaryDirectory(prefix=f"fedfm-reproduce-{entry.name}-") as tmp, contextlib.chdir(root):
        path = Path(tmp) / source.name
        path.write_text(tomli_w.dumps(data))
        (cells / "cells.toml").write_text(tomli_w.dumps(data))
        start = time.perf_counter()
        rows = fedfm.run_sweep(path, cells, progress=False, note=note, overrides=overrides)
        wall = time.perf_counter() - start + sum(r.get("wall_s") or 0.0 for r in earlier)
        spec = load_sweep(path)
    seeds = sorted({int(r.get("run.seed", 0)) for r in rows})
    config = {"sweep": entry.sweep, "overrides": overrides, "grid": spec.grid, "variants": spec.variants}
    head = stamp(f"{entry.group}/{entry.name}", config, seeds)
    write(out, head, sweep_measurements(rows, spec.axes, spec.metric, entry.metrics), wall, quick)
    shutil.rmtree(cells)


def run_command_entry(entry: Entry, root: Path, out: Path, quick: bool, note: Callable[[str], None]) -> None:
    """The entry's script, writing its results to ``out``."""
    fill = {"python": sys.executable, "out": str(out)}
    command = [part.format(**fill) for part in entry.command] + (list(entry.quick) if quick else [])
    note("$ " + " ".join(command))
    done = subprocess.run(command, cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout)[-1500:]
        raise RuntimeError(f"{entry.name}: the script exited with {done.returncode}:\n{tail}")


def reproduce(
    entries: list[Entry],
    root: Path,
    quick: bool = False,
    note: Callable[[str], None] = print,
    record: bool = False,
) -> list[Outcome]:
    """Rerun ``entries`` (at the quick size with ``quick``), judge each against its committed
    results, and write the comparison; one entry's failure does not stop the others. ``record``:
    measure and write the committed results themselves (a maintainer's step; nothing is judged)."""
    folder = root / REPRODUCED
    folder.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for i, entry in enumerate(entries, 1):
        note(f"[{i}/{len(entries)}] {entry.name} ({'quick' if quick else 'full size'})")
        outcome = Outcome(entry, quick, "judged")
        committed_path = root / entry.results_path(quick)
        if entry.gpu and not gpu_present():
            outcome.status = "skipped: needs a GPU; committed result only"
        elif not committed_path.is_file() and not record:
            outcome.status = f"skipped: no committed results ({entry.results_path(quick)})"
        else:
            fresh = committed_path if record else folder / Path(entry.results_path(quick)).name
            start = time.perf_counter()
            try:
                run = run_sweep_entry if entry.sweep else run_command_entry
                run(entry, root, fresh, quick, note)
                if record:
                    outcome.status, outcome.fresh = f"recorded: {entry.results_path(quick)}", fresh
                    outcome.wall_s = time.perf_counter() - start
                    note(f"    {outcome.status}")
                    outcomes.append(outcome)
                    continue
                committed_data, fresh_data = (json.loads(p.read_text()) for p in (committed_path, fresh))
                same = signature(committed_data.get("machine", {})) == signature(
                    fresh_data.get("machine", {})
                )
                outcome.verdicts = judge(
                    measurements(committed_data, entry.extract), measurements(fresh_data, entry.extract), same
                )
                outcome.fresh = fresh
            except Exception as err:  # recorded; the next entry runs
                outcome.status = f"failed: {type(err).__name__}: {err}"
            outcome.wall_s = time.perf_counter() - start
        note(f"    {summary(outcome)}")
        outcomes.append(outcome)
    write_comparison(folder, outcomes)
    return outcomes


def summary(o: Outcome) -> str:
    if o.status != "judged":
        return o.status
    counts: dict[str, int] = {}
    for v in o.verdicts:
        counts[v.verdict] = counts.get(v.verdict, 0) + 1
    said = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    return f"{'passed' if o.ok else 'FAILED'}: {said} ({o.wall_s / 60:.1f} min)"


def write_comparison(folder: Path, outcomes: list[Outcome]) -> None:
    parts = ["# fedfm reproduce: the rerun against the committed results", ""]
    for o in outcomes:
        parts += [f"## {o.entry.name} ({'quick' if o.quick else 'full size'})", "", summary(o), ""]
        if o.verdicts:
            parts += [table(o.verdicts), ""]
    (folder / "comparison.md").write_text("\n".join(parts))
    data = [
        {
            "entry": o.entry.name,
            "quick": o.quick,
            "status": o.status,
            "ok": o.ok,
            "wall_s": round(o.wall_s, 1),
            "verdicts": [v.__dict__ for v in o.verdicts],
        }
        for o in outcomes
    ]
    (folder / "comparison.json").write_text(json.dumps(data, indent=1) + "\n")


def listing(entries: list[Entry], quick: bool = False) -> str:
    """The catalogue as a table: name, group, cost in CPU-minutes (2 cores), notes; and the total."""
    gpu = gpu_present()
    lines = [
        "| entry | group | CPU-min (2 cores) | quick | documented in | notes |",
        "| --- | --- | ---: | ---: | --- | --- |",
    ]
    for e in entries:
        notes = []
        if e.gpu and not gpu:
            notes.append("needs a GPU; committed result only")
        if e.dp:
            notes.append("DP: noise_seed set, so the noise reproduces")
        if e.note:
            notes.append(e.note)
        lines.append(
            f"| {e.name} | {e.group} | {e.cost_min:g} | {e.quick_cost_min:g} | {e.doc} | {'; '.join(notes)} |"
        )
    runnable = [e for e in entries if gpu or not e.gpu]
    total, total_quick = sum(e.cost_min for e in runnable), sum(e.quick_cost_min for e in runnable)
    lines.append(
        f"\n{len(entries)} entries; {total:g} CPU-minutes in all, {total_quick:g} at the quick size."
    )
    return "\n".join(lines)
