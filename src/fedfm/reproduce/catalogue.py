"""The documented experiments: ``benchmarks/reproduce.toml`` in a source checkout.

Each ``[[entry]]`` names one results file and how to make it again:

- ``name``, ``group`` (``all`` selects every entry), ``doc`` (where it is documented);
- ``results``: the committed results file (relative to the checkout); its quick counterpart is
  the same name with ``.quick.json``;
- either ``sweep`` (a sweep file: its cells over ``run.seed`` become measurements, see
  ``fedfm.reproduce.sweeps``; ``quick_set`` and ``quick_seeds`` make the quick size) or
  ``command`` (a script; ``{python}`` and ``{out}`` are filled in; ``quick`` adds arguments),
  with ``extract`` mapping a script's own fields to measurements; a sweep's ``metrics`` name more
  of each cell's final values to keep (e.g. ``personal_local_accuracy_mean``, ``client_flops``);
- ``cost_min`` and ``quick_cost_min``: CPU-minutes on this project's 2-core reference machine;
- ``gpu``: measured on a GPU (rerun only where one is present); ``dp``: a DP entry (``noise_seed``
  is set in its config, so its noise — and therefore its numbers — come back the same).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

CATALOGUE = Path("benchmarks") / "reproduce.toml"


@dataclass(frozen=True)
class Entry:
    name: str
    group: str
    doc: str
    results: str
    cost_min: float
    quick_cost_min: float
    sweep: str | None = None
    command: list[str] = field(default_factory=list)
    quick: list[str] = field(default_factory=list)
    quick_set: list[str] = field(default_factory=list)
    quick_seeds: list[int] = field(default_factory=list)
    extract: list[dict] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    gpu: bool = False
    dp: bool = False
    note: str = ""

    def __post_init__(self) -> None:
        if (self.sweep is None) == (not self.command):
            raise ValueError(f"reproduce entry {self.name!r}: give exactly one of sweep and command")

    def results_path(self, quick: bool) -> str:
        return self.results.removesuffix(".json") + ".quick.json" if quick else self.results


def find_root(start: str | Path | None = None) -> Path:
    """The source checkout holding ``benchmarks/reproduce.toml`` (from ``start`` or the working
    folder upwards)."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / CATALOGUE).is_file():
            return folder
    raise FileNotFoundError(
        f"no {CATALOGUE} in {here} or above: fedfm reproduce runs in a source checkout of fedfm "
        "(git clone …; cd fedfm), or give --root"
    )


def load(root: Path) -> list[Entry]:
    """Every entry of the checkout's catalogue, checked (unknown fields and duplicate names refused)."""
    raw = tomllib.loads((root / CATALOGUE).read_text())
    known = set(Entry.__dataclass_fields__)
    entries, names = [], set()
    for i, item in enumerate(raw.get("entry", [])):
        unknown = set(item) - known
        if unknown:
            raise ValueError(f"{CATALOGUE} entry {i + 1}: unknown field(s) {sorted(unknown)}")
        entry = Entry(**item)
        if entry.name in names:
            raise ValueError(f"{CATALOGUE}: entry {entry.name!r} appears twice")
        names.add(entry.name)
        entries.append(entry)
    return entries


def select(entries: list[Entry], wanted: list[str]) -> list[Entry]:
    """The entries named by ``wanted`` (entry names, group names, or ``all``), in catalogue order."""
    if not wanted or "all" in wanted:
        return list(entries)
    known = {e.name for e in entries} | {e.group for e in entries}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        import difflib

        hints = [difflib.get_close_matches(w, sorted(known), n=1) for w in unknown]
        said = ", ".join(
            f"{w!r}" + (f" (did you mean {h[0]!r}?)" if h else "")
            for w, h in zip(unknown, hints, strict=True)
        )
        raise ValueError(f"no reproduce entry or group {said}; `fedfm reproduce --list` lists them")
    return [e for e in entries if e.name in wanted or e.group in wanted]
