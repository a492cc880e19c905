"""Checkpoint cost per round with per-client state, 1,000 clients: one file rewritten whole
(fedfm 0.1) against the client store (one SQLite transaction of the server row and the cohort's
changed rows).

Each client holds a SCAFFOLD control variate the size of the default experiment's trainable
state (MiniLM LoRA r = 8 + head: 75,653 float32 values, 302 KB). Per round, 10 clients change.
Bytes written are the process's ``wchar`` from /proc/self/io (everything passed to write(2),
journal included), measured side by side in one run.

    python benchmarks/checkpoint.py [--clients 1000] [--cohort 10] [--rounds 3] [--out ...json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fedfm.server.checkpoint import ServerState, save_checkpoint  # noqa: E402

VALUES = 75_653


def wchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("no /proc/self/io")


def legacy_save(folder: Path, state: ServerState, everyone: dict) -> None:
    """fedfm 0.1: every client's state inside the one server file, written to a temp and renamed."""
    payload = {"format": 1, **state.__dict__, "engine_state": {"client_states": everyone}}
    tmp = folder / ".state.pt.tmp"
    with open(tmp, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / "state.pt")


def measure(clients: int, cohort: int, rounds: int) -> dict:
    theta = {"w": torch.zeros(VALUES)}
    everyone = {str(k): {"scaffold": {"w": torch.randn(VALUES)}} for k in range(clients)}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("single-file", "client-store"):
            folder = Path(tmp) / kind
            folder.mkdir()
            if kind == "client-store":  # round 0: every client's first state, once
                save_checkpoint(folder, ServerState(0, theta, {}), {int(k): v for k, v in everyone.items()})
            written, seconds = [], []
            for t in range(1, rounds + 1):
                changed = {
                    k: {"scaffold": {"w": torch.randn(VALUES)}} for k in range(cohort * t, cohort * (t + 1))
                }
                before, start = wchar(), time.perf_counter()
                if kind == "single-file":
                    everyone.update({str(k): v for k, v in changed.items()})
                    legacy_save(folder, ServerState(t, theta, {}), everyone)
                else:
                    save_checkpoint(folder, ServerState(t, theta, {}), changed)
                seconds.append(time.perf_counter() - start)
                written.append(wchar() - before)
            out[kind] = {
                "bytes_per_round": sum(written) / len(written),
                "seconds_per_round": sum(seconds) / len(seconds),
                "file_bytes": sum(p.stat().st_size for p in folder.iterdir()),
            }
    out["ratio_bytes"] = out["single-file"]["bytes_per_round"] / out["client-store"]["bytes_per_round"]
    out["ratio_seconds"] = out["single-file"]["seconds_per_round"] / out["client-store"]["seconds_per_round"]
    return {"clients": clients, "cohort": cohort, "values_per_state": VALUES, **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--cohort", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "checkpoint.json")
    args = ap.parse_args()
    result = measure(args.clients, args.cohort, args.rounds)
    print(json.dumps(result, indent=1))
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
