"""Resume that never lies, and client state that scales: probes of the checkpoint."""

import json
import sqlite3
import subprocess
import sys

import pytest
import torch

import fedfm
from fedfm.reporting.metrics import MetricsLog
from fedfm.server.checkpoint import (
    CheckpointError,
    ClientStore,
    ServerState,
    load_checkpoint,
    save_checkpoint,
)


def scaffold_config(tiny_config, **run):
    return tiny_config(
        run={"rounds": 3, **run},
        partition={"method": "iid", "num_clients": 8, "min_size": 1},
        sampling={"clients_per_round": 2},
        strategy={"objective": "scaffold"},
        training={"optimizer": "sgd", "lr": 0.05, "local_steps": 2},
    )


def test_a_round_commits_only_the_states_of_its_cohort(tiny_config, tmp_path):
    result = fedfm.run(scaffold_config(tiny_config), output=tmp_path / "r", progress=False)
    store = ClientStore(result.run_dir / "checkpoint")
    cohorts = {r["round"]: r["cohort"] for r in result.history if r["round"] > 0}
    rows = store.all()
    for t, cohort in cohorts.items():
        later = {c for u, co in cohorts.items() if u > t for c in co}
        assert set(store.written_in(t)) == set(cohort) - later  # each row: the round that last wrote it
    assert set(rows) == {c for co in cohorts.values() for c in co}
    assert all("scaffold" in state for state in rows.values())


def test_server_and_client_states_commit_together_or_not_at_all(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoint"
    theta = {"w": torch.zeros(3)}
    save_checkpoint(folder, ServerState(1, theta, {}), {0: {"scaffold": {"w": torch.ones(3)}}})

    class PowerCut(RuntimeError):
        pass

    import fedfm.server.checkpoint as ckpt

    real = ckpt._connect

    class CutAfterTheServerRow:  # the real connection, failing once the server row is written
        def __init__(self, path):
            self.db = real(path)

        def __getattr__(self, name):
            return getattr(self.db, name)

        def executemany(self, sql, rows):
            raise PowerCut("mid-transaction")

    monkeypatch.setattr(ckpt, "_connect", CutAfterTheServerRow)
    with pytest.raises(PowerCut):
        save_checkpoint(
            folder, ServerState(2, {"w": torch.full((3,), 9.0)}, {}), {0: {"scaffold": {"w": torch.zeros(3)}}}
        )
    monkeypatch.undo()
    kept = load_checkpoint(folder)
    assert kept.round == 1 and torch.equal(kept.params["w"], torch.zeros(3))
    assert torch.equal(ClientStore(folder).get(0)["scaffold"]["w"], torch.ones(3))


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "fedfm.cli", *map(str, args)], capture_output=True, text=True
    )


def test_resume_with_a_deleted_checkpoint_fails_and_changes_nothing(tiny_config, tmp_path):
    result = fedfm.run(tiny_config(), output=tmp_path / "r", progress=False)
    (result.run_dir / "checkpoint" / "state.sqlite").unlink()
    before = (result.run_dir / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        fedfm.run(resume=result.run_dir, progress=False)
    assert (result.run_dir / "metrics.jsonl").read_text() == before
    done = cli("run", "--resume", result.run_dir, "--quiet")
    assert done.returncode == 2 and "records round 2" in done.stderr


@pytest.mark.parametrize("damage", ["garbage", "flipped"])
def test_resume_with_a_damaged_checkpoint_fails_clearly(tiny_config, tmp_path, damage):
    result = fedfm.run(tiny_config(), output=tmp_path / "r", progress=False)
    path = result.run_dir / "checkpoint" / "state.sqlite"
    if damage == "garbage":
        path.write_bytes(b"not a database at all " * 100)
        message = "not a readable checkpoint"
    else:  # one byte of the server state's blob changed: caught by its checksum
        db = sqlite3.connect(path)
        blob = bytearray(db.execute("SELECT state FROM server").fetchone()[0])
        blob[len(blob) // 2] ^= 0xFF
        db.execute("UPDATE server SET state = ?", (bytes(blob),))
        db.commit()
        db.close()
        message = "checksum mismatch"
    with pytest.raises(CheckpointError, match=message):
        fedfm.run(resume=result.run_dir, progress=False)


def test_stale_temporaries_are_removed_and_the_metrics_rewrite_is_atomic(tiny_config, tmp_path, monkeypatch):
    result = fedfm.run(tiny_config(), output=tmp_path / "r", progress=False)
    stale = result.run_dir / ".metrics.jsonl.tmp-999999"
    stale.write_text("half")
    log = MetricsLog(result.run_dir / "metrics.jsonl")
    before = log.path.read_text()

    def power_cut(*_):
        raise OSError("power cut during the rename")

    monkeypatch.setattr("fedfm.reporting.metrics.os.replace", power_cut)
    with pytest.raises(OSError):
        log.truncate_after(1)
    assert log.path.read_text() == before  # the old file, whole
    assert [p.name for p in result.run_dir.glob(".*.tmp-*")] == [stale.name]  # ours cleaned up
    monkeypatch.undo()
    fedfm.run(resume=result.run_dir, overrides=["run.rounds=3"], progress=False)
    assert not stale.exists()


def test_a_run_in_which_every_client_always_failed_exits_non_zero(tiny_config, tmp_path):
    cfg = tiny_config(validation={"max_update_norm": 1e-12})  # every update is rejected
    path = tmp_path / "exp.toml"
    import tomli_w

    path.write_text(tomli_w.dumps(cfg))
    done = cli("run", path, "--output", tmp_path / "r", "--quiet")
    assert done.returncode == 1 and "no client delivered a usable update in any of 2 rounds" in done.stderr
    rounds = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rejected"] for r in rounds if r.get("event") == "round" and r["round"] > 0)


def test_a_commit_cut_short_by_a_kill_rolls_back_on_resume(tmp_path):
    """kill -9 in the middle of a commit leaves a hot journal: the next load rolls it back to the
    last commit (a read-only open could not, and would call the checkpoint damaged)."""
    folder = tmp_path / "checkpoint"
    save_checkpoint(folder, ServerState(1, {"w": torch.zeros(3)}, {}), {0: {"s": {"w": torch.ones(3)}}})
    script = f"""
import os, sqlite3, torch
from fedfm.server.checkpoint import ServerState, _connect, _dumps
db = _connect({str(folder / "state.sqlite")!r})
db.execute("BEGIN IMMEDIATE")
big = _dumps(ServerState(2, {{"w": torch.ones(1 << 18)}}, {{}}).__dict__)
db.execute("UPDATE server SET round = 2, state = ?", (big,))
os._exit(9)  # dies holding the transaction
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 9, done.stderr
    assert (folder / "state.sqlite-journal").exists()
    kept = load_checkpoint(folder)
    assert kept.round == 1 and torch.equal(kept.params["w"], torch.zeros(3))
    assert torch.equal(ClientStore(folder).get(0)["s"]["w"], torch.ones(3))


def test_a_crash_after_round_1_is_recorded_but_before_its_checkpoint_resumes(tiny_config, tmp_path):
    """The window between a round's record and its checkpoint: round 0's checkpoint is there, so
    the resumed run redoes round 1 and ends where an uninterrupted run ends (found by a deployed
    server killed right after the round-1 line appeared)."""
    from fedfm.api import prepare_run
    from fedfm.server.driver import Run

    class Crash(Exception):
        pass

    def crash_after_round_1(record):
        if record["round"] == 1:
            raise Crash  # after the metrics line is written, before the checkpoint

    cfg, run_dir = prepare_run(tiny_config(), output=tmp_path / "r")
    with pytest.raises(Crash):
        Run(cfg, run_dir, progress=False, callbacks=[crash_after_round_1]).execute()
    assert load_checkpoint(run_dir / "checkpoint").round == 0
    resumed = fedfm.run(resume=run_dir, progress=False)
    whole = fedfm.run(tiny_config(), output=tmp_path / "whole", progress=False)
    assert [r["round"] for r in resumed.history] == [r["round"] for r in whole.history] == [0, 1, 2]
    a, b = (
        load_checkpoint(run_dir / "checkpoint").params,
        load_checkpoint(whole.run_dir / "checkpoint").params,
    )
    assert all(torch.equal(a[k], b[k]) for k in b)
