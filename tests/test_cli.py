"""The ``fedfm`` command in real subprocesses: errors before work, kill -9 and --resume, report."""

import json
import os
import signal
import subprocess
import sys
import time

import tomli_w

CLI = [sys.executable, "-m", "fedfm.cli"]


def fedfm_cmd(*args, **kw):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, **kw)


def write_config(path, cfg: dict):
    path.write_text(tomli_w.dumps(cfg))
    return path


def rounds_in(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r.get("event") == "round":
            out.append(r)
    return out


def test_bad_override_is_rejected_before_any_work(tmp_path):
    res = fedfm_cmd(
        "run",
        "--set",
        "partition.alpha=-1",
        "--set",
        "peft.method=lorax",
        "--output",
        str(tmp_path / "r"),
    )
    assert res.returncode == 2
    assert "partition.alpha" in res.stdout + res.stderr and "'lora'" in res.stdout + res.stderr
    assert not (tmp_path / "r").exists()
    res = fedfm_cmd(
        "run", "--set", "run.engine=batched", "--set", "peft.method=ia3", "--output", str(tmp_path / "r")
    )
    assert res.returncode == 2 and "batches LoRA and heads; peft.method = 'ia3'" in res.stdout + res.stderr


def test_config_command_prints_the_resolved_config():
    res = fedfm_cmd("config", "--set", "run.rounds=3")
    assert res.returncode == 0 and "rounds = 3" in res.stdout and 'name = "minilm"' in res.stdout


def test_kill_9_then_resume_matches_an_uninterrupted_run(tiny_config, tmp_path):
    cfg = tiny_config(run={"rounds": 6, "threads": 1}, training={"local_steps": 25})
    path = write_config(tmp_path / "exp.toml", cfg)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*CLI, "run", str(path), "--output", str(killed), "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while len(rounds_in(killed)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed; make its rounds longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 1 < len(rounds_in(killed)) < 7
    res = fedfm_cmd("run", "--resume", str(killed), "-q")
    assert res.returncode == 0, res.stderr
    full = tmp_path / "full"
    assert fedfm_cmd("run", str(path), "--output", str(full), "-q").returncode == 0
    a, b = rounds_in(killed), rounds_in(full)
    assert [r["round"] for r in a] == list(range(7))
    for ra, rb in zip(a, b, strict=True):
        assert ra["test_loss"] == rb["test_loss"] and ra["test_accuracy"] == rb["test_accuracy"]


def test_report_rebuilds_the_page(tiny_config, tmp_path):
    # the run trains on the batched engine, which says how it grouped the clients
    path = write_config(tmp_path / "exp.toml", tiny_config(run={"rounds": 1}))
    run_dir = tmp_path / "r"
    res = fedfm_cmd("run", str(path), "--output", str(run_dir), "--set", "run.engine=batched")
    assert res.returncode == 0, res.stderr
    assert "outputs in" in res.stdout and "test acc" in res.stdout
    assert "batched engine: " in res.stdout and "clients per group" in res.stdout
    (run_dir / "report.html").unlink()
    res = fedfm_cmd("report", str(run_dir))
    assert res.returncode == 0 and (run_dir / "report.html").is_file()
    assert fedfm_cmd("report", str(tmp_path / "nothing")).returncode == 2


def test_sweep_synth_server_and_client_report_bad_input_clearly(tmp_path):
    bad = tmp_path / "sweep.toml"
    bad.write_text('[sweep]\nname = "x"\n')
    r = fedfm_cmd("sweep", str(bad))
    assert r.returncode == 2 and "no [sweep.grid]" in r.stderr
    r = fedfm_cmd("synth", "--output", str(tmp_path / "s.jsonl"))
    assert r.returncode == 2 and "exactly one of --dataset and --labels" in r.stderr
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("a t1\nb t2\n")
    r = fedfm_cmd("server", "--tokens", str(tokens), "--set", "partition.num_clients=2")
    assert r.returncode == 2 and "TLS needs --cert and --key" in r.stderr
    r = fedfm_cmd("server", "--tokens", str(tokens), "--insecure")  # the default experiment has 10 clients
    assert r.returncode == 2 and "lists 2 clients but partition.num_clients = 10" in r.stderr
    r = fedfm_cmd("server", "--tokens", str(tokens), "--insecure", "--set", "partition.num_clients=2")
    assert r.returncode == 2 and "validation.max_num_examples" in r.stderr
    r = fedfm_cmd("client", "--server", "127.0.0.1:1", "--token", "t", "--data", "config")
    assert r.returncode == 2 and "TLS needs --ca" in r.stderr
