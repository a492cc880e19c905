"""Every client's system profile: seconds per local step, link bandwidth, availability.

Drawn from the run seed alone (``client_profiles(cfg, n, seed)``), so a resumed run rebuilds the
same profiles and nothing about them needs checkpointing. Compute speed and bandwidth are
log-normal around the configured medians (σ = 0: every client alike; σ ≈ 1: heavy-tailed, a few
clients ten times slower than the median); availability is one of ``fedfm.systems.availability``'s
patterns. Or both come from traces in FedScale's format:

- the device trace (FedScale's ``client_device_capacity``): ``{client: {"computation": ms per
  example, "communication": kbit/s}}``; a step costs ``3 × batch_size × computation`` ms (forward
  and backward, as FedScale counts it), both directions run at ``communication``;
- the behaviour trace (``client_behave_trace``): ``{client: {"active": [s, …], "inactive": [s,
  …], "finish_time": s}}``: online from each ``active[i]`` to ``inactive[i]``, repeating every
  ``finish_time`` seconds.

Trace files are JSON, or FedScale's own pickles: those are read with an unpickler that builds
plain dicts, lists and numbers only (it refuses every class, so a pickle cannot run code). fedfm
client ``k`` takes the trace's ``k``-th client in sorted key order (cycling when the trace is shorter).
"""

from __future__ import annotations

import io
import json
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

from fedfm.seeding import derive_seed, numpy_rng
from fedfm.systems.availability import Always, Intervals, OnOff, diurnal


@dataclass(frozen=True)
class SystemProfile:
    step_s: float  # virtual seconds one local step (one optimizer step) takes
    down_bytes_s: float  # download bandwidth, bytes per second (inf: instant)
    up_bytes_s: float
    availability: object = Always()

    def as_dict(self) -> dict:
        return {"step_s": self.step_s, "down_bytes_s": self.down_bytes_s, "up_bytes_s": self.up_bytes_s}


UNIT = SystemProfile(1.0, math.inf, math.inf)  # no systems section: one virtual second per step


class TraceError(ValueError):
    """A trace file that cannot be read, or has the wrong shape; the message names the file."""


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):  # noqa: ARG002
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: traces hold plain data only")


def read_trace(path: str | Path) -> dict:
    """A FedScale trace (``.json``, or a plain-data pickle) as ``{client key: entry}``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        data = json.loads(raw) if path.suffix == ".json" else _PlainUnpickler(io.BytesIO(raw)).load()
    except (OSError, ValueError, pickle.UnpicklingError, EOFError) as err:
        raise TraceError(f"{path}: cannot read the trace ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict) or not data or not all(isinstance(v, dict) for v in data.values()):
        raise TraceError(f"{path}: a trace is a non-empty mapping of client → entry (FedScale's format)")
    return {k: data[k] for k in sorted(data, key=lambda k: (str(type(k)), k))}


def _entry(trace: dict, k: int, path, fields: tuple[str, ...]) -> dict:
    key = list(trace)[k % len(trace)]
    entry = trace[key]
    missing = [f for f in fields if f not in entry]
    if missing:
        raise TraceError(f"{path}: client {key!r} has no {', '.join(missing)}")
    return entry


def _behaviour(entry: dict, key, path) -> Intervals:
    try:
        active = [float(a) for a in entry["active"]]
        inactive = [float(a) for a in entry["inactive"]]
        period = float(entry.get("finish_time", math.inf))
        if len(inactive) < len(active):  # the last spell runs to the end of the period
            inactive.append(period)
        return Intervals(tuple(zip(active, inactive, strict=False)), period)
    except (TypeError, ValueError) as err:
        raise TraceError(f"{path}: client {key!r}'s behaviour entry: {err}") from None


def client_profiles(cfg, num_clients: int, seed: int, batch_size: int = 1) -> list[SystemProfile]:
    """The run's profiles (``cfg``: the ``[systems]`` section; ``batch_size``: the local batch, which
    a device trace's per-example time is multiplied by)."""
    rng = numpy_rng(seed, "systems")
    step = (
        cfg.step_s * rng.lognormal(0.0, cfg.step_sigma, num_clients)
        if cfg.step_sigma
        else [cfg.step_s] * num_clients
    )
    spread = (
        rng.lognormal(0.0, cfg.bandwidth_sigma, num_clients) if cfg.bandwidth_sigma else [1.0] * num_clients
    )
    phases = rng.random(num_clients)
    device = read_trace(cfg.device_trace) if cfg.device_trace else None
    behaviour = read_trace(cfg.behavior_trace) if cfg.behavior_trace else None
    profiles = []
    for k in range(num_clients):
        step_s, down, up = (
            float(step[k]),
            cfg.down_mbps * 1e6 / 8 * spread[k],
            cfg.up_mbps * 1e6 / 8 * spread[k],
        )
        if device is not None:
            e = _entry(device, k, cfg.device_trace, ("computation", "communication"))
            step_s = 3 * batch_size * float(e["computation"]) / 1000
            down = up = float(e["communication"]) * 1000 / 8
        if cfg.availability == "diurnal":
            avail = diurnal(cfg.online_fraction, cfg.period_s, float(phases[k]))
        elif cfg.availability == "random":
            off = cfg.mean_online_s * (1 - cfg.online_fraction) / cfg.online_fraction
            avail = OnOff(cfg.mean_online_s, off, (derive_seed(seed, "availability", k),))
        elif cfg.availability == "trace":
            key = list(behaviour)[k % len(behaviour)]
            avail = _behaviour(
                _entry(behaviour, k, cfg.behavior_trace, ("active", "inactive")), key, cfg.behavior_trace
            )
        else:
            avail = Always()
        profiles.append(SystemProfile(step_s, float(down), float(up), avail))
    return profiles
