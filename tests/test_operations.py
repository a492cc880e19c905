"""Operating a federation (issue 33): sites by name everywhere, `fedfm status`, `--json`."""

from __future__ import annotations

import json

import pytest
from tests.conftest import make_rows
from tests.test_checkpoint import cli
from tests.test_first_hour import _write_csv

import fedfm
from fedfm.reporting.dashboard.state import RunView, eta
from fedfm.reporting.status import run_status


def records(run_dir, event):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("event") == event]


def test_natural_sites_are_named_in_metrics_report_dashboard_and_status(tiny_config, tmp_path):
    rows = [{**r, "site": ["hosp-b", "hosp-a", "clinic-c"][i % 3]} for i, r in enumerate(make_rows(30))]
    path = _write_csv(tmp_path / "sites.csv", rows)
    cfg = tiny_config(
        data={"path": str(path)},
        partition={"method": "natural", "column": "site"},
        sampling={"fraction": 1.0},
        run={"rounds": 2},
    )
    del cfg["partition"]["num_clients"]
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    names = {"0": "clinic-c", "1": "hosp-a", "2": "hosp-b"}  # sorted column values, as partitioned
    assert records(result.run_dir, "sites")[0]["names"] == names
    clients = records(result.run_dir, "client")
    assert clients and all(c["name"] == names[str(c["client"])] for c in clients)
    partition = json.loads((result.run_dir / "partition.json").read_text())
    assert [c["name"] for c in partition["clients"]] == ["clinic-c", "hosp-a", "hosp-b"]
    view = RunView(result.run_dir)
    view.poll()
    assert {c["client"]: c["name"] for c in view.cohort()} == {0: "clinic-c", 1: "hosp-a", 2: "hosp-b"}
    said = json.loads(cli("status", result.run_dir, "--json").stdout)
    assert said["state"] == "finished" and said["round"] == 2 and said["sites"] == names
    assert said["dp"] == "none" and said["metrics"]["test_accuracy"] == pytest.approx(
        result.final_metrics["test_accuracy"]
    )
    assert "no DP" in cli("status", result.run_dir).stdout
    config = json.loads(cli("config", "--set", "run.rounds=3", "--json").stdout)
    assert config["run"]["rounds"] == 3 and config["training"]["max_grad_norm"] == 1.0
    report = json.loads(cli("report", result.run_dir, "--json").stdout)
    assert report["report"].endswith("report.html") and report["round"] == 2


def test_eta_is_the_median_of_the_last_rounds_times_the_rounds_left():
    rounds = [{"round": t, "elapsed_s": s} for t, s in enumerate([0.0, 10.0, 30.0, 40.0, 55.0])]
    left, basis = eta(rounds, 10)  # spans 10, 20, 10, 15: median 12.5; 6 rounds left
    assert left == pytest.approx(75.0) and "median of the last 4 rounds" in basis
    spans = [0.0, 100.0, 101.0, 102.0, 103.0, 104.0, 105.0]  # the slow first round has left the window
    assert eta([{"round": t, "elapsed_s": s} for t, s in enumerate(spans)], 8)[0] == pytest.approx(2.0)
    assert eta(rounds[:1], 10)[0] is None and eta(rounds, 4)[0] is None


def test_status_of_a_run_in_progress_and_of_an_idle_one(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.toml").write_text('[run]\nrounds = 5\n[privacy]\ndp = "server"\ntarget_epsilon = 8.0\n')
    lines = [
        {"event": "sites", "names": {"0": "hosp-a", "1": "hosp-b"}},
        {"event": "round", "round": 1, "elapsed_s": 10.0, "epsilon": 1.5},
        {
            "event": "round",
            "round": 2,
            "elapsed_s": 22.0,
            "epsilon": 2.5,
            "failed": [{"client": 1, "stage": "timeout", "reason": "no update within 60 s"}],
        },
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    mtime = (run / "metrics.jsonl").stat().st_mtime
    said = run_status(run, now=mtime + 5)
    assert said["state"] == "running" and said["eta_s"] == pytest.approx(36.0)  # 3 left × 12 s
    assert said["epsilon"] == 2.5 and said["target_epsilon"] == 8.0
    assert said["problems"] == [
        {"round": 2, "kind": "failed", "client": 1, "stage": "timeout", "reason": "no update within 60 s",
         "name": "hosp-b"}
    ]  # fmt: skip
    idle = run_status(run, now=mtime + 3600)
    assert idle["state"] == "idle" and idle["eta_s"] is None
