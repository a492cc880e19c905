"""Deployment over gRPC with real server and client processes on 127.0.0.1 (TLS, tokens, faults)."""

from __future__ import annotations

import json

import pytest
import tomli_w
import torch
from tests.deploy_tools import free_port, make_certificates, start, write_tokens

import fedfm
from fedfm.checkpoint import load_checkpoint

pytest.importorskip("grpc")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


def deploy_config(tiny_config, tmp_path, **sections):
    cfg = tiny_config(
        run={"rounds": 2, "seed": 0, "threads": 1},
        partition={"method": "iid", "num_clients": 3},
        sampling={"fraction": 1.0},
        **sections,
    )
    path = tmp_path / "exp.toml"
    path.write_text(tomli_w.dumps(cfg))
    return cfg, path


def server_args(path, port, tokens, certs, out, *extra):
    return [
        "server",
        path,
        "--address",
        f"127.0.0.1:{port}",
        "--tokens",
        tokens,
        "--cert",
        certs["server"],
        "--key",
        certs["server_key"],
        "--client-ca",
        certs["ca"],
        "--output",
        out,
        "--quiet",
        *extra,
    ]


def client_args(port, token, certs, *extra):
    return [
        "client",
        "--server",
        f"localhost:{port}",
        "--token",
        token,
        "--data",
        "config",
        "--ca",
        certs["ca"],
        "--cert",
        certs["client"],
        "--key",
        certs["client_key"],
        "--retry",
        "0.5",
        *extra,
    ]


def final_params(run_dir):
    return load_checkpoint(run_dir / "checkpoint").params


def test_full_run_over_mutual_tls_matches_the_simulation(tmp_path, tiny_config, certs):
    cfg, path = deploy_config(tiny_config, tmp_path)
    port, tokens = free_port(), write_tokens(tmp_path / "tokens.txt", 3)
    out = tmp_path / "deployed"
    server = start(server_args(path, port, tmp_path / "tokens.txt", certs, out), tmp_path / "server.log")
    clients = [start(client_args(port, t, certs), tmp_path / f"c{k}.log") for k, t in enumerate(tokens)]
    assert server.wait(timeout=240) == 0, (tmp_path / "server.log").read_text()
    for c in clients:
        assert c.wait(timeout=60) == 0
    rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rounds if r.get("event") == "round"]
    assert [r["round"] for r in rounds] == [0, 1, 2] and all(r["num_clients"] == 3 for r in rounds[1:])
    simulated = fedfm.run(cfg, output=tmp_path / "simulated", progress=False)
    deployed, local = final_params(out), final_params(simulated.run_dir)
    for k in local:  # the same training code on both sides; only the summation order may differ
        torch.testing.assert_close(deployed[k], local[k], atol=1e-5, rtol=1e-4)
    assert rounds[-1]["test_accuracy"] == pytest.approx(simulated.history[-1]["test_accuracy"])
