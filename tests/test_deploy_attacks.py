"""Deployment probes, each an attack on a real server process on 127.0.0.1.

Identity (a token with another site's certificate), resources (260 stalled uploads, an update
far larger than the payload), a server that freezes, a server whose run fails, and the bounds a
deployment needs before it starts.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import tomli_w
import torch
from tests.deploy_tools import (
    client_args,
    free_port,
    make_certificates,
    server_args,
    start,
    wait_for_file_text,
    write_tokens,
)

grpc = pytest.importorskip("grpc")

import fedfm  # noqa: E402
from fedfm.deploy import fedfm_pb2 as pb  # noqa: E402
from fedfm.deploy.auth import DeployError, read_tokens  # noqa: E402
from fedfm.deploy.client import ClientSecurity  # noqa: E402
from fedfm.deploy.fedfm_pb2_grpc import FedFMStub  # noqa: E402
from fedfm.deploy.server import check_deployable  # noqa: E402
from fedfm.deploy.wire import chunks, join, pack_tensors, unpack_tensors  # noqa: E402


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


def experiment(tmp_path, tiny_config, clients, **sections):
    cfg = tiny_config(
        run={"rounds": 1, "threads": 1},
        partition={"method": "iid", "num_clients": clients},
        sampling={"fraction": 1.0},
        eval={"at_start": False},
        validation={"max_num_examples": 1000, "max_update_norm": 100.0},
    )
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    path = tmp_path / "exp.toml"
    path.write_text(tomli_w.dumps(cfg))
    return path


def rounds_of(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["round"]: r for r in rows if r.get("event") == "round"}


def stub_for(port, certs, site):
    me = ClientSecurity(str(certs["ca"]), str(certs[f"site{site}"]), str(certs[f"site{site}_key"]))
    return FedFMStub(me.channel(f"localhost:{port}"))


def test_identity_is_the_authenticated_sender(tmp_path, tiny_config, certs):
    """site0 has a token (bound to its certificate), site1 has none (its certificate alone). A
    token presented with another site's certificate is refused; the token reaches the client
    through FEDFM_TOKEN and appears in no log."""
    path = experiment(tmp_path, tiny_config, 2)
    token = "s3cret-token-of-site0-" + "x" * 20
    (tmp_path / "tokens.txt").write_text(f"site0 {token}\nsite1\n")
    port, out = free_port(), tmp_path / "run"
    server = start(server_args(path, port, tmp_path / "tokens.txt", certs, out), tmp_path / "s.log")
    thief = stub_for(port, certs, 1)  # site1's certificate, site0's token
    with pytest.raises(grpc.RpcError) as refused:
        thief.Join(
            pb.JoinRequest(),
            metadata=(("authorization", f"Bearer {token}"),),
            wait_for_ready=True,
            timeout=60,
        )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "does not belong to this token's client" in refused.value.details()
    assert thief.Join(pb.JoinRequest(), timeout=30).client_id == 1  # the certificate alone: site1
    env = {**os.environ, "FEDFM_TOKEN": token}
    fh = (tmp_path / "c0.log").open("w")
    import subprocess
    import sys

    c0 = subprocess.Popen(
        [sys.executable, "-m", "fedfm.cli", *map(str, client_args(port, None, certs, site=0))],
        env=env,
        stdout=fh,
        stderr=subprocess.STDOUT,
    )
    c1 = start(client_args(port, None, certs, site=1), tmp_path / "c1.log")
    assert server.wait(timeout=180) == 0, (tmp_path / "s.log").read_text()
    assert c0.wait(timeout=60) == 0 and c1.wait(timeout=60) == 0
    assert rounds_of(out)[1]["num_clients"] == 2
    for log in ("s.log", "c0.log", "c1.log"):
        assert token not in (tmp_path / log).read_text()


def test_token_files_never_echo_a_token(tmp_path):
    bad = tmp_path / "tokens.txt"
    bad.write_text("site0 tok-aaaaaaaaaaaa extra-field\n")
    with pytest.raises(DeployError) as err:
        read_tokens(bad)
    assert "tok-aaaa" not in str(err.value) and "tokens.txt:1" in str(err.value)
    bad.write_text("site0 same\nsite1 same\n")
    with pytest.raises(DeployError, match="unique") as err:
        read_tokens(bad)
    assert "same" not in str(err.value).replace("must be unique", "")


def stalled(stub, metadata, release: threading.Event):
    """An upload stream that sends nothing until ``release`` (held open by gRPC's own thread)."""

    def never():
        release.wait()
        return
        yield  # noqa: B901

    return stub.SubmitUpdate.future(never(), metadata=metadata, timeout=120)


def test_260_stalled_uploads_do_not_keep_an_honest_client_out(tmp_path, tiny_config, certs):
    """site1 holds 130 uploads open that never send a byte, and 130 more come with an unknown token;
    site0 must still join and train the round. site2 sends an update a thousand times the payload,
    refused before it is read. (How long the honest join takes: benchmarks/deploy.py --stalled.)"""
    path = experiment(tmp_path, tiny_config, 3)
    tokens = write_tokens(tmp_path / "tokens.txt", 3)
    port, out = free_port(), tmp_path / "run"
    extra = ("--round-timeout", "10", "--min-available", "1")
    server = start(server_args(path, port, tmp_path / "tokens.txt", certs, out, *extra), tmp_path / "s.log")
    staller, meta = stub_for(port, certs, 1), (("authorization", f"Bearer {tokens[1]}"),)
    staller.Join(pb.JoinRequest(), metadata=meta, wait_for_ready=True, timeout=60)
    release = threading.Event()
    calls = [stalled(staller, meta, release) for _ in range(130)]  # as an authenticated site
    calls += [stalled(staller, (("authorization", "Bearer nobody"),), release) for _ in range(130)]
    time.sleep(2)
    honest = start(client_args(port, tokens[0], certs), tmp_path / "c0.log")
    big, big_meta = stub_for(port, certs, 2), (("authorization", f"Bearer {tokens[2]}"),)
    big.Join(pb.JoinRequest(), metadata=big_meta, wait_for_ready=True, timeout=60)
    while True:
        task = big.GetTask(pb.TaskRequest(), metadata=big_meta, timeout=30)
        header, blob = join((c.header, c.data) for c in task)
        if header["status"] == "train":
            break
    params = unpack_tensors(blob)["p"]
    huge = pack_tensors({"p": {k: torch.zeros(1 << 20) for k in list(params)[:1]}})  # 4 MiB
    head = {"round": header["round"], "num_examples": 5}
    message = (pb.Chunk(header=t, data=d) for t, d in chunks(head, huge))
    reply = big.SubmitUpdate(message, metadata=big_meta, timeout=60)
    assert not reply.accepted and "the most this message may carry" in reply.reason
    assert server.wait(timeout=180) == 0, (tmp_path / "s.log").read_text()
    release.set()
    assert honest.wait(timeout=60) == 0
    record = rounds_of(out)[1]
    assert record["num_clients"] == 1 and 0 not in {f["client"] for f in record["failed"]}
    refused = sum(1 for c in calls if c.done() and c.exception() is not None)
    assert refused >= 250  # refused at once: an unknown token, or too many calls from one site


def test_a_frozen_server_does_not_hang_a_client_past_give_up(tmp_path, tiny_config, certs):
    path = experiment(tmp_path, tiny_config, 1, run={"rounds": 3}, training={"local_steps": 1})
    tokens = write_tokens(tmp_path / "tokens.txt", 1)
    port, out = free_port(), tmp_path / "run"
    server = start(server_args(path, port, tmp_path / "tokens.txt", certs, out), tmp_path / "s.log")
    wait_for_file_text(out / "metrics.jsonl", "")  # the server is up (its run folder is ready) …
    time.sleep(2)  # … and listening: the client's give-up clock starts with contact
    client = start(client_args(port, tokens[0], certs, "--give-up", "5"), tmp_path / "c.log")
    try:
        wait_for_file_text(out / "metrics.jsonl", '"event": "round", "round": 1,')
        server.send_signal(signal.SIGSTOP)  # alive, listening, answering nothing
        began = time.monotonic()
        assert client.wait(timeout=90) == 2
        assert time.monotonic() - began < 60
        assert "giving up" in (tmp_path / "c.log").read_text()
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()


def test_clients_fail_when_the_servers_run_fails(tmp_path, tiny_config, certs):
    path = experiment(tmp_path, tiny_config, 2, validation={"max_update_norm": 1e-12})  # all rejected
    tokens = write_tokens(tmp_path / "tokens.txt", 2)
    port, out = free_port(), tmp_path / "run"
    server = start(server_args(path, port, tmp_path / "tokens.txt", certs, out), tmp_path / "s.log")
    clients = [start(client_args(port, t, certs), tmp_path / f"c{k}.log") for k, t in enumerate(tokens)]
    assert server.wait(timeout=180) == 1
    for k, c in enumerate(clients):
        assert c.wait(timeout=60) == 2
        assert "the server stopped" in (tmp_path / f"c{k}.log").read_text()


def test_a_deployment_needs_its_bounds(tiny_config):
    cfg = fedfm.RunConfig.model_validate(tiny_config())
    with pytest.raises(DeployError, match="validation.max_num_examples"):
        check_deployable(cfg)
    bounded = cfg.model_copy(
        update={"validation": cfg.validation.model_copy(update={"max_num_examples": 100})}
    )
    assert "no bound on update norms" in check_deployable(bounded)[0]
    robust = bounded.model_copy(
        update={"strategy": bounded.strategy.model_copy(update={"aggregator": "median"})}
    )
    assert check_deployable(robust) == []
    signed = bounded.model_copy(update={"secagg": bounded.secagg.model_copy(update={"signatures": True})})
    with pytest.raises(DeployError, match="mutual TLS"):
        check_deployable(signed)


def test_provision_writes_a_kit_per_site(tmp_path):
    from cryptography import x509

    from fedfm.deploy.provision import ProvisionError, provision

    kits = provision(tmp_path / "fed", ["hospital-a", "hospital-b"], ["fl.example.org", "10.0.0.5"])
    tokens = read_tokens(kits["server"] / "tokens.txt")
    assert [n for n, _ in tokens] == ["hospital-a", "hospital-b"] and all(len(t) == 64 for _, t in tokens)
    cert = x509.load_pem_x509_certificate((kits["hospital-a"] / "hospital-a.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((kits["ca"] / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.rfc4514_string() == "CN=hospital-a"
    assert (kits["hospital-a"] / "token").read_text().split() == ["hospital-a", tokens[0][1]]
    assert oct((kits["hospital-a"] / "hospital-a.key").stat().st_mode & 0o777) == "0o600"
    assert "--token-file" in (kits["hospital-a"] / "start.sh").read_text()
    server_cert = x509.load_pem_x509_certificate((kits["server"] / "server.pem").read_bytes())
    names = server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(n.value) for n in names} == {"fl.example.org", "10.0.0.5"}
    with pytest.raises(ProvisionError, match="not empty"):
        provision(tmp_path / "fed", ["c"], ["x"])
    with pytest.raises(ProvisionError, match="site names"):
        provision(tmp_path / "other", ["bad name"], ["x"])
