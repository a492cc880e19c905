"""Asynchronous mode over gRPC (``fedfm server --mode async``): real client processes of different
speeds on 127.0.0.1, staleness counted from the server's own record, a killed server resumed."""

from __future__ import annotations

import json
import signal

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
from tests.test_deploy import deploy_config

pytest.importorskip("grpc")


def records(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("event") == "round"]


def test_async_server_with_a_slow_client_is_killed_and_resumes(tmp_path, tiny_config):
    certs = make_certificates(tmp_path / "certs")
    # fast clients may bring two updates to a buffer: they move the model on while the slow one trains
    fedbuff = {"buffer_size": 3, "concurrency": 4, "max_per_client": 2, "max_staleness": 20}
    cfg, path = deploy_config(
        tiny_config, tmp_path, run={"rounds": 10}, partition={"num_clients": 4}, fedbuff=fedbuff
    )
    port, tokens = free_port(), write_tokens(tmp_path / "tokens.txt", 4)
    out = tmp_path / "run"
    args = server_args(
        path, port, tmp_path / "tokens.txt", certs, out, "--mode", "async", "--round-timeout", "60"
    )
    page = free_port()  # the deployment's live dashboard, beside the first server's life
    server = start([*args, "--dashboard", page], tmp_path / "s1.log")
    slow = 3  # this client waits 1.5 s before every upload, the other three 0.3 s
    clients = [
        start(
            client_args(port, t, certs, "--delay", "1.5" if k == slow else "0.3", data=client_data(path)),
            tmp_path / f"c{k}.log",
        )
        for k, t in enumerate(tokens)
    ]
    wait_for_file_text(out / "metrics.jsonl", '"event": "round", "round": 4,', timeout=180)
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{page}/api/runs", timeout=10) as reply:
        shown = json.loads(reply.read())
    assert shown[0]["mode"] == "async" and shown[0]["round"] >= 4  # fedfm server --dashboard
    server.send_signal(signal.SIGKILL)
    server.wait()
    resumed = [args[0], *(a for a in args[2:] if a not in ("--mode", "async"))]  # no config file
    i = resumed.index("--output")
    resumed[i : i + 2] = ["--resume", out]
    server = start(resumed, tmp_path / "s2.log")
    assert server.wait(timeout=240) == 0, (tmp_path / "s2.log").read_text()
    assert all(c.wait(timeout=60) == 0 for c in clients)
    steps = {r["round"]: r for r in records(out)}
    assert sorted(steps) == list(range(11)), (tmp_path / "s2.log").read_text()
    trained = [steps[t] for t in range(1, 11)]
    assert all(r["num_clients"] == 3 and len(r["staleness"]) == 3 for r in trained)
    assert all(0 <= tau <= 20 for r in trained for tau in r["staleness"])
    # the virtual clock is the server's wall clock, continued across the restart
    times = [r["virtual_time_s"] for r in trained]
    assert times == sorted(times) and times[-1] > 0
    # the slow client's updates arrive after the fast ones moved the model on: stale by the
    # server's record (the round its reply names is never read)
    slow_taus = [
        tau for r in trained for c, tau in zip(r["cohort"], r["staleness"], strict=True) if c == slow
    ]
    slow_stale = [x for r in trained for x in r["rejected"] if x["client"] == slow and "stale" in x["reason"]]
    assert slow_taus or slow_stale
    assert all(tau >= 1 for tau in slow_taus)
    assert sum(c != slow for r in trained for c in r["cohort"]) > 20  # the fast clients carry the run


def test_the_coordinator_counts_a_reply_against_the_task_it_posted():
    """In async mode a reply's header round is not trusted: admission and the version come from
    the task the server posted; a second reply to one task, or a reply with no task, is refused."""
    from fedfm.deploy.auth import Roster
    from fedfm.deploy.engine import Coordinator, GrpcEngine
    from fedfm.types import RoundContext

    class Job:
        rank = None

    coord = Coordinator(Roster([]), "", [], "r")
    engine = GrpcEngine(coord, [Job(), Job()], round_timeout_s=5, min_available=0, wait_timeout_s=0)
    import torch

    engine.post_each({"w": torch.zeros(2)}, [0], RoundContext(round=7, seed=0))
    assert coord.admit(0, {"round": 99_999}) > 0  # a made-up round does not matter
    with pytest.raises(ValueError, match="not expecting"):
        coord.admit(1, {"round": 7})  # no task posted to client 1
    with pytest.raises(ValueError, match="not expecting"):
        coord.admit(0, {"round": 7, "step": "shares"})
    assert coord.delivered(0, 99_999, None) and not coord.delivered(0, 7, None)  # once only
    engine.post_each({"w": torch.zeros(2)}, [1], RoundContext(round=8, seed=0))
    engine.withdraw(1)
    with pytest.raises(ValueError, match="not expecting"):
        coord.admit(1, {"round": 8})  # a withdrawn (timed-out) task takes no late reply
