"""The engine whose clients are remote: tasks posted to gRPC handlers, results collected with a deadline.

Serving (TLS, tokens, the gRPC servicer) stays in ``fedfm.deploy``; this engine only posts tasks
to the ``Coordinator`` the handlers share and collects what they put in its queue.

``GrpcEngine.run_cohort`` hands each sampled client a task and yields results as they arrive,
until every client answered or the round deadline passed. A client that is not connected is left
out at once, one that does not answer in time at the deadline; the round completes with the rest
(``sampling.min_clients`` decides whether that is enough). Secure-aggregation steps are the same
kind of exchange (``exchange``). The ``Coordinator`` is the state the handler threads and the
round loop share: what each client may receive and send this round, and how large it may be.
"""

from __future__ import annotations

import functools
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from fedfm.deploy.auth import Roster
from fedfm.types import ClientFailure, ClientResult, Params, RoundContext
from fedfm.wire import context_header
from fedfm.wire.stream import TensorStream, transfer_s

HEADER_SLACK = 64 << 10  # payload bytes a message may carry beyond its expected size (safetensors header)
STEP_BYTES_PER_PEER = 16 << 10  # a secure-aggregation reply: keys, shares, signatures per peer


@dataclass
class Coordinator:
    """State shared by the gRPC handler threads and the round loop, under one condition variable."""

    roster: Roster
    config_toml: str
    label_names: list[str]
    run_name: str
    cond: threading.Condition = field(default_factory=threading.Condition)
    # id → (round, header, payload): one TensorStream per round, streamed to every client from θ itself
    tasks: dict[int, tuple[int, str, TensorStream]] = field(default_factory=dict)
    limits: dict[int, int] = field(default_factory=dict)  # id → most bytes its reply may carry
    results: queue.Queue = field(default_factory=queue.Queue)
    round: int = 0
    step: str | None = None  # the secure-aggregation step now asked for (None: training)
    waiting_for: set[int] = field(default_factory=set)
    done: bool = False
    outcome: dict = field(default_factory=lambda: {"ok": True})  # what "done" tells clients
    # split fine-tuning: the server's sessions (``fedfm.sharing.split.server.SplitServer``): open_round,
    # attach, close_round for the round loop; admit and step for the SplitStep handler
    split: object = None
    model_weights: tuple[dict, bytes] | None = None  # (header, blob) a client fetches with GetModel
    spool_dir: str | None = None  # where arriving updates are spilled (the run folder's spool/)
    # "async" (FedBuff): every client has its own task; the version a reply counts against is the
    # one the server recorded when it posted the task, whatever round the reply's header names
    mode: str = "sync"

    def connected(self) -> list[int]:
        return self.roster.connected()

    def admit(self, client_id: int, header: dict) -> int:
        """Whether a reply from ``client_id`` with ``header`` is expected now; its byte limit.
        Raises ``ValueError`` (with the reason) before any payload is read."""
        rnd, step = header.get("round"), header.get("step")
        with self.cond:
            if self.mode == "async":
                rnd = self.tasks[client_id][0] if client_id in self.tasks else None
            if rnd != self.round or step != self.step or client_id not in self.waiting_for:
                what = f"round {str(rnd)[:20]} step {str(step)[:20]}"
                raise ValueError(f"not expecting a message for {what} from you")
            return self.limits.get(client_id, HEADER_SLACK)

    def refuse(self, client_id: int, header: dict | None, reason: str) -> None:
        """A message of ``client_id`` was refused (malformed, oversized, not admitted): if it was
        the reply the round waits for — it names the current round and step, or it could not be
        read — the client is out of this round (or step) at once, with the reason, and anything
        it sends again is refused; the round need not wait for its deadline."""
        with self.cond:
            if client_id not in self.waiting_for:
                return
            names = header is not None and (header.get("round"), header.get("step")) != (
                self.round,
                self.step,
            )
            if self.mode != "async" and names:
                return  # a message for another round or step: not the reply this one waits for
            self.waiting_for.discard(client_id)
            self.tasks.pop(client_id, None)
            why = f"its message was refused: {reason}"[:500]
            if self.step is None:
                item = ClientResult(client_id, failure=ClientFailure(client_id, "decode", why))
            else:
                item = {"error": why}
            self.results.put((self.round, self.step, client_id, item))

    def delivered(self, client_id: int, rnd, step) -> bool:
        """Mark ``client_id``'s reply to (round, step) as in; False if it is not, or no longer,
        expected (a slow upload for a round that has moved on must not mark the next one)."""
        with self.cond:
            if self.mode == "async":  # the task it answers is the one the server posted it
                if step is not None or client_id not in self.waiting_for:
                    return False
                self.waiting_for.discard(client_id)
                self.tasks.pop(client_id, None)
                return True
            if rnd != self.round or step != self.step or client_id not in self.waiting_for:
                return False
            self.waiting_for.discard(client_id)
            return True


def payload_limit(params: Params, control: Params | None, secure_length: int | None) -> int:
    """The most bytes a client's update may carry: its encoded delta (at most 3× the dense tensors:
    top-k's indices and values) and control delta, or its masked vector, plus header slack."""
    dense = sum(v.numel() * v.element_size() for v in params.values())
    dense += sum(v.numel() * v.element_size() for v in (control or {}).values())
    if secure_length is not None:
        return 8 * secure_length + HEADER_SLACK
    return 3 * dense + 256 * len(params) + HEADER_SLACK


class GrpcEngine:
    """Hands cohort members their task and yields their results; the deadline bounds each round."""

    remote = True  # clients hold their own data and state: a deployment

    @classmethod
    def factory(cls, coord: Coordinator, *args, **kwargs):
        """An engine factory for ``Run``: the jobs come from the run's setup, the other arguments
        are ``__init__``'s after them (remote: the server loads only its test split)."""
        return _GrpcFactory(functools.partial(cls, coord), args, kwargs)

    def __init__(
        self,
        coord: Coordinator,
        jobs: Sequence,
        round_timeout_s: float,
        min_available: int,
        wait_timeout_s: float,
        note=print,
        verifier=None,
    ) -> None:
        """``verifier``: the client CA's (``CertificateVerifier``) for signed secure aggregation."""
        self.verifier = verifier
        # clients a secure-aggregation protocol named as offenders: out for the rest of the run
        self.excluded: dict[int, str] = {}
        self.secure = None  # this round's RemoteSecureRound, whose offenders are excluded after it
        self.exclude_offenders = True  # secagg.exclude_offenders, read when a secure round starts
        self.coord, self.jobs, self.round_timeout_s = coord, list(jobs), round_timeout_s
        self.min_available, self.wait_timeout_s, self.note = min_available, wait_timeout_s, note

    def wait_for_clients(self, want: int) -> int:
        """Block until ``want`` clients are connected or the wait times out; how many are."""
        stop = time.monotonic() + self.wait_timeout_s
        while len(self.coord.connected()) < want and time.monotonic() < stop:
            time.sleep(0.2)
        return len(self.coord.connected())

    def _post(
        self, rnd: int, step: str | None, headers: dict[int, dict], stream: TensorStream, limits
    ) -> None:
        c = self.coord
        with c.cond:
            c.round, c.step = rnd, step
            c.tasks = {k: (rnd, json.dumps(h), stream) for k, h in headers.items()}
            c.limits = {k: limits for k in headers}
            c.waiting_for = set(c.tasks)
            c.cond.notify_all()

    def wait_s(self, moved: int = 0) -> float:
        """How long a round waits for its replies: the round's timeout plus the time ``moved``
        bytes (the task down, the update up) may take on the slowest link planned for."""
        return self.round_timeout_s + transfer_s(moved)

    def _collect(
        self, rnd: int, step: str | None, pending: set[int], wait_s: float | None = None
    ) -> Iterator[tuple[int, object]]:
        """(client, reply) as they arrive until all ``pending`` answered or ``wait_s`` passed
        (default: the round's timeout)."""
        c = self.coord
        deadline = time.monotonic() + (self.round_timeout_s if wait_s is None else wait_s)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                got_round, got_step, client, item = c.results.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if got_round == rnd and got_step == step and client in pending:
                pending.discard(client)
                yield client, item
        with c.cond:
            c.tasks, c.waiting_for, c.limits = {}, set(), {}

    def exchange(self, rnd: int, step: str, messages: dict[int, dict]) -> dict[int, dict]:
        """One secure-aggregation step: a message to each listed connected client, their replies
        back; clients that are absent, fail or miss the deadline are left out (they drop out).
        A reply is attributed to the client the transport authenticated, whatever it says."""
        online = set(self.coord.connected())
        headers = {
            k: {"status": "secagg", "round": rnd, "step": step, "message": m} for k, m in messages.items()
        }
        limit = HEADER_SLACK + STEP_BYTES_PER_PEER * max(1, len(messages))
        self._post(rnd, step, {k: h for k, h in headers.items() if k in online}, TensorStream({}), limit)
        replies = {}
        for client, header in self._collect(rnd, step, set(messages) & online):
            if "error" in header or not isinstance(header.get("reply"), dict):
                reason = str(header.get("error", "no reply"))[:300]
                self.note(f"round {rnd}: client {client} failed secure aggregation step {step}: {reason}")
            else:
                replies[client] = header["reply"]
        return replies

    def start_secure(self, cohort: list[int], layout, secagg_cfg, graph_seed: int, rnd: int):
        from fedfm.deploy.secure import RemoteSecureRound

        self.wait_for_clients(self.min_available)
        names = {m.client_id: m.name for m in self.coord.roster.members}
        identities = (self.verifier, names) if self.verifier is not None else None
        self._exclude_offenders()  # the last round's protocol has run to its end by now
        self.exclude_offenders = secagg_cfg.exclude_offenders
        members = [k for k in cohort if k not in self.excluded]
        self.secure = RemoteSecureRound.start(
            self.exchange, members, layout, secagg_cfg, graph_seed, rnd, identities
        )
        return self.secure

    def _exclude_offenders(self) -> None:
        """Clients the last secure round named (a malformed protocol message, inconsistent or
        wrong shares, a masked input of the wrong shape) take no further part in the run."""
        secure, self.secure = self.secure, None
        if secure is None or not self.exclude_offenders:
            return
        for o in [*secure.rejected, *secure.server.offenders]:
            if o["client"] not in self.excluded:
                why = f"named by secure aggregation in round {secure.round}: {o['reason']}"
                self.excluded[o["client"]] = why[:500]
                self.note(f"client {o['client']} is excluded from the rest of the run: {o['reason']}")

    def run_cohort(
        self, global_params: Params, cohort: Sequence[int], ctx: RoundContext
    ) -> Iterator[ClientResult]:
        if ctx.secure is None:  # under secure aggregation the wait came before the key exchange
            self.wait_for_clients(self.min_available)  # e.g. for clients reconnecting after a restart
        for k in cohort:
            if k in self.excluded:
                yield ClientResult(k, failure=ClientFailure(k, "excluded", self.excluded[k]))
        cohort = [k for k in cohort if k not in self.excluded]
        online = set(self.coord.connected())
        split = self.coord.split
        sent = global_params
        if split is not None:  # split: clients get only their part; the server keeps the rest
            sent = split.open_round(global_params, [k for k in cohort if k in online], ctx)
        stream = TensorStream({"p": sent, "c": ctx.server_control})
        out_of_protocol = set()
        if ctx.secure is not None:  # only clients that set up this round's protocol can take part
            out_of_protocol = online - set(ctx.secure.server.shared)
            online -= out_of_protocol
        absent = [k for k in cohort if k not in online]
        base = {"status": "train", "deadline_s": self.round_timeout_s}
        headers = {
            k: {**base, **context_header(ctx, k), "rank": self.jobs[k].rank} for k in cohort if k in online
        }
        length = ctx.secure.layout.length if ctx.secure is not None else None
        limit = payload_limit(sent, ctx.server_control, length)
        self._post(ctx.round, None, headers, stream, limit)
        for k in absent:
            if k in out_of_protocol:
                why = "dropped out of this round's secure-aggregation key exchange"
                yield ClientResult(k, failure=ClientFailure(k, "secagg", why))
            else:
                yield ClientResult(
                    k, failure=ClientFailure(k, "connect", "not connected when the round started")
                )
        pending, allowed = set(headers), self.wait_s(stream.nbytes + limit)
        try:
            for _, result in self._collect(ctx.round, None, pending, allowed):
                yield split.attach(result) if split is not None else result
        finally:
            if split is not None:
                split.close_round()

        for k in sorted(pending):
            reason = f"no update within the round deadline ({allowed:.3g} s)"
            yield ClientResult(k, failure=ClientFailure(k, "timeout", reason))

    # -- asynchronous mode (fedfm.deploy.asynchronous): one task per client, results as they come
    def post_each(self, global_params: Params, clients: Sequence[int], ctx: RoundContext) -> None:
        """Hand each of ``clients`` a training task on ``global_params``, leaving other clients'
        tasks in place (the coordinator then admits each client's reply to its own task)."""
        stream = TensorStream({"p": global_params, "c": ctx.server_control})
        base = {"status": "train", "deadline_s": self.round_timeout_s, "asynchronous": True}
        limit = payload_limit(global_params, ctx.server_control, None)
        c = self.coord
        with c.cond:
            c.mode, c.round, c.step = "async", None, None
            for k in clients:
                header = {**base, **context_header(ctx, k), "rank": self.jobs[k].rank}
                c.tasks[k] = (None, json.dumps(header), stream)
                c.limits[k] = limit
                c.waiting_for.add(k)
            c.cond.notify_all()

    def next_result(self, timeout_s: float) -> ClientResult | None:
        """The next training result any client delivered, or None after ``timeout_s``."""
        try:
            _, step, _, item = self.coord.results.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            return None
        return item if step is None else None

    def withdraw(self, client: int) -> None:
        """Take back a client's task (it timed out): a late reply is refused."""
        c = self.coord
        with c.cond:
            c.tasks.pop(client, None)
            c.limits.pop(client, None)
            c.waiting_for.discard(client)

    def state_dict(self) -> dict:
        """Who is excluded, and why; client state (SCAFFOLD, error feedback) stays with each client."""
        self._exclude_offenders()  # the round is over: its offenders are known
        return {"excluded": {str(k): why for k, why in self.excluded.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.excluded = {int(k): why for k, why in (state or {}).get("excluded", {}).items()}

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class _GrpcFactory:
    make: Callable
    args: tuple
    kwargs: dict
    remote = True

    def __call__(self, setup) -> GrpcEngine:
        return self.make(setup.jobs, *self.args, **self.kwargs)
