"""Console output: progress with an ETA in a terminal, plain unwrapped lines in a log."""

from __future__ import annotations

import tomli_w
from tests.test_checkpoint import cli

from fedfm.reporting.console import Eta, duration


def test_durations_read_as_people_read_them():
    assert [duration(s) for s in (0, 9.4, 61, 3599, 3600, 11_100)] == [
        "0s",
        "9s",
        "1m01s",
        "59m59s",
        "1h00m",
        "3h05m",
    ]


def test_eta_is_the_mean_step_time_times_the_steps_left(monkeypatch):
    clock = iter([100.0, 130.0])
    monkeypatch.setattr("fedfm.reporting.console.time.monotonic", lambda: next(clock))
    eta = Eta(total=10, done=4)  # resumed after 4: only this process's steps count
    assert eta.left() == "–"
    eta.step(7)  # 3 steps in 30 s → 10 s each, 3 left
    assert eta.left() == "30s"


def test_a_log_gets_one_unwrapped_line_per_round_with_the_eta(tiny_config, tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text(tomli_w.dumps(tiny_config(run={"rounds": 3})))
    done = cli("run", path, "--output", tmp_path / "r")  # stdout is a pipe, as in a log file
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    rows = [line for line in lines if line.split() and line.split()[0] in {"1", "2", "3"}]
    assert len(rows) == 3 and all("ETA" in r for r in rows)
    assert any(len(line) > 100 for line in lines)  # the description line is not wrapped at 80
    assert "per-round metrics" not in done.stdout and "done. outputs in" in done.stdout
