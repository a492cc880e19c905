"""The federated server over gRPC: the core round loop with an engine whose clients are remote.

The round loop (``fedfm.server.driver.Run``) is unchanged: it samples the cohort, validates, aggregates,
steps the server optimizer, evaluates, checkpoints after every round and resumes. Only the engine
differs (``fedfm.deploy.engine``). Identities come from the transport (``fedfm.deploy.auth``):
per-client tokens bound to their certificates under mutual TLS, or certificates alone.

Nothing a client sends can crash the server. Every handler catches every error of its own
caller's message and answers with the reason; a message is checked before it is read (caller,
round, step, then a byte limit from the expected payload), every header is strict JSON with
typed, bounded fields, and one identity may hold only a few calls open. The gRPC server caps
concurrent calls, sends keepalives, and cuts a stream that stalls. When the run ends — well or
not — every polling client hears it, with the outcome.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from fedfm.deploy import fedfm_pb2 as pb
from fedfm.deploy import fedfm_pb2_grpc as rpc
from fedfm.deploy.auth import DeployError, Revocations, Roster, certificate_warnings, expiring, peer_pem
from fedfm.deploy.engine import Coordinator, GrpcEngine
from fedfm.deploy.provision import REVOKED
from fedfm.deploy.view import client_config_toml
from fedfm.reporting.logs import emit
from fedfm.sharing import sharing_mode
from fedfm.transforms.validation import UNBOUNDED_WARNING, influence_bound
from fedfm.types import ClientFailure, ClientResult, payload_from_wire
from fedfm.wire import (
    WireError,
    bounded_int,
    chunks,
    join,
    pack_tensors,
    received_metrics,
    unpack_tensors,
)
from fedfm.wire.stream import BrokenStream, TensorStream, open_groups, spool

__all__ = ["DeployError", "GrpcEngine", "Security", "check_deployable", "serve", "start_server"]

POLL_S = 5.0  # how long an idle GetTask waits for work before answering "wait"
MAX_MESSAGE = 8 << 20  # per message; payloads are chunked at 1 MiB
MAX_CONCURRENT_RPCS = 512  # beyond this, calls are refused at once (RESOURCE_EXHAUSTED)
STALL_S = 30.0  # an upload stream that delivers no chunk for this long is cut
MAX_EXAMPLES = 2**31 - 1

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 60_000),  # ping idle clients, drop dead connections
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),  # clients may ping every 10 s
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_connection_idle_ms", 10 * 60_000),
]


class Watchdog:
    """Calls ``on_stall`` when ``limit_s`` pass without a chunk: restarted by every chunk, so a
    long honest upload goes on while a stream that stops sending is cut."""

    def __init__(self, limit_s: float, on_stall) -> None:
        self.limit_s, self.on_stall = limit_s, on_stall
        self.lock = threading.Lock()
        self.timer: threading.Timer | None = None
        self.restart()

    def restart(self) -> None:
        with self.lock:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = threading.Timer(self.limit_s, self.on_stall)
            self.timer.daemon = True
            self.timer.start()

    def stop(self) -> None:
        with self.lock:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = None

    def passing(self, chunks_in):
        for chunk in chunks_in:
            self.restart()
            yield chunk


class FedFMServicer(rpc.FedFMServicer):
    def __init__(self, coord: Coordinator, note=print) -> None:
        self.coord, self.note = coord, note

    def _enter(self, context):
        member, why = self.coord.roster.identify(context)
        if member is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
        if not self.coord.roster.enter(member):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many calls open from this client")
        return member

    def Join(self, request, context):
        m = self._enter(context)
        try:
            self.note(f"client {m.client_id} ({m.name}) joined from {context.peer()}")
            emit("info", f"{m.name} joined", event="joined", client=m.client_id, name=m.name)
            pem = peer_pem(context)
            soon = expiring(pem) if pem else None
            if soon:
                self.note(f"warning: site {m.name}: {soon}")
            c = self.coord
            return pb.JoinReply(
                client_id=m.client_id,
                config_toml=c.config_toml,
                label_names=json.dumps(c.label_names),
                run=c.run_name,
                model_weights=c.model_weights is not None,
            )
        finally:
            self.coord.roster.leave(m)

    def GetTask(self, request, context):
        m, c = self._enter(context), self.coord
        try:
            deadline = time.monotonic() + POLL_S
            with c.cond:
                while True:
                    task = c.tasks.get(m.client_id)
                    if c.done:
                        header, stream = json.dumps({"status": "done", **c.outcome}), TensorStream({})
                        break
                    if task is not None and m.client_id in c.waiting_for:  # not yet answered
                        _, header, stream = task
                        break
                    left = deadline - time.monotonic()
                    if left <= 0 or not context.is_active():
                        header, stream = json.dumps({"status": "wait"}), TensorStream({})
                        break
                    c.cond.wait(left)
            for text, data in stream.message(json.loads(header)):  # from θ's tensors, chunk by chunk
                yield pb.Chunk(header=text, data=data)
        finally:
            c.roster.leave(m)

    def SubmitUpdate(self, request_iterator, context):
        m, c = self._enter(context), self.coord
        watchdog = Watchdog(STALL_S, context.cancel)  # a stream that stops delivering is cut
        seen: dict = {}  # the header, once read: whether the refused message was this round's reply
        try:
            return self._submit(m, c, watchdog.passing(request_iterator), seen)
        except Exception as err:  # whatever the message did, the caller hears why; the server goes on
            reason = f"malformed message: {type(err).__name__}: {err}"[:500]
            c.refuse(m.client_id, seen.get("header"), reason)
            return pb.SubmitReply(accepted=False, reason=reason)
        finally:
            watchdog.stop()
            c.roster.leave(m)

    def Heartbeat(self, request, context):
        m = self._enter(context)  # entering and leaving mark the client as seen now
        self.coord.roster.leave(m)
        return pb.HeartbeatReply()

    def GetModel(self, request, context):
        m, c = self._enter(context), self.coord
        try:
            header, blob = c.model_weights or ({"error": "this run ships no model weights"}, b"")
            for text, data in chunks(header, blob):
                yield pb.Chunk(header=text, data=data)
        finally:
            c.roster.leave(m)

    def SplitStep(self, request_iterator, context):
        m, c = self._enter(context), self.coord
        watchdog = Watchdog(STALL_S, context.cancel)
        try:
            header, blob = self._split_step(m, c, watchdog.passing(request_iterator))
        except Exception as err:  # the caller hears why; its session (if any) has failed
            header, blob = {"error": f"the cut exchange failed: {type(err).__name__}: {err}"[:500]}, b""
        finally:
            watchdog.stop()
            c.roster.leave(m)
        for text, data in chunks(header, blob):
            yield pb.Chunk(header=text, data=data)

    def _split_step(self, m, c: Coordinator, request_iterator) -> tuple[dict, bytes]:
        split = c.split
        if split is None:
            return {"error": "this run does not use split fine-tuning"}, b""

        def admit(header: dict) -> int:
            with c.cond:  # a training round, and this caller still owes its update
                if c.step is not None or m.client_id not in c.waiting_for or header.get("round") != c.round:
                    raise WireError("not expecting a cut message from you now")
            try:
                return split.admit(m.client_id, header)
            except ValueError as err:
                raise WireError(str(err)) from None

        try:
            header, blob = join(((ch.header, ch.data) for ch in request_iterator), admit=admit)
        except WireError as err:
            return {"error": str(err)}, b""
        reply, tensors = split.step(m.client_id, header, unpack_tensors(blob), len(blob))
        return reply, pack_tensors(tensors)

    def _submit(self, m, c: Coordinator, request_iterator, seen: dict) -> pb.SubmitReply:
        def admit(header: dict) -> int:  # before any payload is read
            seen["header"] = header
            try:
                return c.admit(m.client_id, header)
            except ValueError as err:
                raise WireError(str(err)) from None

        try:
            header, path = spool(((ch.header, ch.data) for ch in request_iterator), c.spool_dir, admit=admit)
        except BrokenStream as err:  # the client is still expected: it may send again
            return pb.SubmitReply(accepted=False, reason=str(err))
        except WireError as err:  # a refused reply takes the client out of the round at once
            c.refuse(m.client_id, seen.get("header"), str(err))
            return pb.SubmitReply(accepted=False, reason=str(err))
        rnd, step = header["round"], header.get("step")
        if not c.delivered(m.client_id, rnd, step):  # still expected now, under the same lock
            if path is not None:
                path.unlink(missing_ok=True)
            return pb.SubmitReply(
                accepted=False, reason="a reply from this client is already in, or too late"
            )
        item = header if step else decode_result(m.client_id, header, path)
        c.results.put((rnd, step, m.client_id, item))
        return pb.SubmitReply(accepted=True)


def decode_result(client_id: int, header: dict, path) -> ClientResult:
    """A client's message as the round loop's ClientResult, its tensors read from the spill file
    ``path`` one at a time when the round asks for them (the file goes with the result); anything
    malformed becomes a failure of that client at stage ``decode`` with the reason."""
    if header.get("failed"):
        if path is not None:
            path.unlink(missing_ok=True)
        return ClientResult(client_id, failure=ClientFailure(client_id, "train", str(header["failed"])[:500]))
    try:
        groups = open_groups(path)
        if set(groups) - {"p", "c"}:
            raise WireError(f"unexpected payload groups {sorted(groups)[:4]}")
        metrics = received_metrics(header.get("metrics", {}))
        kind = header.get("payload", "update")
        n = (
            None
            if kind == "masked"
            else bounded_int(header.get("num_examples"), 1, MAX_EXAMPLES, "num_examples")
        )
        update = payload_from_wire(kind, groups, n, metrics)
    except Exception as err:
        return ClientResult(
            client_id, failure=ClientFailure(client_id, "decode", f"{type(err).__name__}: {err}"[:500])
        )
    return ClientResult(client_id, update=update)


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
                "TLS needs --cert and --key (PEM files; `fedfm provision` makes them), "
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


def start_server(
    coord: Coordinator, address: str, security: Security, note=print, interceptors=()
) -> tuple[grpc.Server, int]:
    """A started gRPC server on ``address`` (``HOST:PORT``, port 0 picks a free one); (server, port)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=MAX_CONCURRENT_RPCS),
        options=SERVER_OPTIONS,
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        interceptors=list(interceptors),
    )
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
    dashboard_port: int | None = None,
    metrics_address: str | None = None,
    health_address: str | None = None,
    overrides=(),
):
    """Run a federated experiment whose clients connect over gRPC; returns the RunResult.
    ``dashboard_port``: the live dashboard of the run on 127.0.0.1 (``fedfm.reporting.dashboard``);
    ``metrics_address``: Prometheus ``/metrics`` on ``[HOST:]PORT`` (``fedfm.deploy.metrics``);
    ``health_address``: ``/healthz`` and ``/readyz`` on ``[HOST:]PORT`` (``fedfm.deploy.health``);
    ``overrides``: ``section.field=value`` for a resumed run (``run.rounds=N`` trains further).

    Before round 1 the server waits up to ``wait_timeout_s`` for every client; before each round
    for at least ``min_available`` (default ``sampling.min_clients``). A round then waits up to
    ``round_timeout_s`` for the cohort's updates.
    """
    import fedfm.api as api
    from fedfm.reporting.console import ConsoleReporter
    from fedfm.server.driver import Run

    security.server_credentials()  # TLS material first: nothing else is worth doing without it
    health = health_server = None
    if health_address is not None:  # alive while loading; ready once clients can connect
        from fedfm.deploy.health import Health

        health = Health()
        health_server, _ = health.serve(health_address)
    roster = Roster.from_file(tokens, mutual_tls=security.client_ca is not None)
    roster.revocations = Revocations(Path(tokens).parent / REVOKED)  # fedfm provision revoke writes it
    new_folder = resume is None and (output is None or not Path(output).exists())
    cfg, run_dir = api.prepare_run(config, output=output, resume=resume, overrides=overrides)
    try:
        warnings = deployment_checks(cfg, security, roster, tokens)
    except DeployError:
        if new_folder:  # refused before anything ran: no run folder left behind
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    console = ConsoleReporter(enabled=True)
    warnings += certificate_warnings(p for p in (security.cert, security.client_ca) if p)
    for warning in warnings:
        console.warn(warning)
    note = ConsoleReporter(enabled=progress).note
    if security.insecure:
        console.warn("insecure mode: traffic and tokens travel in plaintext")
    spill = str(spool_folder(run_dir))
    coord = Coordinator(roster, client_config_toml(cfg), [], run_dir.name, spool_dir=spill)
    least = cfg.sampling.min_clients if min_available is None else min_available

    verifier = None
    if cfg.secagg.signatures:  # the server checks signed adverts too, so one bad one spoils nothing
        from fedfm.privacy.signing import CertificateVerifier

        verifier = CertificateVerifier(Path(security.client_ca).read_bytes())

    factory = GrpcEngine.factory(coord, round_timeout_s, least, wait_timeout_s, note, verifier)
    exporter = None
    if metrics_address is not None:
        from fedfm.deploy.metrics import ServerMetrics

        exporter = ServerMetrics()
        exporter.count_connected(lambda: len(roster.connected()))
        exporter.planned.set(cfg.run.rounds)
    callbacks = [exporter.round_done] if exporter is not None else []
    run = Run(
        cfg,
        run_dir,
        progress=progress,
        engine_factory=factory,
        resume=resume is not None,
        callbacks=callbacks,
    )
    run.name_sites({m.client_id: m.name for m in roster.members})
    coord.label_names = list(run.data.train.label_names)
    sharing = sharing_mode(cfg)
    shipped = sharing.client_weights(run.bundle, cfg) if sharing.client_weights is not None else None
    if shipped is not None:  # offsite: clients fetch the distilled middle
        coord.model_weights = weights_message(shipped)
        note(f"distilled emulator to ship: {len(coord.model_weights[1]) / 1e6:.1f} MB")
    if sharing.remote is not None:  # the server's part of every client's per-batch exchange
        coord.split = sharing.remote.server(cfg, run.bundle, run.task, coord.label_names)
    interceptors = [exporter.interceptor()] if exporter is not None else []
    server, port = start_server(coord, address, security, note, interceptors)
    if health is not None:
        health.ready = True
    metrics_server = None
    if exporter is not None:
        metrics_server, metrics_port = exporter.serve(metrics_address)
        note(f"Prometheus metrics on http://{metrics_server.server_address[0]}:{metrics_port}/metrics")
    page = None
    if dashboard_port is not None:
        from fedfm.reporting.dashboard.app import serve_in_thread

        page = serve_in_thread([run_dir], "127.0.0.1", dashboard_port)
        note(f"dashboard on http://127.0.0.1:{dashboard_port}/")
    stopped = done = False
    try:
        note(f"listening on port {port}; waiting for clients")
        connected = run.engine.wait_for_clients(cfg.partition.num_clients)  # everyone, once, before round 1
        note(f"{connected} of {cfg.partition.num_clients} clients connected; starting")
        result = run.execute()
        done = True
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stopped to resume, not ended; clients keep
        stopped = True  # retrying (until --give-up) and rejoin the resumed server
        raise
    except BaseException as err:  # clients must not think a failed run succeeded
        coord.outcome = {"ok": False, "reason": f"the server stopped: {type(err).__name__}: {err}"[:500]}
        raise
    finally:
        if not stopped:
            with coord.cond:
                coord.done = True
                coord.cond.notify_all()
            time.sleep(min(POLL_S, 2.0))  # let polling clients hear "done"
        server.stop(grace=1.0)
        if metrics_server is not None:
            metrics_server.shutdown()
        if health is not None:
            health.ready = False
            health_server.shutdown()
        if page is not None and not done:
            page.should_exit = True
    if page is not None:  # a person most wants to look when the run has ended: keep it up
        ConsoleReporter(enabled=True).note(
            f"the run is finished; the dashboard stays on http://127.0.0.1:{dashboard_port}/ "
            "until this server is stopped (Ctrl-C or SIGTERM)"
        )
        try:
            while not page.should_exit:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            page.should_exit = True
    return result


def deployment_checks(cfg, security: Security, roster: Roster, tokens) -> list[str]:
    """What ``serve`` refuses before it starts (``DeployError``); the warnings it prints."""
    if cfg.run.mode == "async" and cfg.secagg.enabled:
        raise DeployError(
            "secagg.enabled with run.mode = 'async' runs in simulation only: secure waves (K clients "
            "online together in one masking protocol) are not built over gRPC; use run.mode = 'sync'"
        )
    if cfg.systems.enabled:
        raise DeployError(
            "systems.enabled simulates client systems on a virtual clock; deployed clients are real "
            "machines (set systems.enabled = false; asynchronous mode runs on the server's clock)"
        )
    if len(roster.members) != cfg.partition.num_clients:
        raise DeployError(
            f"{tokens} lists {len(roster.members)} clients but partition.num_clients = "
            f"{cfg.partition.num_clients}"
        )
    warnings = check_deployable(cfg, security)
    check_client_view(cfg)
    return warnings


def check_client_view(cfg) -> None:
    """Every client rebuilds its config from its view (``deploy/view.py``): refuse here, once, a
    view that would not validate there, instead of failing every client after it joins."""
    import tomllib

    from fedfm.config import make_config

    try:
        make_config(tomllib.loads(client_config_toml(cfg)))
    except ValueError as err:
        raise DeployError(f"the clients' view of this config does not validate: {err}") from err


def spool_folder(run_dir: Path) -> Path:
    """``RUN/spool``: where arriving updates are spilled until their round has read them (mode
    0700; what a crash left there is removed when the server starts)."""
    import shutil

    folder = Path(run_dir) / "spool"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(mode=0o700, parents=True)
    return folder


def weights_message(weights) -> tuple[dict, bytes]:
    """The GetModel message of tensors a sharing mode ships to clients (offsite with distillation:
    the distilled middle layers); ``chunks`` declares its size and SHA-256 when it is sent."""
    return {"kind": "offsite-emulator"}, pack_tensors({"e": weights})


def check_deployable(cfg, security: Security | None = None) -> list[str]:
    """Refuse what a deployment cannot do safely (with the reason); return loud warnings."""
    if cfg.strategy.weighting != "uniform" and not cfg.validation.max_num_examples:
        raise DeployError(
            "a deployment weighted by example counts needs validation.max_num_examples: the server cannot "
            "check a client's data size, and without a bound one client could claim 10^9 examples and "
            "decide the aggregate (or set strategy.weighting = 'uniform')"
        )
    from fedfm.attacks import ATTACKS
    from fedfm.data.synthetic import synthetic_mode

    if ATTACKS.get(cfg.attack.kind).acts:
        raise DeployError("attack.* simulates attacks in-process; real clients send what they send")
    if synthetic_mode(cfg).loads:
        raise DeployError("synthetic.mode is for simulations (clients bring their own data in a deployment)")
    if cfg.task.baselines:
        raise DeployError("task.baselines needs every client's data in one place: simulation only")
    remote = sharing_mode(cfg).remote
    if remote is not None and remote.check is not None:
        try:
            remote.check(cfg)
        except ValueError as err:
            raise DeployError(str(err)) from None
    if cfg.secagg.signatures and (security is None or not security.client_ca):
        raise DeployError(
            "secagg.signatures needs mutual TLS (--client-ca): clients sign with their provisioned "
            "certificates"
        )
    warnings = threshold_warnings(cfg)
    if influence_bound(cfg) is not None:
        return warnings
    if not cfg.validation.unbounded:
        raise DeployError(UNBOUNDED)
    return [*warnings, UNBOUNDED_WARNING]


def threshold_warnings(cfg) -> list[str]:
    """Under secure aggregation: a warning when the secret-sharing threshold is every one of a
    client's share holders, so that one client that drops out or sends a bad share spoils every
    round."""
    from fedfm.algorithms.sampling import cohort_size
    from fedfm.privacy.secagg import threshold_for

    if not cfg.secagg.enabled:
        return []
    cohort = cohort_size(cfg.partition.num_clients, cfg.sampling.clients_per_round, cfg.sampling.fraction)
    holders = cohort if cfg.secagg.neighbors is None else min(cohort, cfg.secagg.neighbors + 1)
    t = threshold_for(holders, cfg.secagg.threshold)
    if t < holders:
        return []
    return [
        f"secagg.threshold = {cfg.secagg.threshold:g} with {holders} share holders per client needs all "
        f"{holders} of them (t = {t}): one client that drops out or sends a bad share makes every round "
        "fail until it is excluded; use a larger cohort or a lower threshold (above 0.5)"
    ]


UNBOUNDED = (
    "nothing bounds one client's influence on the model: a single client could move it arbitrarily far. "
    "Set validation.max_update_norm, a robust strategy.aggregator (trimmed_mean, median, krum, ...), "
    "client-level DP (privacy.dp = 'client', which clips) or secagg.enabled (sums outside the range "
    "honest inputs can produce are refused); or accept the risk with validation.unbounded = true"
)
