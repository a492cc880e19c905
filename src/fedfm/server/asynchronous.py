"""Asynchronous aggregation: FedBuff (Nguyen et al. 2022) on the virtual clock.

Clients train continuously on the model version they pulled; the server buffers their updates
and, after every ``K = fedbuff.buffer_size``, steps with the buffer's staleness-weighted mean:

    while the buffer holds fewer than K updates:
        dispatch idle online clients (at most ``concurrency`` in flight; ``max_per_client`` each per
            buffer) on θ_v, v = the current version — the server records v for each of them
        advance the clock to the next event: a delivery, a dropout (a client went offline before
            delivering), or an idle client coming online
        a delivery τ = v_now − v_pulled server steps stale joins the buffer (staler than
            ``max_staleness``: rejected)
    Δ = Σ_i w_i s(τ_i) Δ_i / Σ_i w_i           (w_i: examples, or 1; s: fedfm.algorithms.staleness)
    θ ← server_optimizer(θ, Δ); v ← v + 1     (one "round" of the record and the checkpoint)

The server's halves of the pipeline (decoding, validation, the aggregator) run over the buffer
exactly as over a synchronous cohort; ``ServerRound.staleness`` scales each update. A client's
training happens when it is dispatched (it is a function of the version it pulled), so an update
in flight is a result waiting for its virtual delivery time; the checkpoint after every server
step holds the clock, the buffer and every update in flight, so a killed run resumes where its
last step left it. With every client alike, K = concurrency = the cohort and every client in
every cohort, no update is ever stale and FedBuff is synchronous FedAvg step for step.

Where the clients are remote (``fedfm server --mode async``), ``fedfm.deploy.asynchronous`` feeds
the same buffer from real processes, with real time for the virtual clock.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from fedfm.algorithms.staleness import staleness_weight
from fedfm.config import RunConfig
from fedfm.engines.base import Engine
from fedfm.seeding import numpy_rng
from fedfm.server.checkpoint import ServerState
from fedfm.server.round import ServerRound, Strategy, apply_round, round_context
from fedfm.server.systems import SystemsClock
from fedfm.server.tally import payload_nbytes
from fedfm.transforms.compression import serialized_nbytes
from fedfm.types import ClientResult, payload_from_wire


@dataclass(order=True)
class InFlight:
    """A dispatched client: when its slot frees (its delivery, or the moment it went offline)."""

    free_at: float
    seq: int
    client: int = field(compare=False)
    version: int = field(compare=False)
    start: float = field(compare=False)
    result: ClientResult | None = field(compare=False, default=None)  # None: it drops out at free_at
    wave: int | None = field(compare=False, default=None)  # secure aggregation: the wave it trains in


def encode_result(result: ClientResult) -> dict:
    """A client result as plain data for the checkpoint (tensors, numbers, strings)."""
    if result.failure is not None:
        return {"client": result.client_id, "failure": result.failure.as_dict()}
    p = result.update
    metrics = {k: v for k, v in dict(p.metrics).items() if isinstance(v, int | float | str)}
    return {
        "client": result.client_id,
        "kind": p.kind,
        "groups": p.tensors(),
        "n": p.num_examples,
        "metrics": metrics,
    }


def decode_result(data: dict) -> ClientResult:
    if "failure" in data:
        f = data["failure"]
        return ClientResult.failed(int(data["client"]), f["stage"], f["reason"])
    payload = payload_from_wire(data["kind"], data["groups"], data["n"], data["metrics"])
    return ClientResult(int(data["client"]), update=payload)


def with_staleness(result: ClientResult, tau: int) -> ClientResult:
    """The server's record of an update's staleness, in its metrics (overwriting whatever a
    client stated there: the version it trained on is the server's to know)."""
    return replace(
        result, update=replace(result.update, metrics={**dict(result.update.metrics), "staleness": tau})
    )


@dataclass(frozen=True)
class AsyncParts:
    """What FedBuff reads of a run: its config, the virtual clock, the cohort size (the default
    concurrency), the engine, the strategy, and ``server_round(state, t, cohort,
    on_client)``, the ``ServerRound`` of a task or step on a given server state."""

    cfg: RunConfig
    clock: SystemsClock
    cohort: int
    engine: Engine
    strategy: Strategy  # its pipeline builds each task's context
    server_round: Callable[..., ServerRound]


class FedBuff:
    """The asynchronous driver of a run: ``step(state, t, bar)`` fills a buffer and applies it (one
    server step) to the server state it is given, and returns the new one; ``state()`` is what the
    checkpoint keeps. Between steps it trains clients on the last state it returned."""

    def __init__(self, parts: AsyncParts, state: ServerState) -> None:
        self.parts, self.cfg, self.clock = parts, parts.cfg.fedbuff, parts.clock
        self.server = state  # the current version: what dispatched clients train on
        self.concurrency = self.cfg.concurrency or parts.cohort
        saved = state.clock
        self.seq = int(saved.get("seq", 0))  # orders the heap of updates in flight
        self.dispatches = int(saved.get("dispatches", 0))
        self.in_flight = [
            InFlight(
                float(x["free_at"]),
                int(x["seq"]),
                int(x["client"]),
                int(x["version"]),
                float(x["start"]),
                decode_result(x["result"]) if x.get("result") else None,
            )
            for x in saved.get("in_flight", [])
        ]
        heapq.heapify(self.in_flight)
        self.buffer = [(int(b["version"]), decode_result(b["result"])) for b in saved.get("buffer", [])]
        self.events: dict = {"failed": [], "dropped": [], "rejected": []}
        self.client_records: list[dict] = []  # the last step's accepted clients (the tally's records)

    def state(self) -> dict:
        flying = [
            {"free_at": f.free_at, "seq": f.seq, "client": f.client, "version": f.version, "start": f.start,
             "result": encode_result(f.result) if f.result is not None else None}
            for f in self._kept_in_flight()
        ]  # fmt: skip
        buffer = [{"version": v, "result": encode_result(r)} for v, r in self.buffer]
        return {
            **self.clock.state(),
            "in_flight": flying,
            "buffer": buffer,
            "dispatches": self.dispatches,
            "seq": self.seq,
        }

    def _kept_in_flight(self) -> list[InFlight]:
        """The updates in flight a resumed run can continue (here: all of them, results and all)."""
        return self.in_flight

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq - 1

    # -- dispatching -------------------------------------------------------------------------
    def _held(self, client: int) -> int:
        return sum(r.client_id == client for _, r in self.buffer) + sum(
            f.client == client for f in self.in_flight
        )

    def _idle(self, clients) -> list[int]:
        """Those of ``clients`` that may train for the current buffer: not in flight, under their cap."""
        busy = {f.client for f in self.in_flight}
        return [k for k in clients if k not in busy and self._held(k) < self.cfg.max_per_client]

    def _eligible(self) -> list[int]:
        """Idle clients that may train now for the current buffer (online, under their cap)."""
        return self._idle(self.clock.online(self.clock.time))

    def _pick(self, eligible: list[int], size: int) -> list[int]:
        """``size`` of ``eligible``, uniformly, from the run seed and the dispatch count."""
        rng = numpy_rng(self.parts.cfg.run.seed, "fedbuff", self.dispatches)
        self.dispatches += 1
        return sorted(int(c) for c in rng.choice(eligible, size=size, replace=False))

    def _launch(self, picks: list[int], task_round: int, wave: int | None = None):
        """Train ``picks`` now on the current version (the context of round ``task_round``) and put
        each update in flight until its virtual delivery, or until its client goes offline (its work
        lost); → (the ServerRound the context came from, the clients that failed)."""
        run, version, start = self.parts, self.server.round, self.clock.time
        rnd = run.server_round(self.server, task_round, picks)
        ctx = round_context(rnd, run.strategy.pipeline)
        down = {c: serialized_nbytes(rnd.sent(c)) for c in picks}
        failed = []
        for result in run.engine.run_cohort(self.server.params, picks, ctx):
            c = result.client_id
            if result.failure is not None:
                failed.append(result)
                continue
            steps = float(result.update.metrics.get("steps", 0.0))
            done = self.clock.arrival(c, start, steps, down[c], payload_nbytes(result.update)).finish
            if done is None:  # it goes offline first: its slot frees then
                done, result = self.clock.profiles[c].availability.online_until(start), None
            heapq.heappush(self.in_flight, InFlight(done, self._next_seq(), c, version, start, result, wave))
        return rnd, failed

    def _dispatch(self) -> None:
        free = self.concurrency - len(self.in_flight)
        eligible = self._eligible() if free > 0 else []
        if not eligible:
            return
        picks = self._pick(eligible, min(free, len(eligible)))
        # the context a synchronous round v + 1 would give (FedBuff at zero staleness is FedAvg)
        _, failed = self._launch(picks, self.server.round + 1)
        self.events["failed"] += [result.failure.as_dict() for result in failed]

    def _next_online(self) -> float:
        """When an idle client under its cap next comes online (inf: none will, or no slot is free)."""
        if len(self.in_flight) >= self.concurrency:
            return math.inf
        t = self.clock.time
        later = [
            self.clock.profiles[k].availability.next_online(t)
            for k in self._idle(range(len(self.clock.profiles)))
        ]
        return min((x for x in later if x > t), default=math.inf)

    def _next_event(self, hopeless: str) -> InFlight | None:
        """Advance the clock to the next event: an idle client coming online (→ None) or the
        earliest update in flight landing or dropping out (→ it, off the heap). ``hopeless``: the
        message when neither will ever happen."""
        arrive = self.in_flight[0].free_at if self.in_flight else math.inf
        online = self._next_online()
        if math.isinf(arrive) and math.isinf(online):
            from fedfm.server.systems import NobodyOnline

            raise NobodyOnline(hopeless)
        if online < arrive:
            self.clock.time = online
            return None
        f = heapq.heappop(self.in_flight)
        self.clock.time = f.free_at
        return f

    # -- the buffer --------------------------------------------------------------------------
    def fill(self) -> None:
        """Advance the clock until the buffer holds K updates."""
        while len(self.buffer) < self.cfg.buffer_size:
            self._dispatch()
            f = self._next_event(
                f"FedBuff at virtual time {self.clock.time:.0f} s: no client is in flight or will come "
                f"online again, and the buffer holds {len(self.buffer)} of {self.cfg.buffer_size} updates"
            )
            if f is None:
                continue
            if f.result is None:
                self.events["dropped"].append(
                    {"client": f.client, "reason": "went offline before delivering"}
                )
                continue
            self._admit(f, f.result)

    def _admit(self, f: InFlight, result: ClientResult) -> None:
        """A delivery joins the buffer with the staleness the server counts, unless it is staler
        than ``max_staleness`` (rejected, with the reason)."""
        tau = self.server.round - f.version
        if self.cfg.max_staleness is not None and tau > self.cfg.max_staleness:
            why = f"stale: trained on version {f.version}, {tau} server steps old"
            limit = f"fedbuff.max_staleness = {self.cfg.max_staleness}"
            self.events["rejected"].append({"client": f.client, "reason": f"{why} ({limit})"})
            return
        self.buffer.append((f.version, with_staleness(result, tau)))

    def step(self, state: ServerState, t: int, bar) -> tuple:
        """Server step ``t`` on ``state``: fill the buffer, apply it; → (the new server state, the
        record)."""
        self.server, start = state, self.clock.time
        self.fill()
        taken, self.buffer = self.buffer[: self.cfg.buffer_size], self.buffer[self.cfg.buffer_size :]
        cohort = [r.client_id for _, r in taken]
        rnd = self.parts.server_round(state, t, cohort, bar.start_round(t, len(cohort)))
        cfg = self.cfg
        rnd.staleness = lambda tau: staleness_weight(tau, cfg.staleness, cfg.staleness_a, cfg.staleness_b)
        new, record = apply_round(state, [r for _, r in taken], rnd, self.parts.strategy)
        return self._settle(new, record, rnd, [state.round - v for v, _ in taken], start)

    def _settle(
        self, state, record: dict, rnd, taus: list[int], start: float, mean: float | None = None
    ) -> dict:
        """The new state and the step's record: the events since the last step (failures,
        dropouts, stale updates), the staleness (``mean``: its mean, when not that of ``taus``),
        the clock. Later dispatches train on the new state; the driver takes it too."""
        events, self.events = self.events, {"failed": [], "dropped": [], "rejected": []}
        record.update(
            failed=[*events["failed"], *record["failed"]],
            rejected=[*events["rejected"], *record["rejected"]],
            dropped=events["dropped"],
            staleness=taus,
            staleness_mean=mean if mean is not None else sum(taus) / len(taus) if taus else 0.0,
            in_flight=len(self.in_flight),
            virtual_time_s=self.clock.time,
            round_virtual_s=self.clock.time - start,
            **self.clock.totals,
        )
        self.client_records = rnd.tally.client_records
        self.server = state
        return state, record


class RemoteFedBuff(FedBuff):
    """FedBuff over gRPC (``fedfm server --mode async``): the clients are real processes, the
    clock is the server's wall clock (seconds since the run began, continued across a resume).

    Every idle connected client under its cap gets a task on the current version; the server
    records the version it sent to whom (``InFlight``) and counts a reply's staleness from that
    record, never from the round the reply names. A client that does not answer within the round
    timeout has its task withdrawn (a late reply is refused) and fails with the reason. Tasks in
    flight when a server is killed are not resumed (their clients get new ones after the restart)."""

    def __init__(self, parts: AsyncParts, state: ServerState) -> None:
        super().__init__(parts, state)
        self.engine, self.timeout_s = parts.engine, parts.engine.round_timeout_s
        self.in_flight = []  # the tasks of a server that was killed died with it
        self.t0 = time.monotonic() - self.clock.time

    def _now(self) -> float:
        return time.monotonic() - self.t0

    def _dispatch(self) -> None:
        free = self.concurrency - len(self.in_flight)
        if free <= 0:
            return
        eligible = self._idle(self.engine.coord.connected())
        if not eligible:
            return
        picks = self._pick(eligible, min(free, len(eligible)))
        now, server = self._now(), self.server
        rnd = self.parts.server_round(server, self.dispatches, picks)  # a task number no other has: its seeds
        self.engine.post_each(server.params, picks, round_context(rnd, self.parts.strategy.pipeline))
        for c in picks:
            self.in_flight.append(InFlight(now + self.timeout_s, self._next_seq(), c, server.round, now))

    def fill(self) -> None:
        while len(self.buffer) < self.cfg.buffer_size:
            self._dispatch()
            if not self.in_flight:  # nobody connected and idle: wait for someone
                self.engine.wait_for_clients(1)
                self.clock.time = self._now()
                continue
            soonest = min(f.free_at for f in self.in_flight)
            result = self.engine.next_result(min(1.0, soonest - self._now()))
            self.clock.time = self._now()
            for f in [f for f in self.in_flight if f.free_at <= self.clock.time]:
                self.engine.withdraw(f.client)
                self.in_flight.remove(f)
                why = f"no update within the round timeout ({self.timeout_s:g} s)"
                self.events["failed"].append({"client": f.client, "stage": "timeout", "reason": why})
            sent = next(
                (f for f in self.in_flight if result is not None and f.client == result.client_id), None
            )
            if sent is None:
                continue
            self.in_flight.remove(sent)
            if result.failure is not None:
                self.events["failed"].append(result.failure.as_dict())
                continue
            self._admit(sent, result)

    def _kept_in_flight(self) -> list[InFlight]:
        return []  # tasks die with the server: a restarted one hands out new ones


@dataclass
class Wave:
    """Secure FedBuff: K clients dispatched together, online at once on one version, with one
    secure-aggregation protocol between them (set up by the pipeline's ``prepare``)."""

    rnd: object  # the ServerRound its protocol was set up in
    version: int
    pending: set[int]
    results: list = field(default_factory=list)


class SecureFedBuff(FedBuff):
    """FedBuff under secure aggregation (``secagg.enabled`` with ``run.mode = "async"``).

    The server may only learn sums, so a buffer is a **wave**: K idle clients that are online
    together are dispatched at once on the current version and run one masking protocol; the
    wave's buffer is applied when each of them delivered or dropped out (the protocol unmasks the
    survivors' sum, or the step is skipped below ``secagg.threshold``). Waves overlap — a new one
    starts whenever ``concurrency`` leaves room for K more and K eligible clients are online — so
    a wave applied after others is stale, and its whole sum is weighted by s(τ). A wave staler than
    ``max_staleness`` is rejected whole. The checkpoint keeps the clock but not the waves in
    flight (their protocol state is the clients'): a resumed run dispatches new waves."""

    def __init__(self, parts: AsyncParts, state: ServerState) -> None:
        super().__init__(parts, state)
        self.in_flight = []
        self.waves: dict[int, Wave] = {}
        self.ready: list[int] = []

    def _kept_in_flight(self) -> list[InFlight]:
        return []  # the waves' protocol state is the clients': a resumed run dispatches new waves

    def _dispatch(self) -> None:
        k = self.cfg.buffer_size
        while self.concurrency - len(self.in_flight) >= k:
            eligible = self._eligible()
            if len(eligible) < k:
                return
            picks, version = self._pick(eligible, k), self.server.round
            wave_id = self._next_seq()
            rnd, failed = self._launch(picks, self.dispatches, wave_id)  # its own keys, graph and seeds
            wave = self.waves[wave_id] = Wave(
                rnd, version, set(picks) - {r.client_id for r in failed}, failed
            )
            if not wave.pending:
                self.ready.append(wave_id)

    def fill(self) -> None:
        while not self.ready:
            self._dispatch()
            if self.ready:
                return
            f = self._next_event(
                f"secure FedBuff at virtual time {self.clock.time:.0f} s: fewer than "
                f"{self.cfg.buffer_size} clients can ever be online together again"
            )
            if f is None:
                continue
            wave = self.waves[f.wave]
            wave.pending.discard(f.client)
            if f.result is None:  # a dropout of the wave's protocol
                why = "went offline before delivering"
                self.events["dropped"].append({"client": f.client, "reason": why})
                wave.results.append(ClientResult.failed(f.client, "offline", why))
            else:
                wave.results.append(f.result)
            if not wave.pending:
                self.ready.append(f.wave)

    def step(self, state: ServerState, t: int, bar) -> tuple:
        self.server, start = state, self.clock.time
        while True:
            self.fill()
            wave = self.waves.pop(self.ready.pop(0))
            tau = state.round - wave.version
            if self.cfg.max_staleness is None or tau <= self.cfg.max_staleness:
                break
            why = f"stale: its wave trained on version {wave.version}, {tau} server steps old"
            for c in sorted(wave.rnd.cohort):
                limit = f"fedbuff.max_staleness = {self.cfg.max_staleness}"
                self.events["rejected"].append({"client": c, "reason": f"{why} ({limit})"})
        rnd, cfg = wave.rnd, self.cfg
        rnd.t, rnd.tau, rnd.on_client = t, tau, bar.start_round(t, len(rnd.cohort))
        rnd.staleness = lambda x: staleness_weight(x, cfg.staleness, cfg.staleness_a, cfg.staleness_b)
        new, record = apply_round(state, wave.results, rnd, self.parts.strategy)
        record["secagg"] = rnd.secure.report()
        return self._settle(new, record, rnd, [tau] * len(rnd.tally.accepted), start, mean=float(tau))
