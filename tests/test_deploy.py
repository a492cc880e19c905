"""Deployment over gRPC with real server and client processes on 127.0.0.1 (TLS, tokens, faults)."""

from __future__ import annotations

import json
import signal

import pytest
import tomli_w
import torch
from tests.deploy_tools import (
    client_args,
    client_data,
    free_port,
    make_certificates,
    run_federation,
    server_args,
    start,
    wait_for_file_text,
    write_tokens,
)

import fedfm
from fedfm.server.checkpoint import load_checkpoint

pytest.importorskip("grpc")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


def deploy_config(tiny_config, tmp_path, **sections):
    base = {"run": {"rounds": 2, "seed": 0, "threads": 1}, "partition": {"method": "iid", "num_clients": 3}}
    # a deployment weighted by examples needs a bound on the counts, and one on each update's influence
    base["validation"] = {"max_num_examples": 1000, "max_update_norm": 100.0}
    base["sampling"] = {"fraction": 1.0}
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    cfg = tiny_config(**base)
    path = tmp_path / "exp.toml"
    path.write_text(tomli_w.dumps(cfg))
    return cfg, path


def final_params(run_dir):
    return load_checkpoint(run_dir / "checkpoint").params


DP = {
    "privacy": {"dp": "client", "noise_multiplier": 0.5, "clip_norm": 0.5, "noise_seed": 11},
    "strategy": {"weighting": "uniform"},
}


SECAGG = {"secagg": {"enabled": True}, "strategy": {"weighting": "uniform"}}
# FedSA-LoRA under secure aggregation: the B matrices stay on the clients, only A is masked
FEDSA = {**SECAGG, "personalization": {"method": "fedsa"}, "data": {"client_test_fraction": 0.3}}


@pytest.mark.parametrize(
    "extra", [{}, DP, SECAGG, FEDSA], ids=["plain", "client-level-dp", "secure-aggregation", "fedsa-secagg"]
)
def test_full_run_over_mutual_tls_matches_the_simulation(tmp_path, tiny_config, certs, extra):
    cfg, path = deploy_config(tiny_config, tmp_path, **extra)
    port, tokens = free_port(), write_tokens(tmp_path / "tokens.txt", 3)
    out = tmp_path / "deployed"
    run_federation(path, tmp_path, certs, tokens, out, port)
    rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rounds if r.get("event") == "round"]
    assert [r["round"] for r in rounds] == [0, 1, 2] and all(r["num_clients"] == 3 for r in rounds[1:])
    if extra is DP:  # seeded noise is keyed by a secret only the server's run folder holds …
        key = out / "noise.key"
        assert len(key.read_bytes()) == 32 and oct(key.stat().st_mode & 0o777) == "0o600"
        (tmp_path / "simulated").mkdir()  # … which a rerun reuses to draw the same noise
        (tmp_path / "simulated" / "noise.key").write_bytes(key.read_bytes())
    simulated = fedfm.run(cfg, output=tmp_path / "simulated", progress=False)
    deployed, local = final_params(out), final_params(simulated.run_dir)
    for k in local:  # the same training code on both sides; only the summation order may differ
        torch.testing.assert_close(deployed[k], local[k], atol=1e-5, rtol=1e-4)
    assert rounds[-1]["test_accuracy"] == pytest.approx(simulated.history[-1]["test_accuracy"])
    if extra is FEDSA:  # the global B matrices never moved: every client kept and trained its own
        from fedfm.algorithms.personal import lora_b
        from fedfm.config import make_config
        from fedfm.models.state import get_trainable_state
        from fedfm.tasks.setup import build_bundle, prepare_data

        run_cfg = make_config(cfg)
        start = get_trainable_state(build_bundle(run_cfg, prepare_data(run_cfg).train.label_names).trainable)
        assert all(torch.equal(deployed[k], start[k]) for k in deployed if lora_b(k))
    if extra in (SECAGG, FEDSA):  # the protocol ran across processes: key exchange, masking, unmasking
        assert all(r["secagg"]["bytes_up"] > 0 for r in rounds[1:])
        assert not any(
            r["event"] == "client" for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        )
    if extra is DP:  # clients clipped with the clip norm they were sent; the server accounted the same ε
        assert rounds[-1]["epsilon"] == pytest.approx(simulated.history[-1]["epsilon"])


def rounds_of(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["round"]: r for r in rows if r.get("event") == "round"}


def test_unknown_token_and_missing_client_certificate_are_refused(tmp_path, tiny_config, certs):
    _, path = deploy_config(tiny_config, tmp_path, run={"rounds": 1, "threads": 1})
    port, tokens = free_port(), write_tokens(tmp_path / "tokens.txt", 3)
    out = tmp_path / "run"
    server = start(server_args(path, port, tmp_path / "tokens.txt", certs, out), tmp_path / "server.log")
    intruder = start(
        client_args(port, "not-a-token", certs, data=client_data(path)), tmp_path / "intruder.log"
    )
    assert intruder.wait(timeout=60) == 2
    assert "refused this client: unknown or missing client token" in (tmp_path / "intruder.log").read_text()
    no_cert = [
        "client",
        "--server",
        f"localhost:{port}",
        "--token",
        tokens[0],
        "--data",
        "config",
        "--ca",
        certs["ca"],
        "--retry",
        "0.5",
        "--give-up",
        "3",
    ]
    stranger = start(no_cert, tmp_path / "stranger.log")  # mutual TLS: no client certificate, no channel
    assert stranger.wait(timeout=60) == 2
    assert "giving up" in (tmp_path / "stranger.log").read_text()
    clients = [
        start(client_args(port, t, certs, data=client_data(path)), tmp_path / f"c{k}.log")
        for k, t in enumerate(tokens)
    ]
    assert server.wait(timeout=180) == 0
    assert all(c.wait(timeout=60) == 0 for c in clients)
    assert rounds_of(out)[1]["num_clients"] == 3  # the refused ones never joined a round


def test_killed_client_is_left_out_at_the_deadline_and_a_restarted_one_rejoins(tmp_path, tiny_config, certs):
    # local training long enough (300 steps) that the kill lands while round 2 is running
    training = {"local_steps": 300}
    _, path = deploy_config(tiny_config, tmp_path, run={"rounds": 3, "threads": 1}, training=training)
    port, tokens = free_port(), write_tokens(tmp_path / "tokens.txt", 3)
    out = tmp_path / "run"
    args = server_args(
        path, port, tmp_path / "tokens.txt", certs, out, "--round-timeout", "15", "--min-available", "3"
    )
    server = start(args, tmp_path / "s.log")
    clients = [
        start(client_args(port, t, certs, data=client_data(path)), tmp_path / f"c{k}.log")
        for k, t in enumerate(tokens)
    ]
    wait_for_file_text(out / "metrics.jsonl", '"event": "round", "round": 1,')
    clients[2].send_signal(signal.SIGKILL)
    clients[2].wait()
    wait_for_file_text(out / "metrics.jsonl", '"event": "round", "round": 2,')
    again = start(
        client_args(port, tokens[2], certs, "--give-up", "30", data=client_data(path)),
        tmp_path / "c2-again.log",
    )
    assert server.wait(timeout=300) == 0, (tmp_path / "s.log").read_text()
    assert all(c.wait(timeout=60) == 0 for c in clients[:2]) and again.wait(timeout=60) == 0
    rounds = rounds_of(out)
    assert rounds[2]["num_clients"] == 2
    assert rounds[2]["failed"] == [  # the site by name beside its index (tokens.txt: site2)
        {
            "client": 2,
            "stage": "timeout",
            "reason": "no update within the round deadline (15 s)",
            "name": "site2",
        }
    ]
    assert (
        rounds[3]["num_clients"] == 3
    )  # round 3 waited for three connected clients: the restarted one rejoined
    assert "joined run" in (tmp_path / "c2-again.log").read_text()


def test_server_killed_and_resumed_ends_like_an_uninterrupted_run(tmp_path, tiny_config, certs):
    cfg, path = deploy_config(tiny_config, tmp_path, run={"rounds": 3, "threads": 1})
    port, tokens = free_port(), write_tokens(tmp_path / "tokens.txt", 3)
    out = tmp_path / "run"
    args = server_args(path, port, tmp_path / "tokens.txt", certs, out)
    server = start(args, tmp_path / "s1.log")
    clients = [
        start(client_args(port, t, certs, data=client_data(path)), tmp_path / f"c{k}.log")
        for k, t in enumerate(tokens)
    ]
    wait_for_file_text(out / "metrics.jsonl", '"event": "round", "round": 1,')
    server.send_signal(signal.SIGKILL)
    server.wait()
    resumed = args[:1] + args[2:]  # no config file: the run folder's own config is used
    i = resumed.index("--output")
    resumed[i : i + 2] = ["--resume", out]
    server = start(resumed, tmp_path / "s2.log")
    assert server.wait(timeout=240) == 0, (tmp_path / "s2.log").read_text()
    assert all(c.wait(timeout=60) == 0 for c in clients)
    assert sorted(rounds_of(out)) == [0, 1, 2, 3]
    simulated = fedfm.run(cfg, output=tmp_path / "simulated", progress=False)
    deployed, local = final_params(out), final_params(simulated.run_dir)
    for k in local:
        torch.testing.assert_close(deployed[k], local[k], atol=1e-5, rtol=1e-4)


def test_malformed_updates_are_rejected_while_the_round_completes(tmp_path, tiny_config, certs):
    import threading

    from fedfm.deploy import fedfm_pb2 as pb
    from fedfm.deploy.client import ClientSecurity
    from fedfm.deploy.fedfm_pb2_grpc import FedFMStub
    from fedfm.deploy.server import Security, serve
    from fedfm.wire import chunks, join, pack_tensors, unpack_tensors

    cfg, path = deploy_config(tiny_config, tmp_path, run={"rounds": 2, "threads": 1})
    port, tokens = free_port(), write_tokens(tmp_path / "tokens.txt", 3)
    out = tmp_path / "run"
    security = Security(str(certs["server"]), str(certs["server_key"]), str(certs["ca"]))
    box: dict = {}
    thread = threading.Thread(
        target=lambda: box.update(
            result=serve(
                fedfm.RunConfig.model_validate(cfg),
                f"127.0.0.1:{port}",
                tmp_path / "tokens.txt",
                security,
                output=out,
                progress=False,
            )
        ),
        daemon=True,
    )
    thread.start()
    good = [
        start(client_args(port, t, certs, data=client_data(path)), tmp_path / f"c{k}.log")
        for k, t in enumerate(tokens[:2])
    ]
    me = ClientSecurity(str(certs["ca"]), str(certs["site2"]), str(certs["site2_key"]))
    stub, meta = FedFMStub(me.channel(f"localhost:{port}")), (("authorization", f"Bearer {tokens[2]}"),)
    stub.Join(pb.JoinRequest(token=tokens[2]), metadata=meta, wait_for_ready=True, timeout=120)
    for rnd in (1, 2):
        while True:
            header, blob = join((c.header, c.data) for c in stub.GetTask(pb.TaskRequest(), metadata=meta))
            if header["status"] == "train":
                break
        if rnd == 1:  # bytes that are not a safetensors blob
            payload, head = b"\x00garbage" * 10, {"round": rnd, "num_examples": 10}
        else:  # well-formed, but not finite
            params = unpack_tensors(blob)["p"]
            payload = pack_tensors({"p": {k: torch.full_like(v, float("nan")) for k, v in params.items()}})
            head = {"round": rnd, "num_examples": 10}
        message = (pb.Chunk(header=t, data=d) for t, d in chunks(head, payload))
        reply = stub.SubmitUpdate(message, metadata=meta)
        assert reply.accepted  # received; the round loop judges it
    thread.join(timeout=240)
    assert all(c.wait(timeout=60) == 0 for c in good)
    rounds = rounds_of(out)
    assert rounds[1]["num_clients"] == 2 and rounds[1]["failed"][0]["client"] == 2
    assert rounds[1]["failed"][0]["stage"] == "decode"
    assert rounds[2]["num_clients"] == 2 and rounds[2]["rejected"][0]["client"] == 2
    assert "contains NaN or Inf" in rounds[2]["rejected"][0]["reason"]
    assert box["result"].history[-1]["round"] == 2


def test_a_payload_over_64_mb_streams_in_chunks_both_ways(tmp_path, tiny_config, tiny_model_dir):
    """Full fine-tuning of a BERT with a 17.6M-value embedding table: 70+ MB each way, over plaintext."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    big = tmp_path / "big-bert"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=576,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    BertForSequenceClassification(config).save_pretrained(big)
    tok.save_pretrained(big)
    _, path = deploy_config(
        tiny_config,
        tmp_path,
        run={"rounds": 1},
        model={"name": str(big)},
        peft={"method": "full"},
        partition={"num_clients": 1},
        training={"local_steps": 1, "optimizer": "sgd"},
    )
    port, tokens = free_port(), write_tokens(tmp_path / "tokens.txt", 1)
    out = tmp_path / "run"
    args = ["server", path, "--address", f"127.0.0.1:{port}", "--tokens", tmp_path / "tokens.txt"]
    server = start([*args, "--insecure", "--output", out, "--quiet"], tmp_path / "s.log")
    client = start(
        [
            "client",
            "--server",
            f"127.0.0.1:{port}",
            "--token",
            tokens[0],
            "--data",
            client_data(path),
            "--insecure",
        ],
        tmp_path / "c.log",
    )
    assert server.wait(timeout=300) == 0, (tmp_path / "s.log").read_text()
    assert client.wait(timeout=60) == 0
    record = rounds_of(out)[1]
    assert (
        record["num_clients"] == 1 and record["bytes_up"] > 64 * 2**20 and record["bytes_down"] > 64 * 2**20
    )
    assert "insecure mode" in (tmp_path / "s.log").read_text()


def test_one_round_with_100_light_clients(tmp_path):
    """100 real gRPC clients (four processes of 25 identities on a shared tiny model) in one round."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from deploy import load_test

    result = load_test(tmp_path, clients=100, processes=4)
    assert result["num_clients_per_round"] == [100] and result["failed"] == 0
