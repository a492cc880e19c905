"""The virtual clock of a run: who is online to be sampled, when each client delivers, which
deliveries a synchronous round keeps (over-selection, deadline), and the run's totals.

    cohort  = clock.select(t, m, seed, rng)        # online clients only; ceil(m × over_selection)
    results = engine.run_cohort(θ, cohort, ctx)     # real training: real steps, real bytes
    kept, record = clock.settle(results, m, down_bytes)   # first m by virtual finish time

Its state (the time, the totals) is a plain dict in the checkpoint (``ServerState.clock``); the
profiles are a function of the seed and are rebuilt on resume.
"""

from __future__ import annotations

import math

from fedfm.algorithms.sampling import sample_cohort
from fedfm.server.tally import payload_nbytes
from fedfm.systems.clock import Arrival, finish_time, keep_first, work_seconds
from fedfm.systems.profiles import UNIT, client_profiles

TOTALS = ("virtual_compute_s_total", "virtual_work_s_total", "dropped_bytes_up_total")


class NobodyOnline(RuntimeError):
    """No client is ever online again: the run cannot go on."""


class SystemsClock:
    def __init__(self, cfg, num_clients: int, state: dict | None = None) -> None:
        """``cfg``: the run config. Without ``[systems] enabled`` every client is alike and always
        online at one virtual second per local step (FedBuff's order of arrival then follows the
        work each client does)."""
        sys = cfg.systems
        if sys.enabled:
            self.profiles = client_profiles(sys, num_clients, cfg.run.seed, cfg.training.batch_size)
        else:
            self.profiles = [UNIT] * num_clients
        self.over_selection, self.deadline_s = sys.over_selection, sys.deadline_s
        # the cohort is drawn from the online clients, or over-selected: not sample_cohort's draw
        self.shapes_cohort = sys.enabled and (sys.availability != "always" or sys.over_selection > 1)
        state = state or {}
        self.time = float(state.get("time", 0.0))
        self.totals = {k: float(state.get(k, 0.0)) for k in TOTALS}

    def state(self) -> dict:
        return {"time": self.time, **self.totals}

    def online(self, t: float) -> list[int]:
        return [k for k, p in enumerate(self.profiles) if p.availability.online_until(t) is not None]

    def wait_for_anyone(self) -> list[int]:
        """The clients online now, advancing the clock to the next time one is."""
        nxt = min((p.availability.next_online(self.time) for p in self.profiles), default=math.inf)
        if math.isinf(nxt):
            raise NobodyOnline(f"at virtual time {self.time:.0f} s no client is ever online again")
        self.time = max(self.time, nxt)
        return self.online(self.time)

    def select(self, t: int, wanted: int, seed: int, rng=None) -> list[int]:
        """Round ``t``'s cohort: ``ceil(wanted × over_selection)`` of the clients online now (all of
        them when fewer are), uniformly; when everyone is online and there is no over-selection,
        exactly ``sample_cohort``'s draw."""
        available = self.wait_for_anyone()
        size = min(len(available), math.ceil(wanted * self.over_selection - 1e-9))
        return [available[i] for i in sample_cohort(len(available), size, seed, t, rng)]

    def arrival(self, client: int, start: float, steps: float, down_bytes: float, up_bytes: float) -> Arrival:
        """When a client that starts at ``start`` delivers (None: it drops out), and what it spent;
        the spending is added to the run's totals."""
        profile = self.profiles[client]
        seconds = work_seconds(profile, steps, down_bytes, up_bytes)
        compute = steps * profile.step_s
        self.totals["virtual_compute_s_total"] += compute
        self.totals["virtual_work_s_total"] += seconds
        return Arrival(client, finish_time(profile, start, seconds), seconds, compute)

    def settle(self, results, wanted: int, down_bytes) -> tuple[list, dict]:
        """A synchronous round's results → (the kept ones, the record's fields). ``down_bytes``:
        client → bytes it downloads. Failures pass through (they are tallied as failures)."""
        start, arrivals, by_client = self.time, [], {}
        for r in results:
            by_client[r.client_id] = r
            if r.failure is None:
                steps = float(r.update.metrics.get("steps", 0.0))
                arrivals.append(
                    self.arrival(r.client_id, start, steps, down_bytes(r.client_id), payload_nbytes(r.update))
                )
        kept, dropped, end = keep_first(arrivals, start, wanted, self.deadline_s)
        lost = sum(payload_nbytes(by_client[c].update) for c in dropped)
        self.totals["dropped_bytes_up_total"] += lost
        self.time = end
        keep = set(kept)
        out = [r for r in results if r.failure is not None or r.client_id in keep]
        record = {
            "virtual_time_s": end,
            "round_virtual_s": end - start,
            "client_compute_s": sum(a.compute_s for a in arrivals),
            "dropped": [{"client": c, "reason": why} for c, why in sorted(dropped.items())],
            "dropped_bytes_up": lost,
            **self.totals,
        }
        return out, record
