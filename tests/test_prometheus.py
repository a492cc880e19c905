"""Prometheus metrics of a real deployment, scraped by a real Prometheus server.

A server on loopback with ``--metrics``, two client processes, and Debian's ``prometheus`` binary
(``make test`` installs it with apt, as it does Chromium) scraping every second with a temporary
config; PromQL through Prometheus's HTTP API. The shipped Grafana dashboard may name only
exported metrics.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import tomli_w
from tests.deploy_tools import client_args, client_data, free_port, make_certificates, server_args, start

pytest.importorskip("grpc")
pytest.importorskip("prometheus_client")

from fedfm.deploy.metrics import METRICS, ServerMetrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HISTOGRAMS = {"fedfm_round_duration_seconds", "fedfm_aggregation_seconds", "fedfm_evaluation_seconds",
              "fedfm_rpc_duration_seconds"}  # fmt: skip


def exported() -> set[str]:
    """Every series name a scrape can hold (a histogram's _bucket, _sum and _count)."""
    names = set(METRICS)
    for h in HISTOGRAMS:
        names |= {f"{h}_bucket", f"{h}_sum", f"{h}_count"}
    return names


def test_every_grafana_expression_names_an_exported_metric():
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "fedfm.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\bfedfm_\w+", e)}
    assert len(exprs) >= 10 and used and used <= exported(), used - exported()
    assert {m.removesuffix("_bucket") for m in used} >= {"fedfm_round", "fedfm_clients_connected"}


def test_round_records_and_rpcs_become_metrics():
    from prometheus_client import generate_latest

    m = ServerMetrics()
    m.round_done({"round": 0, "eval_s": 0.5})
    m.round_done({"round": 1, "num_clients": 3, "round_s": 2.0, "aggregate_s": 0.2, "eval_s": 0.5,
                  "bytes_up": 1000, "bytes_down": 4000, "epsilon": 1.25,
                  "failed": [{"client": 4, "stage": "timeout"}], "rejected": [{"client": 5}]})  # fmt: skip
    text = generate_latest(m.registry).decode()
    for line in ("fedfm_rounds_completed_total 1.0", "fedfm_clients_trained_total 3.0",
                 'fedfm_clients_failed_total{stage="timeout"} 1.0', "fedfm_clients_rejected_total 1.0",
                 "fedfm_bytes_up_total 1000.0", "fedfm_bytes_down_total 4000.0", "fedfm_epsilon_spent 1.25",
                 "fedfm_evaluation_seconds_count 2.0", "fedfm_round 1.0"):  # fmt: skip
        assert line in text, line
    series = {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")
    }
    assert series <= exported()


def query(port: int, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as reply:
        body = json.loads(reply.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def value(port: int, promql: str) -> float | None:
    result = query(port, promql)
    return float(result[0]["value"][1]) if result else None


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="no prometheus binary (make test installs it)")
def test_a_real_prometheus_scrapes_a_real_deployment(tmp_path, tiny_config):
    certs = make_certificates(tmp_path / "certs", sites=2)
    (tmp_path / "tokens.txt").write_text("site0\nsite1\n")
    cfg = tiny_config(run={"rounds": 3, "threads": 1}, partition={"method": "iid", "num_clients": 2},
                      sampling={"fraction": 1.0}, eval={"at_start": True},
                      validation={"max_num_examples": 1000, "max_update_norm": 100.0})  # fmt: skip
    path = tmp_path / "exp.toml"
    path.write_text(tomli_w.dumps(cfg))
    port, metrics_port, prom_port, out = free_port(), free_port(), free_port(), tmp_path / "run"
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: fedfm\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"),
    )  # fmt: skip
    server = start(
        server_args(
            path, port, tmp_path / "tokens.txt", certs, out, "--metrics", f"127.0.0.1:{metrics_port}"
        ),
        tmp_path / "server.log",
    )
    try:
        data = client_data(path)
        clients = [
            start(client_args(port, None, certs, "--delay", "1.5", site=k, data=data), tmp_path / f"c{k}.log")
            for k in range(2)
        ]
        assert server.wait(timeout=240) == 0, (tmp_path / "server.log").read_text()
        assert all(c.wait(timeout=60) == 0 for c in clients)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # Prometheus appends its last scrapes
            if (value(prom_port, "max_over_time(fedfm_rounds_completed_total[10m])") or 0) >= 2:
                break
            time.sleep(1)
        assert value(prom_port, "max_over_time(fedfm_rounds_completed_total[10m])") >= 2
        assert value(prom_port, "max_over_time(fedfm_rounds_planned[10m])") == 3
        assert value(prom_port, "max_over_time(fedfm_clients_connected[10m])") == 2
        assert value(prom_port, "max_over_time(fedfm_clients_trained_total[10m])") >= 4  # 2 per round
        assert value(prom_port, "max_over_time(fedfm_bytes_up_total[10m])") > 0
        joins = value(prom_port, 'max_over_time(fedfm_rpc_duration_seconds_count{method="Join"}[10m])')
        assert joins is not None and joins >= 2
        url = f"http://127.0.0.1:{prom_port}/api/v1/label/__name__/values"  # every series name it stored
        with urllib.request.urlopen(url, timeout=10) as reply:
            names = {n for n in json.loads(reply.read())["data"] if n.startswith("fedfm_")}
        assert names <= exported() and "fedfm_round_duration_seconds_bucket" in names, names - exported()
    finally:
        for p in (server, prometheus):
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=30)
