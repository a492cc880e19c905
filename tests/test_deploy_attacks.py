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
    Hostile,
    client_args,
    client_data,
    free_port,
    make_certificates,
    server_args,
    start,
    wait_for_file_text,
    write_tokens,
)

grpc = pytest.importorskip("grpc")

from fedfm.deploy import fedfm_pb2 as pb  # noqa: E402
from fedfm.deploy.auth import DeployError, read_tokens  # noqa: E402
from fedfm.deploy.client import ClientSecurity  # noqa: E402
from fedfm.deploy.fedfm_pb2_grpc import FedFMStub  # noqa: E402
from fedfm.server.checkpoint import load_checkpoint  # noqa: E402
from fedfm.wire import chunks, join, pack_tensors, unpack_tensors  # noqa: E402


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
        [
            sys.executable,
            "-m",
            "fedfm.cli",
            *map(str, client_args(port, None, certs, site=0, data=client_data(path))),
        ],
        env=env,
        stdout=fh,
        stderr=subprocess.STDOUT,
    )
    c1 = start(client_args(port, None, certs, site=1, data=client_data(path)), tmp_path / "c1.log")
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
    honest = start(client_args(port, tokens[0], certs, data=client_data(path)), tmp_path / "c0.log")
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
    client = start(
        client_args(port, tokens[0], certs, "--give-up", "5", data=client_data(path)), tmp_path / "c.log"
    )
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
    clients = [
        start(client_args(port, t, certs, data=client_data(path)), tmp_path / f"c{k}.log")
        for k, t in enumerate(tokens)
    ]
    assert server.wait(timeout=180) == 1
    for k, c in enumerate(clients):
        assert c.wait(timeout=60) == 2
        assert "the server stopped" in (tmp_path / f"c{k}.log").read_text()


def test_an_unbounded_deployment_refuses_to_start_and_its_opt_out_is_said_every_round(
    tmp_path, tiny_config, certs
):
    """Nothing bounds one client's influence: ``fedfm server`` refuses to start (no run folder
    left). With ``validation.unbounded = true`` it starts, and one hostile site that sends 1e6 in
    every entry moves θ by ~1e6 (the risk the operator accepted), said in every round's log line
    and record and in the report."""
    loose = {"max_num_examples": 1000, "max_update_norm": "null"}
    path = experiment(tmp_path, tiny_config, 3, validation=loose, run={"rounds": 2})
    tokens = write_tokens(tmp_path / "tokens.txt", 3)
    port, out = free_port(), tmp_path / "run"
    refused = start(server_args(path, port, tmp_path / "tokens.txt", certs, out), tmp_path / "refused.log")
    assert refused.wait(timeout=120) == 2
    assert "validation.unbounded = true" in (tmp_path / "refused.log").read_text() and not out.exists()

    path = experiment(tmp_path, tiny_config, 3, validation={**loose, "unbounded": True}, run={"rounds": 2})
    server = start(server_args(path, port, tmp_path / "tokens.txt", certs, out), tmp_path / "s.log")
    honest = [start(client_args(port, t, certs, data=client_data(path)), tmp_path / f"c{k}.log") for k, t
              in enumerate(tokens[:2])]  # fmt: skip
    hostile = Hostile(port, certs, 2, tokens[2], client_data(path))
    for header, blob in hostile.tasks():
        head, payload = hostile.honest_update(header, blob)
        groups = unpack_tensors(payload)
        huge = pack_tensors({"p": {k: torch.full_like(v, 1e6) for k, v in groups["p"].items()}})
        assert hostile.send({**head, "num_examples": 1000}, huge).accepted
    assert server.wait(timeout=180) == 0, (tmp_path / "s.log").read_text()
    assert all(c.wait(timeout=60) == 0 for c in honest)
    moved = max(float((load_checkpoint(out / "checkpoint").params[k] - v).abs().max())
                for k, v in hostile.thetas[1].items())  # fmt: skip
    assert moved > 1e5
    log = (tmp_path / "s.log").read_text()
    assert log.count("nothing bounds one client's influence") >= 3  # at start-up and in rounds 1, 2
    assert all(rounds_of(out)[t]["unbounded"] for t in (1, 2))
    assert "nothing bounds one client&#x27;s influence" in (out / "report.html").read_text()


def test_a_secure_aggregation_site_cannot_push_the_sum_out_of_range_nor_stall_or_stay(
    tmp_path, tiny_config, certs
):
    """Three sites under secure aggregation; site 2 is hostile, the others are client processes.

    1. Masked values far outside its clip range (kept within the field): the unmasked sum is out
       of the range honest inputs can produce, the round is skipped and θ does not move.
    2. Values at −2.5 clip ranges per entry (inside the range if the others' are small): the
       round is used, and no coordinate of θ moves by more than c (the mean of honest inputs
       lies in [−c, c]; one client moves it by at most 2c).
    3. An update far over the size limit: refused, out of the round at once (no wait for the
       deadline), and its honest update sent after it is refused too.
    4. A key advert in another site's name: named an offender; in round 5 it is excluded.
    The config it joined with holds no tracker URI, password or data path."""
    c = 0.5
    path = experiment(
        tmp_path, tiny_config, 3,
        run={"rounds": 5, "tracking_uri": "postgresql://ops:hunter2@db.internal/mlflow"},
        strategy={"weighting": "uniform"},
        secagg={"enabled": True, "threshold": 0.6, "clip_range": c, "quantization_bits": 16},
    )  # fmt: skip
    tokens = write_tokens(tmp_path / "tokens.txt", 3)
    port, out = free_port(), tmp_path / "run"
    extra = ("--round-timeout", "60")
    server = start(server_args(path, port, tmp_path / "tokens.txt", certs, out, *extra), tmp_path / "s.log")
    honest = [start(client_args(port, t, certs, data=client_data(path)), tmp_path / f"c{k}.log") for k, t
              in enumerate(tokens[:2])]  # fmt: skip
    hostile = Hostile(port, certs, 2, tokens[2], client_data(path))
    assert "hunter2" not in hostile.joined.config_toml and "tracking_uri" not in hostile.joined.config_toml
    assert str(tiny_config()["data"]["path"]) not in hostile.joined.config_toml

    from fedfm.privacy import packing

    real_pack, excess = packing.pack, {1: -60.0, 2: -2.5}  # clip ranges added to every entry

    def pack(layout, delta, *args, **kwargs):
        vector = real_pack(layout, delta, *args, **kwargs)
        if state["round"] in excess:
            vector[: layout.tensor_length] = int(excess[state["round"]] * 2 ** (layout.quantization_bits - 1))
        return vector

    state = {"round": 0}
    packing.pack = pack
    replies, round_started = {}, {}
    try:
        for header, blob in hostile.tasks():
            rnd = state["round"] = header["round"]
            round_started.setdefault(rnd, time.monotonic())
            if header["status"] == "secagg":
                reply = hostile.honest_step(header)
                if rnd == 4 and header["step"] == "advertise":
                    reply["reply"]["advert"]["client"] = 0  # keys in site 0's name
                hostile.send(reply)
                continue
            head, payload = hostile.honest_update(header, blob)
            if rnd == 3:
                replies[3] = hostile.send(head, payload + b"\0" * (4 << 20))
                replies["again"] = hostile.send(head, payload)
            else:
                replies[rnd] = hostile.send(head, payload)
    finally:
        packing.pack = real_pack
    assert server.wait(timeout=240) == 0, (tmp_path / "s.log").read_text()
    assert all(p.wait(timeout=60) == 0 for p in honest)
    rounds = rounds_of(out)
    # 1: skipped, θ untouched
    assert "outside the range honest inputs can produce" in rounds[1]["skipped"]
    assert all(torch.equal(hostile.thetas[2][k], v) for k, v in hostile.thetas[1].items())
    # 2: used, every coordinate within c of where it was
    assert "skipped" not in rounds[2] and rounds[2]["num_clients"] == 3
    moved = max(float((hostile.thetas[3][k] - v).abs().max()) for k, v in hostile.thetas[2].items())
    assert 0.7 * c < moved <= c + 1e-6
    # 3: refused, dropped at once, no second try
    assert not replies[3].accepted and "the most this message may carry" in replies[3].reason
    assert not replies["again"].accepted and "not expecting a message for round 3" in replies["again"].reason
    assert rounds[3]["num_clients"] == 2 and rounds[3]["round_s"] < 30
    assert any(f["client"] == 2 and "was refused" in f["reason"] for f in rounds[3]["failed"])
    # 4: named; 5: excluded
    assert any(
        r["client"] == 2 and "advertises keys for client 0" in r["reason"] for r in rounds[4]["rejected"]
    )
    assert rounds[5]["num_clients"] == 2
    assert [f["stage"] for f in rounds[5]["failed"] if f["client"] == 2] == ["excluded"]
    assert 5 not in round_started  # it was not even asked to set up round 5's protocol


def test_under_distributed_noise_a_site_cannot_push_the_sum_past_its_norm_bound(tmp_path, tiny_config, certs):
    """Distributed Skellam noise: the server checks the unmasked sum's L2 norm against what the
    clients' clipped vectors and noise shares can reach. Round 1: the hostile site adds a vector
    of ten such bounds to its share: skipped, θ untouched. Round 2: a vector of two clip norms:
    used, and θ moves by no more than the recorded bound over the cohort."""
    path = experiment(
        tmp_path, tiny_config, 3,
        run={"rounds": 2},
        strategy={"weighting": "uniform"},
        privacy={"dp": "client", "noise": "distributed", "noise_multiplier": 0.5, "clip_norm": 0.5},
        secagg={"enabled": True, "threshold": 0.6},
    )  # fmt: skip
    tokens = write_tokens(tmp_path / "tokens.txt", 3)
    port, out = free_port(), tmp_path / "run"
    server = start(server_args(path, port, tmp_path / "tokens.txt", certs, out), tmp_path / "s.log")
    honest = [start(client_args(port, t, certs, data=client_data(path)), tmp_path / f"c{k}.log") for k, t
              in enumerate(tokens[:2])]  # fmt: skip
    hostile = Hostile(port, certs, 2, tokens[2], client_data(path))

    from fedfm.privacy import packing

    real_pack, state = packing.pack, {"round": 0}

    def pack(layout, delta, *args, **kwargs):
        vector = real_pack(layout, delta, *args, **kwargs)
        sk, count = layout.skellam, layout.max_clients
        bound = count * sk.l2_bound + packing.noise_norm_bound(count * sk.share_variance, sk.padded)
        norm = 10 * bound if state["round"] == 1 else 2 * sk.scale * sk.clip_norm
        vector[: sk.padded] += int(norm / sk.padded**0.5)  # the same in every rotated entry
        return vector

    packing.pack = pack
    try:
        for header, blob in hostile.tasks():
            state["round"] = header["round"]
            if header["status"] == "secagg":
                hostile.send(hostile.honest_step(header))
            else:
                hostile.send(*hostile.honest_update(header, blob))
    finally:
        packing.pack = real_pack
    assert server.wait(timeout=240) == 0, (tmp_path / "s.log").read_text()
    assert all(p.wait(timeout=60) == 0 for p in honest)
    rounds = rounds_of(out)
    assert "L2 norm lie outside the range honest inputs can produce" in rounds[1]["skipped"]
    theta = {**hostile.thetas, 3: load_checkpoint(out / "checkpoint").params}
    assert all(torch.equal(theta[2][k], v) for k, v in theta[1].items())
    assert "skipped" not in rounds[2] and rounds[2]["num_clients"] == 3
    moved = sum(float((theta[3][k] - v).pow(2).sum()) for k, v in theta[2].items()) ** 0.5
    assert 0 < moved <= rounds[2]["secagg"]["sum_bound"] / 3


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


def kit_env() -> dict:
    """PATH with this interpreter's folder first, where the ``fedfm`` command lives."""
    import sys
    from pathlib import Path

    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return [part.decode() for part in fh.read().split(b"\0") if part]


def test_kit_scripts_exec_fedfm_and_pass_their_options_through(tmp_path, tiny_config):
    """A provisioned federation run by its kits' start.sh with extra options (the server's
    --output, --round-timeout, --quiet; the clients' --retry, --give-up, --name): each script's
    process becomes fedfm's (exec), so stopping the script stops fedfm and leaves nothing behind."""
    import subprocess

    from fedfm.deploy.provision import provision

    port, out = free_port(), tmp_path / "run"
    kits = provision(tmp_path / "fed", ["hosp-a", "hosp-b"], ["localhost"], port=port)
    path = experiment(tmp_path, tiny_config, 2)
    env, logs = kit_env(), []

    def kit(name, *args):
        logs.append((tmp_path / f"{name}.log").open("w"))
        command = ["bash", str(kits[name] / "start.sh"), *map(str, args)]
        return subprocess.Popen(command, env=env, stdout=logs[-1], stderr=subprocess.STDOUT)

    server = kit("server", path, "--output", out, "--round-timeout", "120", "--quiet")
    time.sleep(1.0)
    said = cmdline(server.pid)
    assert said[0] != "bash" and "server" in said and said[said.index("--output") + 1] == str(out)
    data = client_data(path)
    clients = [kit(s, data, "--retry", "0.5", "--give-up", "120", "--name", s) for s in ("hosp-a", "hosp-b")]
    assert server.wait(timeout=240) == 0, (tmp_path / "server.log").read_text()
    assert all(c.wait(timeout=60) == 0 for c in clients)
    assert rounds_of(out)[1]["num_clients"] == 2  # the run went where --output said
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    sites = next(r["names"] for r in rows if r.get("event") == "sites")  # the roster, by name
    assert sites == {"0": "hosp-a", "1": "hosp-b"}
    assert {(r["client"], r["name"]) for r in rows if r.get("event") == "client"} == {
        (0, "hosp-a"),
        (1, "hosp-b"),
    }

    # nothing listens now: the client retries until --give-up; stopping its script stops it
    lone = kit("hosp-a", data, "--retry", "0.5", "--give-up", "300")
    time.sleep(2.0)
    said = cmdline(lone.pid)
    assert said[0] != "bash" and "client" in said and said[said.index("--give-up") + 1] == "300"
    os.kill(lone.pid, signal.SIGTERM)
    assert lone.wait(timeout=30) != 0
    left = [p for p in os.listdir("/proc") if p.isdigit() and str(kits["hosp-a"]) in " ".join(_safe(p))]
    assert left == []
    for fh in logs:
        fh.close()


def _safe(pid: str) -> list[str]:
    try:
        return cmdline(int(pid))
    except OSError:
        return []
