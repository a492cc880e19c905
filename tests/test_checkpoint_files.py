"""Checkpoints of any size: a state whose tensors pass ``INLINE_MAX`` keeps them in a safetensors
file beside the database, named by its digest, durable before the row that names it is
committed. Probed with small states and a small threshold, and with a state above 1 GiB (SQLite's
row limit here is 1,000,000,000 bytes) killed with SIGKILL in the middle of its next commit."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch

from fedfm.server.checkpoint import (
    FORMAT_FILES,
    CheckpointError,
    ClientStore,
    ServerState,
    load_checkpoint,
    save_checkpoint,
)


def _state(round_: int, n: int = 6) -> ServerState:
    params = {
        "w": torch.arange(n, dtype=torch.float32) + round_,
        "b": torch.full((2, 3), round_, dtype=torch.bfloat16),
    }
    moments = {"m": {k: v * 2 for k, v in params.items()}, "v": {k: v * 3 for k, v in params.items()}}
    return ServerState(
        round_, params, moments, None, None, {"client_states": {}}, 1.5, {"up": 7}, {}, {"ledger": [1, 2]}
    )


def _same(a: ServerState, b: ServerState) -> None:
    assert a.round == b.round and a.elapsed_s == b.elapsed_s and a.comm == b.comm and a.privacy == b.privacy
    for k in b.params:
        assert a.params[k].dtype == b.params[k].dtype and torch.equal(a.params[k], b.params[k])
    for m in ("m", "v"):
        assert all(torch.equal(a.optimizer_state[m][k], b.optimizer_state[m][k]) for k in b.params)


def test_a_state_above_the_threshold_keeps_its_tensors_in_a_file_and_reads_back_exactly(tmp_path):
    folder = tmp_path / "checkpoint"
    client = {"residual": {"w": torch.ones(4)}}
    save_checkpoint(folder, _state(1), {3: client}, inline_max=0)
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(files) == 2 and files[0].startswith("client-3-") and files[1].startswith("server-")
    db = sqlite3.connect(folder / "state.sqlite")
    fmt, size = db.execute("SELECT format, length(state) FROM server").fetchone()
    db.close()
    assert fmt == FORMAT_FILES and size < 4096  # the row holds the rest, not the tensors
    _same(load_checkpoint(folder), _state(1))
    assert torch.equal(ClientStore(folder).get(3)["residual"]["w"], torch.ones(4))
    # the next commit's files replace the last one's; the client row it did not rewrite keeps its file
    save_checkpoint(folder, _state(2), {}, inline_max=0)
    names = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(names) == 2 and names[0] == files[0] and names[1] != files[1]
    _same(load_checkpoint(folder), _state(2))
    # back under the threshold: the row holds the state again and no file is left
    save_checkpoint(folder, _state(3), {3: {"residual": {"w": torch.zeros(4)}}})
    assert not list(folder.glob("*.safetensors"))
    _same(load_checkpoint(folder), _state(3))


def test_a_damaged_or_missing_tensor_file_is_reported_never_half_read(tmp_path):
    folder = tmp_path / "checkpoint"
    save_checkpoint(folder, _state(1), inline_max=0)
    (file,) = folder.glob("server-*.safetensors")
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(folder)
    file.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(folder)


BIG = (1 << 28) + (1 << 25)  # float32 values: 1.125 GiB of θ, more than one SQLite row can hold

WRITER = """
import os, sys, time, torch
from fedfm.server import checkpoint
from fedfm.server.checkpoint import ServerState, save_checkpoint

folder, stop = sys.argv[1], sys.argv[2]
def state(r):
    return ServerState(r, {"w": torch.full((BIG,), float(r))}, {}, None, None, {}, 0.0, {}, {}, {})
if stop == "setup":
    save_checkpoint(folder, state(1))
    sys.exit(0)
if stop == "before-commit":  # the file is written and durable; the row never commits
    original = checkpoint._write_tensors
    def write_then_die(*args):
        original(*args)
        os._exit(9)
    checkpoint._write_tensors = write_then_die
if stop == "after-commit":  # the row is committed; the last round's file is not removed yet
    def die(*args):
        os._exit(9)
    checkpoint._remove_unnamed = die
print("saving", flush=True)
save_checkpoint(folder, state(2))
print("saved", flush=True)
time.sleep(60)
""".replace("BIG", str(BIG))


def _writer(folder, stop: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(folder), stop],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_state_above_one_gib_survives_a_kill_in_the_middle_of_its_next_commit(tmp_path):
    folder = tmp_path / "checkpoint"
    setup = _writer(folder, "setup")
    assert setup.wait(timeout=300) == 0, setup.stderr.read()
    (first,) = folder.glob("server-*.safetensors")
    assert first.stat().st_size > (1 << 30)
    # killed after the new file is durable, before its row commits: round 1 stands, whole
    cut = _writer(folder, "before-commit")
    assert cut.wait(timeout=300) == 9, cut.stderr.read()
    kept = load_checkpoint(folder)
    assert kept.round == 1 and kept.params["w"].shape == (BIG,) and bool((kept.params["w"] == 1).all())
    del kept
    # killed after the commit, before the clean-up: round 2 stands; round 1's file lingers until the next
    cut = _writer(folder, "after-commit")
    assert cut.wait(timeout=300) == 9, cut.stderr.read()
    kept = load_checkpoint(folder)
    assert kept.round == 2 and bool((kept.params["w"] == 2).all()) and first.exists()
    del kept
    # killed with SIGKILL at an arbitrary moment of the next commit: round 1 or round 2, never neither
    for delay in (0.5, 2.0):
        proc = _writer(folder, "anywhere")
        assert proc.stdout.readline().strip() == "saving"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        kept = load_checkpoint(folder)
        assert kept.round in (1, 2) and bool((kept.params["w"] == kept.round).all())
        del kept
    # the next commit runs to the end and leaves only its own file
    done = _writer(folder, "anywhere")
    assert done.stdout.readline().strip() == "saving" and done.stdout.readline().strip() == "saved"
    done.kill()
    done.wait(timeout=60)
    kept = load_checkpoint(folder)
    assert kept.round == 2 and bool((kept.params["w"] == 2).all())
    assert len(list(folder.glob("*.safetensors"))) == 1 and not list(folder.glob(".*.tmp-*"))
    assert not first.exists()  # round 1's file went with the first commit after it
