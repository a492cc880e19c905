"""The federated server over gRPC: the core round loop with an engine whose clients are remote.

The round loop (``fedfm.loop.Run``) is unchanged: it samples the cohort, validates, aggregates,
steps the server optimizer, evaluates, checkpoints after every round and resumes. Only the engine
differs: ``GrpcEngine.run_cohort`` hands each sampled client a task and yields results as they
arrive, until every client answered or the round deadline passed. A client that is not connected
is left out at once, one that does not answer in time at the deadline; the round completes with
the rest (``sampling.min_clients`` decides whether that is enough).

Clients authenticate with a per-client token (``tokens`` file: one ``name token`` pair per line;
client ids follow the file's order). An unknown token is refused with ``UNAUTHENTICATED`` and
never receives a task. Transport security is TLS with the server's certificate, optionally mutual
TLS (clients present certificates signed by ``client_ca``); plaintext needs ``insecure=True``.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from fedfm.deploy import fedfm_pb2 as pb
from fedfm.deploy import fedfm_pb2_grpc as rpc
from fedfm.deploy.wire import WireError, chunks, context_header, join, pack_tensors, unpack_tensors
from fedfm.types import ClientFailure, ClientResult, Params, RoundContext, Update

POLL_S = 5.0  # how long an idle GetTask waits for work before answering "wait"
CONNECTED_S = 3 * POLL_S  # a client seen this recently counts as connected
MAX_MESSAGE = 8 << 20  # per message; payloads are chunked at 1 MiB


class DeployError(ValueError):
    """A deployment that cannot start (certificates, tokens, config); the message says why."""


def read_tokens(path: str | Path) -> list[tuple[str, str]]:
    """``name token`` per line (``#`` comments); client ids are the line order, from 0."""
    pairs = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise DeployError(f"{path}:{n}: expected 'name token', got {line!r}")
        pairs.append((parts[0], parts[1]))
    if not pairs:
        raise DeployError(f"{path}: no client tokens")
    if len({t for _, t in pairs}) != len(pairs) or len({n for n, _ in pairs}) != len(pairs):
        raise DeployError(f"{path}: client names and tokens must be unique")
    return pairs


def bearer(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and value.startswith("Bearer "):
            return value[len("Bearer ") :]
    return None


@dataclass
class Member:
    client_id: int
    name: str
    last_seen: float = 0.0

    def connected(self, now: float) -> bool:
        return now - self.last_seen < CONNECTED_S


@dataclass
class Coordinator:
    """State shared by the gRPC handler threads and the round loop, under one condition variable."""

    members: dict[str, Member]  # by token
    config_toml: str
    label_names: list[str]
    run_name: str
    cond: threading.Condition = field(default_factory=threading.Condition)
    tasks: dict[int, tuple[int, str, bytes]] = field(default_factory=dict)  # id → (round, header, blob)
    results: queue.Queue = field(default_factory=queue.Queue)
    round: int = 0
    waiting_for: set[int] = field(default_factory=set)
    done: bool = False

    def member(self, context) -> Member:
        """The authenticated caller, or abort the call with UNAUTHENTICATED."""
        token = bearer(context.invocation_metadata())
        m = self.members.get(token) if token else None
        if m is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown or missing client token")
        m.last_seen = time.monotonic()
        return m

    def connected(self) -> list[int]:
        now = time.monotonic()
        return sorted(m.client_id for m in self.members.values() if m.connected(now))


class FedFMServicer(rpc.FedFMServicer):
    def __init__(self, coord: Coordinator, note=print) -> None:
        self.coord, self.note = coord, note

    def Join(self, request, context):
        m = self.coord.member(context)
        self.note(f"client {m.client_id} ({m.name}) joined from {context.peer()}")
        c = self.coord
        return pb.JoinReply(
            client_id=m.client_id,
            config_toml=c.config_toml,
            label_names=json.dumps(c.label_names),
            run=c.run_name,
        )

    def GetTask(self, request, context):
        m, c = self.coord.member(context), self.coord
        deadline = time.monotonic() + POLL_S
        with c.cond:
            while True:
                task = c.tasks.get(m.client_id)
                if c.done:
                    header, blob = json.dumps({"status": "done"}), b""
                    break
                if task is not None and m.client_id in c.waiting_for:  # not yet delivered this round
                    _, header, blob = task
                    break
                left = deadline - time.monotonic()
                if left <= 0 or not context.is_active():
                    header, blob = json.dumps({"status": "wait"}), b""
                    break
                c.cond.wait(left)
        m.last_seen = time.monotonic()
        for text, data in chunks(json.loads(header), blob):
            yield pb.Chunk(header=text, data=data)

    def SubmitUpdate(self, request_iterator, context):
        m, c = self.coord.member(context), self.coord
        try:
            header, blob = join((ch.header, ch.data) for ch in request_iterator)
            rnd = int(header["round"])
        except (WireError, KeyError, ValueError, TypeError) as err:
            return pb.SubmitReply(accepted=False, reason=f"malformed update message: {err}")
        with c.cond:
            if rnd != c.round or m.client_id not in c.waiting_for:
                return pb.SubmitReply(
                    accepted=False, reason=f"not expecting an update for round {rnd} from you"
                )
            c.waiting_for.discard(m.client_id)
        step = header.get("step")
        item = header if step else decode_result(m.client_id, header, blob)
        c.results.put((rnd, step, m.client_id, item))
        return pb.SubmitReply(accepted=True)


def decode_result(client_id: int, header: dict, blob: bytes) -> ClientResult:
    """A client's message as the round loop's ClientResult; undecodable bytes become a failure."""
    if header.get("failed"):
        return ClientResult(client_id, failure=ClientFailure(client_id, "train", str(header["failed"])))
    try:
        groups = unpack_tensors(blob)
        metrics = {k: float(v) for k, v in dict(header.get("metrics", {})).items()}
        update = Update(groups.get("p", {}), int(header["num_examples"]), metrics, groups.get("c"))
    except (WireError, KeyError, ValueError, TypeError) as err:
        return ClientResult(
            client_id, failure=ClientFailure(client_id, "decode", f"{type(err).__name__}: {err}")
        )
    return ClientResult(client_id, update=update)


class GrpcEngine:
    """Hands cohort members their task and yields their results; the deadline bounds each round."""

    def __init__(
        self,
        coord: Coordinator,
        jobs: Sequence,
        round_timeout_s: float,
        min_available: int,
        wait_timeout_s: float,
        note=print,
    ) -> None:
        self.coord, self.jobs, self.round_timeout_s = coord, list(jobs), round_timeout_s
        self.min_available, self.wait_timeout_s, self.note = min_available, wait_timeout_s, note

    def wait_for_clients(self, want: int) -> int:
        """Block until ``want`` clients are connected or the wait times out; how many are."""
        stop = time.monotonic() + self.wait_timeout_s
        while len(self.coord.connected()) < want and time.monotonic() < stop:
            time.sleep(0.2)
        return len(self.coord.connected())

    def _post(self, rnd: int, headers: dict[int, dict], blob: bytes = b"") -> None:
        c = self.coord
        with c.cond:
            c.round = rnd
            c.tasks = {k: (rnd, json.dumps(h), blob) for k, h in headers.items()}
            c.waiting_for = set(c.tasks)
            c.cond.notify_all()

    def _collect(self, rnd: int, step: str | None, pending: set[int]) -> Iterator[tuple[int, object]]:
        """(client, reply) as they arrive until all ``pending`` answered or the deadline passed."""
        c = self.coord
        deadline = time.monotonic() + self.round_timeout_s
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
            c.tasks, c.waiting_for = {}, set()

    def exchange(self, rnd: int, step: str, messages: dict[int, dict]) -> dict[int, dict]:
        """One secure-aggregation step: a message to each listed connected client, their replies
        back; clients that are absent, fail or miss the deadline are left out (they drop out)."""
        online = set(self.coord.connected())
        headers = {
            k: {"status": "secagg", "round": rnd, "step": step, "message": m} for k, m in messages.items()
        }
        self._post(rnd, {k: h for k, h in headers.items() if k in online})
        replies = {}
        for client, header in self._collect(rnd, step, set(messages) & online):
            if "error" in header:
                self.note(
                    f"round {rnd}: client {client} failed secure aggregation step {step}: {header['error']}"
                )
            else:
                replies[client] = header["reply"]
        return replies

    def start_secure(self, cohort: list[int], layout, secagg_cfg, graph_seed: int, rnd: int):
        from fedfm.deploy.secure import RemoteSecureRound

        self.wait_for_clients(self.min_available)
        return RemoteSecureRound.start(self.exchange, cohort, layout, secagg_cfg, graph_seed, rnd)

    def run_cohort(
        self, global_params: Params, cohort: Sequence[int], ctx: RoundContext
    ) -> Iterator[ClientResult]:
        if ctx.secure is None:  # under secure aggregation the wait came before the key exchange
            self.wait_for_clients(self.min_available)  # e.g. for clients reconnecting after a restart
        blob = pack_tensors({"p": global_params, "c": ctx.server_control})
        base = {"status": "train", **context_header(ctx), "deadline_s": self.round_timeout_s}
        online = set(self.coord.connected())
        if ctx.secure is not None:  # only clients that set up this round's protocol can take part
            online &= set(ctx.secure.server.shared)
        absent = [k for k in cohort if k not in online]
        self._post(ctx.round, {k: {**base, "rank": self.jobs[k].rank} for k in cohort if k in online}, blob)
        for k in absent:
            yield ClientResult(k, failure=ClientFailure(k, "connect", "not connected when the round started"))
        pending = {k for k in cohort if k in online}
        for _, result in self._collect(ctx.round, None, pending):
            yield result
        for k in sorted(pending):
            reason = f"no update within the round deadline ({self.round_timeout_s:g} s)"
            yield ClientResult(k, failure=ClientFailure(k, "timeout", reason))

    def state_dict(self) -> dict:
        return {}  # client state (SCAFFOLD, error feedback) stays with each client

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass(frozen=True)
class Security:
    """TLS material (PEM file paths) or an explicit plaintext choice."""

    cert: str | None = None
    key: str | None = None
    client_ca: str | None = None  # set: mutual TLS, clients must present a certificate it signed
    insecure: bool = False

    def server_credentials(self):
        if self.insecure:
            return None
        if not (self.cert and self.key):
            raise DeployError(
                "TLS needs --cert and --key (PEM files; see docs/deployment.md to make them with openssl), "
                "or --insecure for plaintext on a trusted network"
            )
        try:
            key, cert = Path(self.key).read_bytes(), Path(self.cert).read_bytes()
            ca = Path(self.client_ca).read_bytes() if self.client_ca else None
        except OSError as err:
            raise DeployError(f"cannot read TLS material: {err}") from None
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
        )


def start_server(coord: Coordinator, address: str, security: Security, note=print) -> tuple[grpc.Server, int]:
    """A started gRPC server on ``address`` (``HOST:PORT``, port 0 picks a free one); (server, port)."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=256), options=options)
    rpc.add_FedFMServicer_to_server(FedFMServicer(coord, note), server)
    creds = security.server_credentials()
    port = server.add_insecure_port(address) if creds is None else server.add_secure_port(address, creds)
    if port == 0:
        raise DeployError(f"cannot listen on {address}")
    server.start()
    return server, port


def serve(
    config,
    address: str,
    tokens: str | Path,
    security: Security,
    *,
    output=None,
    resume=None,
    round_timeout_s: float = 600.0,
    min_available: int | None = None,
    wait_timeout_s: float = 600.0,
    progress: bool = True,
):
    """Run a federated experiment whose clients connect over gRPC; returns the RunResult.

    Before round 1 the server waits up to ``wait_timeout_s`` for every client; before each round
    for at least ``min_available`` (default ``sampling.min_clients``). A round then waits up to
    ``round_timeout_s`` for the cohort's updates.
    """
    import fedfm.api as api
    from fedfm.loop import Run

    cfg, run_dir = api.prepare_run(config, output=output, resume=resume)
    check_deployable(cfg)
    pairs = read_tokens(tokens)
    if len(pairs) != cfg.partition.num_clients:
        raise DeployError(
            f"{tokens} lists {len(pairs)} clients but partition.num_clients = {cfg.partition.num_clients}"
        )
    from fedfm.reporting.console import ConsoleReporter

    note = ConsoleReporter(enabled=progress).note
    if security.insecure:
        ConsoleReporter(enabled=True).warn("insecure mode: traffic and tokens travel in plaintext")
    members = {token: Member(k, name) for k, (name, token) in enumerate(pairs)}
    coord = Coordinator(members, cfg.to_toml(), [], run_dir.name)
    least = cfg.sampling.min_clients if min_available is None else min_available

    def factory(bundle, task, jobs, program, cfg=None):
        return GrpcEngine(coord, jobs, round_timeout_s, least, wait_timeout_s, note)

    run = Run(cfg, run_dir, progress=progress, engine_factory=factory, resume=resume is not None)
    coord.label_names = list(run.data.train.label_names)
    server, port = start_server(coord, address, security, note)
    try:
        note(f"listening on port {port}; waiting for clients")
        connected = run.engine.wait_for_clients(cfg.partition.num_clients)  # everyone, once, before round 1
        note(f"{connected} of {cfg.partition.num_clients} clients connected; starting")
        result = run.execute()
    finally:
        with coord.cond:
            coord.done = True
            coord.cond.notify_all()
        time.sleep(min(POLL_S, 2.0))  # let polling clients hear "done"
        server.stop(grace=1.0)
    return result


def check_deployable(cfg) -> None:
    """What the gRPC engine does not carry (yet), refused with the reason before any work."""
    if cfg.secagg.enabled and cfg.strategy.weighting != "uniform" and not cfg.validation.max_num_examples:
        raise DeployError(
            "secagg over gRPC with example-count weights needs validation.max_num_examples: the server "
            "cannot see client data sizes, and the masking field is sized from that bound"
        )
    if cfg.attack.kind != "none":
        raise DeployError("attack.* simulates attacks in-process; real clients send what they send")
    if cfg.synthetic.mode != "none":
        raise DeployError("synthetic.mode is for simulations (clients bring their own data in a deployment)")
    if cfg.task.baselines:
        raise DeployError("task.baselines needs every client's data in one place: simulation only")
