"""Updates of any size through a real gRPC server: the task streamed from θ, the update spooled
to the run's spill folder and read tensor by tensor, a broken upload sent again, a corrupt one
refused; the files go when the round is done with them."""

from __future__ import annotations

import gc
import json
import threading

import pytest
import torch

grpc = pytest.importorskip("grpc")

from fedfm.deploy import client  # noqa: E402
from fedfm.deploy.auth import Roster  # noqa: E402
from fedfm.deploy.client import ClientSecurity, Identity, fetch_task, upload  # noqa: E402
from fedfm.deploy.engine import Coordinator, GrpcEngine  # noqa: E402
from fedfm.deploy.server import Security, spool_folder, start_server  # noqa: E402
from fedfm.types import RoundContext, Update  # noqa: E402
from fedfm.wire import payload_stream  # noqa: E402
from fedfm.wire.stream import TensorStream  # noqa: E402


class CutShort(TensorStream):
    """A stream that a middlebox cuts short the first ``breaks`` times it is sent."""

    def __init__(self, groups, breaks: int) -> None:
        super().__init__(groups)
        self.breaks = breaks

    def message(self, header, size=1 << 20):
        pieces = list(super().message(header, size))
        if self.breaks:
            self.breaks -= 1
            return iter(pieces[: len(pieces) // 2])
        return iter(pieces)


@pytest.fixture
def federation(tmp_path):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("a tok-aaaaaaaaaaaa\nb tok-bbbbbbbbbbbb\n")
    spool = spool_folder(tmp_path / "run")
    coord = Coordinator(Roster.from_file(tokens, mutual_tls=False), "", [], "run", spool_dir=str(spool))
    server, port = start_server(coord, "127.0.0.1:0", Security(insecure=True), note=lambda _: None)
    jobs = [type("Job", (), {"rank": None})() for _ in range(2)]
    engine = GrpcEngine(coord, jobs, 60.0, 2, 30.0, note=lambda _: None)
    channel = ClientSecurity(insecure=True).channel(f"127.0.0.1:{port}")
    stub = client.rpc.FedFMStub(channel)
    idents = [Identity("tok-aaaaaaaaaaaa", None), Identity("tok-bbbbbbbbbbbb", None)]
    for ident in idents:
        ident.client_id = stub.Join(client.pb.JoinRequest(), metadata=ident.metadata, timeout=10).client_id
    yield engine, stub, idents, spool
    channel.close()
    server.stop(grace=0)


def test_a_broken_upload_is_sent_again_a_corrupt_one_refused_and_spill_files_go_with_the_round(federation):
    engine, stub, (a, b), spool = federation
    theta = {"w": torch.randn(700_000), "b": torch.randn(3)}  # 2.8 MB: three chunks each way
    results: list = []
    round_thread = threading.Thread(
        target=lambda: results.extend(engine.run_cohort(theta, [0, 1], RoundContext(round=1, seed=0)))
    )
    round_thread.start()
    header, groups = fetch_task(stub, client.pb.TaskRequest(), a.metadata)
    assert header["status"] == "train" and header["nbytes"] > 2 << 20
    assert all(torch.equal(groups["p"][k], theta[k]) for k in theta)  # streamed from θ, digest checked

    delta = {k: torch.full_like(v, 0.5) for k, v in theta.items()}
    head, stream = payload_stream(1, Update(delta, 7, {"train_loss": 1.0}))
    notes: list[str] = []
    reply = upload(stub, a, head, CutShort({"p": delta, "c": {}}, breaks=1), notes.append)
    assert reply.accepted, reply.reason
    assert (
        len(notes) == 1
        and "the upload broke (the stream broke off after" in notes[0]
        and "2 of 3" in notes[0]
    )

    header, _ = fetch_task(stub, client.pb.TaskRequest(), b.metadata)
    head, stream = payload_stream(1, Update(delta, 7, {}))
    tampered = {**head, **stream.declared(), "sha256": "0" * 64}
    pieces = [
        client.pb.Chunk(header=json.dumps(tampered) if i == 0 else "", data=d)
        for i, (_, d) in enumerate(stream.message({}))
    ]
    reply = stub.SubmitUpdate(iter(pieces), metadata=b.metadata, timeout=10)
    assert not reply.accepted and "SHA-256 differs" in reply.reason
    round_thread.join(timeout=30)

    by = {r.client_id: r for r in results}
    assert by[1].failure is not None and "SHA-256" in by[1].failure.reason  # out of the round at once
    got = by[0].update.delta
    assert len(list(spool.iterdir())) == 1  # the accepted update waits on disk, not in memory
    assert all(torch.equal(got[k], delta[k]) for k in delta) and by[0].update.num_examples == 7
    del got, by, results[:]
    gc.collect()
    assert list(spool.iterdir()) == []  # the round is done with it: the file is gone


def test_the_round_deadline_grows_with_the_bytes_it_moves(federation):
    engine, stub, (a, b), _ = federation
    engine.round_timeout_s = 0.2
    theta = {"w": torch.zeros(1 << 20)}  # 4 MiB down, a 12 MiB limit up: about 2 s more at 8 MiB/s
    results = list(engine.run_cohort(theta, [0, 1], RoundContext(round=1, seed=0)))
    reasons = {r.failure.reason for r in results}
    allowed = 0.2 + (4 * (1 << 20) + 48 + 3 * 4 * (1 << 20) + 256 + (64 << 10)) / (8 << 20)
    assert len(reasons) == 1 and f"({allowed:.3g} s)" in reasons.pop()
