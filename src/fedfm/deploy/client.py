"""A federated client over gRPC: joins with its token, pulls tasks, trains locally, sends updates.

The client receives the run's resolved config when it joins and trains with the same code as a
simulation (``fedfm.client.program.ClientProgram``: local steps, clip, DP noise, compression, masking).
Its data never leaves it: a CSV/JSONL file with the config's text and label columns, or — for
demos — a registered dataset cut by the config's partitioner, of which it takes one partition.
Client state (SCAFFOLD's control variate, top-k residual) stays here, kept per round so that a
round the server repeats after a restart starts from the same state.

Network faults are retried: a lost server (restart, network cut) is rejoined every ``retry_s``
until ``give_up_s`` passes without contact. Every call has a deadline (never past the give-up
time), and keepalive pings find a dead connection, so a frozen server cannot hang a client. A
refused token is final, and so is a server that says its run failed: the client then exits with
an error, never with success.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from fedfm.deploy import fedfm_pb2 as pb
from fedfm.deploy import fedfm_pb2_grpc as rpc
from fedfm.deploy.auth import certificate_warnings
from fedfm.deploy.server import MAX_MESSAGE, POLL_S, STALL_S, Watchdog
from fedfm.sharing import sharing_mode
from fedfm.systems.ranks import Layout
from fedfm.wire import (
    WireError,
    chunks,
    context_from,
    declared_size,
    join,
    pack_tensors,
    payload_stream,
    unpack_tensors,
)
from fedfm.wire.stream import BROKEN, BrokenStream, TensorStream, load_groups, spool, transfer_s

RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
CALL_S = 60.0  # deadline of a call (a long poll waits POLL_S of it); a transfer adds transfer_s(bytes)
UPLOAD_TRIES = 3  # an update whose stream broke is sent again, this many times in all
HEARTBEAT_S = 5.0  # a sign of life this often, loading and training included (auth.CONNECTED_S: 3 missed)
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


class ClientError(RuntimeError):
    """The client cannot go on (refused token, unusable data); the message says why."""


@dataclass(frozen=True)
class ClientSecurity:
    """The server's CA certificate (TLS), the client's own certificate and key (mutual TLS)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None  # when the certificate names another host than the address
    insecure: bool = False

    def channel(self, server: str) -> grpc.Channel:
        options = list(CHANNEL_OPTIONS)
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        if self.insecure:
            return grpc.insecure_channel(server, options=options)
        if not self.ca:
            raise ClientError("TLS needs --ca (the server's CA certificate), or --insecure for plaintext")
        read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
        creds = grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))
        return grpc.secure_channel(server, creds, options=options)

    def expiry_warnings(self) -> list[str]:
        """This site's certificate and the CA's, when either expires within 30 days."""
        return certificate_warnings(p for p in (self.cert, self.ca) if p)

    def identity(self):
        """(signer, verifier) for signed secure aggregation: this site's certificate key and the
        federation's CA; (None, None) without mutual-TLS material."""
        if not (self.cert and self.key and self.ca):
            return None, None
        from fedfm.privacy.signing import CertificateSigner, CertificateVerifier

        signer = CertificateSigner(Path(self.cert).read_bytes(), Path(self.key).read_bytes())
        return signer, CertificateVerifier(Path(self.ca).read_bytes())


def is_registered(source: str) -> bool:
    """Whether ``--data`` names a dataset cut by the run's partitioner (``config``, ``config:FILE``
    or a registered dataset), so that each identity takes its own partition."""
    from fedfm.data.images import IMAGE_DATASETS
    from fedfm.data.sources import DATASETS

    named = (source in DATASETS or source in IMAGE_DATASETS) and source not in (
        "csv",
        "jsonl",
        "image-folder",
    )
    return source == "config" or source.startswith("config:") or named


def local_data(cfg, source: str, label_names: list[str]):
    """This client's FederatedData: a registered dataset partitioned as configured, or its own file.

    ``config`` (demos): the run's own dataset, cut by its partitioner. The server never sends its
    data paths, so a run on a file names the client's copy: ``config:FILE``."""
    from fedfm.data.sources import DataError, _read_rows, rows_to_dataset
    from fedfm.tasks.setup import FederatedData, prepare_data

    if source == "config" or source.startswith("config:"):  # demo: the run's dataset, partitioned
        copy = source.partition(":")[2]
        if copy:
            cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": copy})})
        try:
            return prepare_data(cfg)
        except DataError as err:
            if copy:
                raise
            raise ClientError(
                f"{err}: the server does not send its data paths; give this client's copy of the "
                "run's file as --data config:FILE"
            ) from None
    if is_registered(source):
        return prepare_data(cfg.model_copy(update={"data": cfg.data.model_copy(update={"name": source})}))
    path = Path(source)
    fmt = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}.get(path.suffix.lower())
    if path.is_dir():  # an image folder: <class>/<image>, classes named as the server's labels
        from fedfm.data.images import read_image_folder

        data = read_image_folder(path, cfg.data.image_size, label_names)
    elif fmt is None:
        raise ClientError(
            f"--data {source!r} is neither a registered dataset, a .csv/.jsonl file nor an image folder"
        )
    else:
        data = rows_to_dataset(
            _read_rows(path, fmt), cfg.data.text_column, cfg.data.label_column, source, label_names
        )
    rows = np.arange(len(data))
    return FederatedData(data, data.subset(rows[:1]), [rows], [rows[:0]])


class Trainer:
    """The frozen base model, the task and the client program, shared by the identities of a process."""

    def __init__(self, cfg, data, registered: bool) -> None:
        from fedfm.client.program import ClientProgram, check_optimizer_device
        from fedfm.tasks.setup import build_task

        if cfg.run.threads:
            import torch

            torch.set_num_threads(cfg.run.threads)
        self.cfg, self.data, self.registered = cfg, data, registered
        self.cut = None  # split fine-tuning: the hook that exchanges with the server at the cut
        remote = sharing_mode(cfg).remote
        if remote is not None:  # split: only the FM's bottom layers are built here
            self.bundle, self.task, self.cut = remote.client(cfg, data)
        else:
            self.bundle, self.task = build_task(cfg, data)
        check_optimizer_device(cfg.training, self.bundle.device)  # a clear error now, not every round
        self.program = ClientProgram.from_config(cfg)
        self.lock = threading.Lock()
        self.started = time.monotonic()  # the run's ETA, as this client sees its rounds go by

    def train(
        self, client_id: int, rows: np.ndarray, header: dict, groups: dict, state, secure=None, send=None
    ):
        """One round's local training; ``send``: split fine-tuning's cut exchange with the server."""
        from fedfm.client.program import ClientJob

        ctx = context_from(dict(header), groups.get("c"), secure)
        job = ClientJob(client_id, rows, header.get("rank"))
        with self.lock:
            if self.cut is None:
                return self.program(self.bundle, self.task, job, groups.get("p", {}), ctx, state)
            from fedfm.sharing.split.client import Link

            self.cut.link = Link(send, ctx.round)
            try:
                return self.program(self.bundle, self.task, job, groups.get("p", {}), ctx, state)
            finally:
                self.cut.link = None


class Identity:
    """One client: its token, its rows, its per-round state and its connection loop."""

    def __init__(self, token: str | None, partition: int | None, name: str = "") -> None:
        self.token, self.partition, self.name = token, partition, name
        # the token travels only in the call metadata (over TLS); None: the certificate identifies us
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.client_id: int | None = None
        self.states: dict[int, dict] = {0: {}}
        self.last_round = 0  # the last round this client trained
        self.secure = None  # fedfm.deploy.secure.ClientSecure, made at the first secure round
        self.signing = (None, None)  # (signer, verifier) from the mTLS files: signed secure aggregation

    def rows(self, trainer: Trainer) -> np.ndarray:
        k = self.partition if self.partition is not None else (self.client_id if trainer.registered else 0)
        if k is None or not 0 <= k < len(trainer.data.client_train):
            raise ClientError(f"partition {k} does not exist ({len(trainer.data.client_train)} partitions)")
        return trainer.data.client_train[k]

    def state_before(self, rnd: int) -> dict:
        return self.states[max(r for r in self.states if r < rnd)]

    def keep_state(self, rnd: int, state: dict) -> None:
        self.states[rnd] = state
        for r in sorted(self.states)[:-3]:  # a few rounds back is enough for a server restart
            del self.states[r]


def run_identities(
    server: str,
    identities: Sequence[Identity],
    source: str,
    security: ClientSecurity,
    *,
    retry_s: float = 1.0,
    give_up_s: float = 600.0,
    note: Callable[[str], None] = print,
    delay_s: float = 0.0,
    ranks: Layout | None = None,
) -> list[Identity]:
    """Serve one or more client identities from this process until the server says the run is done.

    The identities share one model (training takes turns), which is how a load test runs many light
    clients in a few processes. ``delay_s``: each update waits this long before its upload (a slower
    device or link, for tests and demonstrations of asynchronous mode). ``ranks``: one identity
    trains on ``ranks.nproc`` processes (``fedfm.systems.ranks``; this process is rank 0 and talks
    to the server; a collective that waits ``ranks.timeout_s`` for a dead rank fails the round),
    with the frozen base sharded across them when ``ranks.shard_base``.
    """
    for warning in security.expiry_warnings():
        note(f"warning: {warning}")
    if ranks is not None and ranks.nproc > 1:
        if len(identities) != 1:
            raise ClientError("--nproc trains one client on several processes: give one identity")
        return run_ranked(server, identities[0], source, security, ranks, retry_s, give_up_s, note)
    shared: dict = {}
    build = threading.Lock()
    errors: list[BaseException] = []

    def trainer_for(reply, stub, metadata) -> Trainer:
        with build:
            if "trainer" not in shared:
                from fedfm.config import make_config

                cfg = make_config(tomllib.loads(reply.config_toml))
                data = local_data(cfg, source, json.loads(reply.label_names))
                trainer = Trainer(cfg, data, is_registered(source))
                if reply.model_weights:  # a distilled emulator: its middle comes from the server
                    digest = fetch_model_weights(stub, metadata, trainer, deadline=CALL_S)
                    note(f"loaded the server's distilled emulator (sha256 {digest[:12]})")
                shared["trainer"] = trainer
            return shared["trainer"]

    signing = security.identity() if not security.insecure else (None, None)

    def loop(ident: Identity) -> None:
        ident.signing = signing
        try:
            serve_identity(server, ident, security, trainer_for, retry_s, give_up_s, note, delay_s)
        except BaseException as err:  # reported by the caller
            errors.append(err)

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in identities]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return list(identities)


def fetch_model_weights(stub, metadata, trainer: Trainer, deadline: float) -> str:
    """Fetch and load the weights the server ships for this client's model (a distilled offsite
    emulator's middle layers), checked: the SHA-256 the header names (by ``join``), a size bounded
    by the client's own model, exactly the tensors of those layers, finite. Returns the digest."""
    from fedfm.sharing.offsite import load_emulator_weights

    limit = sum(t.numel() * t.element_size() for t in trainer.bundle.model.state_dict().values()) + (64 << 10)
    replies = stub.GetModel(pb.TaskRequest(), metadata=metadata, timeout=deadline)
    try:
        header, blob = join(((c.header, c.data) for c in replies), max_bytes=limit)
    except ValueError as err:  # WireError: too large, no header, not JSON
        raise ClientError(f"the server's model weights are malformed: {err}") from None
    if "error" in header:
        raise ClientError(f"the server has no model weights for this client: {header['error']}")
    digest = header.get("sha256")
    if not blob or not digest:  # join checked every byte against a declared digest, if there was one
        raise ClientError("the model weights the server sent come without their SHA-256")
    try:
        load_emulator_weights(trainer.bundle, trainer.cfg, unpack_tensors(blob).get("e", {}))
    except ValueError as err:
        raise ClientError(f"unusable model weights from the server: {err}") from None
    return digest


class Heartbeat:
    """A thread that tells the server every ``HEARTBEAT_S`` that this identity is alive, while it
    loads its model or trains a long round as much as while it polls (its own channel; a missed
    beat is simply tried again)."""

    def __init__(self, server: str, ident: Identity, security) -> None:
        self.server, self.ident, self.security = server, ident, security
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=HEARTBEAT_S)

    def _beat(self) -> None:
        channel = self.security.channel(self.server)
        stub = rpc.FedFMStub(channel)
        try:
            while not self.stop.wait(HEARTBEAT_S):
                # a lost server is the main loop's to notice (it rejoins); the beats go on regardless
                with contextlib.suppress(grpc.RpcError):
                    stub.Heartbeat(pb.HeartbeatRequest(), metadata=self.ident.metadata, timeout=HEARTBEAT_S)
        finally:
            channel.close()


class RankedTrainer:
    """Rank 0's trainer when a client trains on several processes: each round's task goes to the
    other ranks first, then every rank trains its share of each batch (``fedfm.systems.ranks``)."""

    def __init__(self, trainer: Trainer, broadcast) -> None:
        self.inner, self.broadcast = trainer, broadcast

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def train(self, client_id, rows, header, groups, state, secure=None, send=None):
        self.broadcast(("train", client_id, rows, header, groups, state))
        return self.inner.train(client_id, rows, header, groups, state, secure, send)


def broadcast(message=None):
    """Rank 0 sends ``message`` to every rank; the others get it (``message`` None there)."""
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank_worker(index: int, layout: Layout, address: str, source: str) -> None:
    """Ranks 1 … world − 1 of a client: build the same trainer from the config rank 0 got when it
    joined, then train every task rank 0 sends, together with it; their updates are rank 0's."""
    from fedfm.config import make_config
    from fedfm.systems import ranks

    ranks.join(index + 1, layout.nproc, address, layout.timeout_s, layout.shard_base)
    trainer = None
    try:
        while True:
            message = broadcast()
            if message[0] == "stop":
                return
            if message[0] == "config":
                cfg = make_config(tomllib.loads(message[1]))
                trainer = Trainer(cfg, local_data(cfg, source, message[2]), is_registered(source))
                continue
            _, client_id, rows, header, groups, state = message
            try:  # masking and noise belong to rank 0's update alone; this rank's result is dropped
                trainer.train(client_id, rows, {**header, "secure": False}, groups, state)
            except Exception as err:  # rank 0's collective fails with its own reason
                print(f"rank {index + 1}: round {header.get('round')} failed: {err}", flush=True)
    finally:
        ranks.leave()


def loopback_address() -> str:
    """``127.0.0.1:PORT`` at a port free now (bound, then released for the caller to listen on)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def run_ranked(server, ident, source, security, layout: Layout, retry_s, give_up_s, note) -> list[Identity]:
    """One client identity trained on ``layout.nproc`` processes: spawn ranks 1 …, join them as rank 0,
    serve the identity, and stop the ranks at the end (whatever the end)."""
    import torch.multiprocessing as mp

    from fedfm.config import make_config
    from fedfm.systems import ranks

    address = loopback_address()
    workers = mp.start_processes(
        rank_worker,
        args=(layout, address, source),
        nprocs=layout.nproc - 1,
        join=False,
        start_method="spawn",
    )
    ranks.join(0, layout.nproc, address, layout.timeout_s, layout.shard_base)
    sharded = ", the frozen base sharded across them (FSDP)" if layout.shard_base else ""
    note(f"training on {layout.nproc} processes (gloo, {address}){sharded}")
    built: dict = {}

    def trainer_for(reply, stub, metadata):
        if "trainer" not in built:
            cfg = make_config(tomllib.loads(reply.config_toml))
            try:
                ranks.check(cfg, layout.shard_base)
            except ValueError as err:
                raise ClientError(str(err)) from None
            mode = sharing_mode(cfg)
            if mode.remote is not None or mode.client_weights is not None:
                raise ClientError(f"--nproc: sharing.mode = {cfg.sharing.mode!r} trains in one process")
            labels = json.loads(reply.label_names)
            trainer = Trainer(cfg, local_data(cfg, source, labels), is_registered(source))
            broadcast(("config", reply.config_toml, labels))
            built["trainer"] = RankedTrainer(trainer, broadcast)
        return built["trainer"]

    ident.signing = security.identity() if not security.insecure else (None, None)
    try:
        serve_identity(server, ident, security, trainer_for, retry_s, give_up_s, note)
    finally:
        with contextlib.suppress(Exception):
            broadcast(("stop",))
        ranks.leave()
        for p in workers.processes:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [ident]


def serve_identity(
    server, ident: Identity, security, trainer_for, retry_s, give_up_s, note, delay_s=0.0
) -> None:
    with Heartbeat(server, ident, security):
        _serve_identity(server, ident, security, trainer_for, retry_s, give_up_s, note, delay_s)


def _serve_identity(
    server, ident: Identity, security, trainer_for, retry_s, give_up_s, note, delay_s
) -> None:
    last_contact = time.monotonic()
    joined = None

    def deadline() -> float:  # no call outlives the give-up time
        return max(1.0, min(CALL_S, give_up_s - (time.monotonic() - last_contact)))

    while True:
        channel = security.channel(server)
        stub = rpc.FedFMStub(channel)
        try:
            if joined is None or ident.client_id is None:
                request = pb.JoinRequest(name=ident.name)
                joined = stub.Join(request, metadata=ident.metadata, timeout=deadline())
                ident.client_id = joined.client_id
                note(f"client {ident.client_id}: joined run {joined.run}")
            trainer = trainer_for(joined, stub, ident.metadata)
            while True:
                request = pb.TaskRequest(last_round=ident.last_round)
                header, groups = fetch_task(stub, request, ident.metadata, silence_s=deadline())
                last_contact = time.monotonic()
                if header.get("status") == "done":
                    if header.get("ok") is False:
                        raise ClientError(str(header.get("reason", "the server's run failed")))
                    note(f"client {ident.client_id}: the run is done")
                    return
                if header.get("status") == "secagg":
                    answer_step(stub, ident, header, note, deadline())
                elif header.get("status") == "train":
                    submit(stub, ident, trainer, header, groups, note, give_up_s, delay_s)
                last_contact = time.monotonic()
        except BrokenStream as err:  # a task's download broke: poll for it again
            if time.monotonic() - last_contact > give_up_s:
                raise ClientError(f"no complete task from {server} for {give_up_s:g} s; giving up") from None
            note(f"client {ident.client_id}: {err}; asking for the task again in {retry_s:g} s")
            time.sleep(retry_s)
        except grpc.RpcError as err:
            code = err.code()
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise ClientError(f"the server refused this client: {err.details()}") from None
            if code not in RETRYABLE and code != grpc.StatusCode.UNKNOWN:
                raise ClientError(f"server error {code.name}: {err.details()}") from None
            if time.monotonic() - last_contact > give_up_s:
                raise ClientError(f"no contact with {server} for {give_up_s:g} s; giving up") from None
            who = "client" if ident.client_id is None else f"client {ident.client_id}"
            note(f"{who}: no connection ({code.name}: {err.details()}); retrying in {retry_s:g} s")
            joined = None  # rejoin: the server may have restarted
            time.sleep(retry_s)
        finally:
            channel.close()


def fetch_task(stub, request, metadata, silence_s: float = STALL_S) -> tuple[dict, dict]:
    """The next poll reply and its tensors. The task streams into a spill file and is then read
    into memory (never held twice); the call is cut when no chunk comes for ``silence_s`` seconds
    (at most ``STALL_S``; the long poll answers within ``POLL_S``), or when it takes longer than
    ``CALL_S`` plus the time its declared size may take."""
    call = stub.GetTask(request, metadata=metadata)
    stall = Watchdog(max(POLL_S + 1, min(STALL_S, silence_s)), call.cancel)
    timer: list[threading.Timer] = []

    def sized(header: dict) -> None:  # the header says how many bytes follow: the deadline fits them
        nbytes, _ = declared_size(header, None)
        timer.append(threading.Timer(CALL_S + transfer_s(nbytes), call.cancel))
        timer[0].daemon = True
        timer[0].start()

    try:
        header, path = spool(stall.passing((c.header, c.data) for c in call), None, admit=sized)
        return header, load_groups(path)
    finally:
        stall.stop()
        for t in timer:
            t.cancel()


def answer_step(stub, ident: Identity, header: dict, note, timeout: float) -> None:
    """One secure-aggregation step: this client's reply (or why it cannot), back to the server."""
    from fedfm.deploy.secure import ClientSecure

    rnd, step = int(header["round"]), header["step"]
    if ident.secure is None:
        ident.secure = ClientSecure(ident.client_id, *ident.signing)
    try:
        reply = {"round": rnd, "step": step, "reply": ident.secure.answer(rnd, step, header["message"])}
    except Exception as err:
        note(f"client {ident.client_id}: secure aggregation step {step} failed: {err}")
        reply = {"round": rnd, "step": step, "error": f"{type(err).__name__}: {err}"}
    stub.SubmitUpdate(iter([pb.Chunk(header=json.dumps(reply))]), metadata=ident.metadata, timeout=timeout)


def submit(
    stub,
    ident: Identity,
    trainer: Trainer,
    header: dict,
    groups: dict,
    note,
    give_up_s: float = 600.0,
    delay_s: float = 0.0,
) -> None:
    rnd, started = int(header["round"]), time.monotonic()
    try:
        rows = ident.rows(trainer)
        secure = ident.secure.for_round(rnd) if header.get("secure") and ident.secure else None
        send = None
        if trainer.cut is not None:  # split: every batch crosses the cut, within the round's deadline
            deadline = time.monotonic() + float(header.get("deadline_s", CALL_S))
            send = split_send(stub, ident.metadata, deadline, trainer.cut.limit)
        state = ident.state_before(rnd)
        update, state = trainer.train(ident.client_id, rows, header, groups, state, secure, send)
    except ClientError:
        raise
    except Exception as err:  # the server hears why, and the round goes on without us
        reply_header, payload = {"round": rnd, "failed": f"{type(err).__name__}: {err}"}, TensorStream({})
        note(f"client {ident.client_id}: round {rnd} failed: {err}")
    else:
        ident.keep_state(rnd, state)
        reply_header, payload = payload_stream(rnd, update)
    if delay_s:
        time.sleep(delay_s)
    reply = upload(stub, ident, reply_header, payload, note, give_up_s)
    ident.last_round = rnd
    if not reply.accepted:
        note(f"client {ident.client_id}: round {rnd} update refused: {reply.reason}")
    elif "failed" not in reply_header:  # one line per update: what this client is doing, in a log too
        took = time.monotonic() - started
        sent = f"update sent ({payload.nbytes / 1e6:.2f} MB, {took:.1f} s)"
        eta = "" if header.get("asynchronous") else run_eta(trainer, rnd)
        note(f"client {ident.client_id}: round {rnd}: {sent}{eta}")


def upload(stub, ident: Identity, header: dict, payload: TensorStream, note, give_up_s: float = 600.0):
    """Stream an update to the server from its tensors. Each try has the give-up time plus the
    time its size may take (``transfer_s``); a stream that breaks (the network, a deadline, the
    server saying it arrived short) is sent again, ``UPLOAD_TRIES`` tries in all while the give-up
    time since the first has not passed, and then the last error goes up."""
    timeout, began = give_up_s + transfer_s(payload.nbytes), time.monotonic()
    for attempt in range(1, UPLOAD_TRIES + 1):
        message = (pb.Chunk(header=t, data=d) for t, d in payload.message(header))
        try:
            reply = stub.SubmitUpdate(message, metadata=ident.metadata, timeout=timeout)
        except grpc.RpcError as err:
            last = attempt == UPLOAD_TRIES or time.monotonic() - began > give_up_s
            if err.code() not in RETRYABLE or last:
                raise
            why = f"{err.code().name}: {err.details()}"
        else:
            if reply.accepted or not reply.reason.startswith(BROKEN) or attempt == UPLOAD_TRIES:
                return reply
            why = reply.reason
        again = f"sending again ({attempt + 1} of {UPLOAD_TRIES})"
        note(f"client {ident.client_id}: the upload broke ({why}); {again}")
    raise AssertionError("unreachable")


def run_eta(trainer: Trainer, rnd: int) -> str:
    """``; round 3 of 10, run ETA 4m10s`` from the rounds this client has seen (synchronous runs;
    an asynchronous server numbers tasks, not rounds, and marks them ``asynchronous``)."""
    cfg = trainer.cfg
    if rnd < 1:
        return ""
    from fedfm.reporting.console import duration

    left = (time.monotonic() - trainer.started) / rnd * max(0, cfg.run.rounds - rnd)
    return f"; round {rnd} of {cfg.run.rounds}, run ETA {duration(left)}"


def split_send(stub, metadata, deadline: float, limit: int):
    """``send`` of split fine-tuning's ``Link`` (``fedfm.sharing.split.client``) over the
    ``SplitStep`` RPC; no call outlives ``deadline`` (a ``time.monotonic()`` instant: the round's
    deadline)."""
    from fedfm.sharing.split.codec import CutError

    def send(header: dict, groups: dict):
        blob = pack_tensors(groups)
        stream = (pb.Chunk(header=t, data=d) for t, d in chunks(header, blob))
        left = deadline - time.monotonic()
        if left <= 0:
            raise CutError("the round's deadline passed during the cut exchange")
        replies = stub.SplitStep(stream, metadata=metadata, timeout=left)
        try:
            reply_header, reply = join(((c.header, c.data) for c in replies), max_bytes=limit)
            return reply_header, unpack_tensors(reply)
        except WireError as err:
            raise CutError(f"the server's cut reply is malformed: {err}") from None

    return send
