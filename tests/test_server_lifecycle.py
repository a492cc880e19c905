"""A deployed server as an orchestrator sees it, with real processes: /healthz and /readyz for
its probes, SIGTERM (a pod's stop) ending it through its cleanup with every finished round
checkpointed, and --resume-existing continuing the run when the pod starts again."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request

import pytest
from tests.deploy_tools import (
    client_args,
    client_data,
    free_port,
    make_certificates,
    server_args,
    start,
    wait_for_file_text,
    write_tokens,
)
from tests.test_deploy_attacks import experiment

pytest.importorskip("grpc")


def probe(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


def test_probes_sigterm_and_resume_existing(tmp_path, tiny_config):
    certs = make_certificates(tmp_path / "certs", sites=2)
    tokens = write_tokens(tmp_path / "tokens.txt", 2)
    path = experiment(tmp_path, tiny_config, 2, run={"rounds": 3, "threads": 1})
    port, health, out = free_port(), free_port(), tmp_path / "run"
    extra = ("--health", f"127.0.0.1:{health}", "--resume-existing", "--round-timeout", "60",
             "--log-json", tmp_path / "server.jsonl")  # fmt: skip
    server = start(server_args(path, port, tmp_path / "tokens.txt", certs, out, *extra), tmp_path / "s1.log")
    deadline = time.monotonic() + 120
    while probe(health, "/readyz") != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert probe(health, "/healthz") == 200 and probe(health, "/readyz") == 200
    assert probe(health, "/metrics") == 404  # nothing else is served
    data = client_data(path)
    logs = [("--log-json", tmp_path / "client0.jsonl"), ()]
    clients = [
        start(
            client_args(port, t, certs, "--delay", "2", "--give-up", "120", *logs[k], data=data),
            tmp_path / f"c{k}.log",
        )
        for k, t in enumerate(tokens)
    ]
    wait_for_file_text(out / "metrics.jsonl", '"round": 1,', timeout=180)
    server.send_signal(signal.SIGTERM)  # mid-run, as Kubernetes stops a pod
    assert server.wait(timeout=60) == 143
    said = (tmp_path / "s1.log").read_text()
    assert "every finished round is checkpointed" in said and "Traceback" not in said
    assert probe(health, "/healthz") == 0  # its ports are closed
    rounds = [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(x).get("event") == "round"]  # fmt: skip
    assert 1 <= max(rounds) < 3

    # the pod starts again with the same arguments: the run resumes and finishes
    again = start(server_args(path, port, tmp_path / "tokens.txt", certs, out, *extra), tmp_path / "s2.log")
    assert again.wait(timeout=240) == 0, (tmp_path / "s2.log").read_text()
    assert all(c.wait(timeout=120) == 0 for c in clients)
    final = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in final if r.get("event") == "round" and r["round"] > 0] == [1, 2, 3]
    # structured logs: the server's --log-json, the run folder's log.jsonl, a client's --log-json
    server_log = [json.loads(x) for x in (tmp_path / "server.jsonl").read_text().splitlines()]
    assert {r["name"] for r in server_log if r.get("event") == "joined"} == {"site0", "site1"}
    assert all(r["source"] == "server" and r["time"].endswith("+00:00") for r in server_log)
    run_log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["round"] for r in run_log if r.get("event") == "round" and r.get("round")][-1] == 3
    client_log = [json.loads(x) for x in (tmp_path / "client0.jsonl").read_text().splitlines()]
    assert any("update sent" in r["message"] for r in client_log) and client_log[0]["source"] == "client"
