"""Results as data: the head every results file carries, and its measurements.

A results file is JSON: ``benchmark`` (its name), ``config``, ``seeds``, ``fedfm_version``,
``machine`` (platform, CPU model and count, torch threads, GPUs), ``wall_s``, ``quick`` (whether
it was measured at the entry's reduced size), then either ``measurements`` — a list of
``{name, kind, group, seeds, values}`` records with one value per seed — or a benchmark's own
fields, which its catalogue entry maps to measurements by path (``extract``).

``kind`` says how a rerun is judged (``KINDS``): ``exact`` kinds (bytes, ε, counts) must come
back equal; ``interval`` kinds (accuracy, loss, perplexity, rounds) must fall in the committed 95%
interval; ``machine`` kinds (seconds, memory, throughput, ratios of them) are reported, and judged
only on a machine with the same signature (CPU model, CPU count, threads, GPUs).
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = 1
KINDS = {
    "accuracy": "interval",
    "loss": "interval",
    "perplexity": "interval",
    "score": "interval",
    "rounds": "interval",
    "bytes": "exact",
    "epsilon": "exact",
    "count": "exact",
    "seconds": "machine",
    "mb": "machine",
    "throughput": "machine",
    "ratio": "machine",
}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(**extra) -> dict:
    """Where a measurement ran: platform, CPU model and count, torch threads, GPUs (``extra``
    adds or overrides fields)."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpus": gpus,
        "python": platform.python_version(),
        "torch": torch.__version__,
        **extra,
    }


def signature(m: dict) -> tuple:
    """What must match for machine-dependent numbers to be judged: CPU model and count, threads, GPUs."""
    return (m.get("cpu"), m.get("cpus"), m.get("torch_threads"), tuple(m.get("gpus") or ()))


def stamp(name: str, config: dict, seeds: list[int], **extra) -> dict:
    """The head of a results file: the benchmark, its config and seeds, fedfm's version and the
    machine (``extra`` adds or overrides machine fields, e.g. the torch threads)."""
    import fedfm

    return {
        "benchmark": name,
        "format": FORMAT,
        "config": config,
        "seeds": seeds,
        "fedfm_version": fedfm.__version__,
        "machine": machine(**extra),
    }


@dataclass(frozen=True)
class Measurement:
    """One measured quantity over seeds (one value per seed), in one group (a table row)."""

    name: str
    kind: str
    values: list[float]
    seeds: list[int]
    group: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(
                f"measurement {self.name!r}: unknown kind {self.kind!r} (one of {sorted(KINDS)})"
            )
        if len(self.values) != len(self.seeds):
            raise ValueError(
                f"measurement {self.name!r}: {len(self.values)} values for {len(self.seeds)} seeds"
            )

    @property
    def key(self) -> tuple:
        return (self.name, tuple(sorted((k, str(v)) for k, v in self.group.items())))

    @property
    def judged_by(self) -> str:
        return KINDS[self.kind]

    def by_seed(self) -> dict[int, float]:
        return dict(zip(self.seeds, self.values, strict=True))

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "group": self.group,
            "seeds": self.seeds,
            "values": self.values,
        }


def lookup(data: Any, path: str) -> Any:
    """``data`` at a dotted ``path`` (``a.b.0.c``: list indices are numbers)."""
    for part in path.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def measurements(data: dict, extract: list[dict] | None = None) -> list[Measurement]:
    """A results file's measurements: its own list, or its fields mapped by ``extract``
    (``{name, path, kind}``: one value, measured at the file's seeds)."""
    if "measurements" in data:
        return [Measurement(**m) for m in data["measurements"]]
    seeds = list(data.get("seeds") or [0])[:1]
    return [Measurement(e["name"], e["kind"], [float(lookup(data, e["path"]))], seeds) for e in extract or []]


def write(path: str | Path, head: dict, found: list[Measurement], wall_s: float, quick: bool) -> dict:
    """Write a results file; returns what was written."""
    data = {**head, "wall_s": round(wall_s, 1), "quick": quick, "measurements": [m.to_dict() for m in found]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return data
