"""Split fine-tuning across processes vs in one process, and vs deployed federated LoRA.

The default experiment (BBC News, MiniLM, 10 Dirichlet(0.5) clients, 5 per round, 7 rounds),
three ways in one invocation, side by side on one machine:

- ``split-simulated``: ``sharing.mode = "split"``, ``split.cut_layer = 1``, in-process;
- ``split-deployed``: the same config served by ``fedfm server`` to two ``fedfm client``
  processes of five identities each on loopback (plaintext: the protocol, not the cipher), every
  batch crossing the cut over gRPC;
- ``lora-deployed``: plain federated LoRA (every client holds the whole FM), deployed the same way.

Reports the final accuracy, the run's wall time, the bytes of the last round (up / down, the cut
included), the server's and the client processes' peak RSS (psutil, every 50 ms). Usage:

    python benchmarks/split_deploy.py [--rounds 7] [--out benchmarks/results/split-deploy.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import tomli_w

FEDFM = [sys.executable, "-m", "fedfm.cli"]
SPLIT = {"sharing": {"mode": "split"}, "split": {"cut_layer": 1}}


def experiment(rounds: int, extra: dict) -> dict:
    import tomllib

    raw = tomllib.loads((Path(__file__).parents[1] / "examples" / "default.toml").read_text())
    raw["run"] = {**raw["run"], "rounds": rounds, "threads": 1}
    # a deployment weighted by examples needs a bound on the counts, and one on each update's influence
    raw["validation"] = {"max_num_examples": 10_000, "max_update_norm": 100.0}
    return {**raw, **extra}


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == "round"]


def summary(rows: list[dict], wall: float, **extra) -> dict:
    last = rows[-1]
    return {
        "test_accuracy": round(last["test_accuracy"], 4),
        "run_wall_s": round(wall, 1),
        "last_round_bytes_up": last["bytes_up"],
        "last_round_bytes_down": last["bytes_down"],
        "last_round_cut_bytes_up": last.get("cut_bytes_up", 0),
        "num_clients": [r["num_clients"] for r in rows[1:]],
        **extra,
    }


def simulated(work: Path, cfg: dict) -> dict:
    import fedfm
    from fedfm.config import make_config

    start = time.perf_counter()
    result = fedfm.run(make_config(cfg), output=work / "simulated", progress=False)
    return summary(records(result.run_dir), time.perf_counter() - start)


def deployed(work: Path, cfg: dict, clients: int, processes: int) -> dict:
    (work / "exp.toml").write_text(tomli_w.dumps(cfg))
    lines = [f"site{k} tok-{k:04d}-{'z' * 12}" for k in range(clients)]
    (work / "tokens.txt").write_text("\n".join(lines) + "\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = work / "run"
    start = time.perf_counter()
    args = [
        *FEDFM,
        "server",
        work / "exp.toml",
        "--address",
        f"127.0.0.1:{port}",
        "--tokens",
        work / "tokens.txt",
    ]
    args += ["--insecure", "--quiet", "--output", out, "--round-timeout", "1800"]
    server = subprocess.Popen(args, stdout=(work / "server.log").open("w"), stderr=subprocess.STDOUT)
    procs = []
    per = clients // processes
    for p in range(processes):
        path = work / f"tokens-{p}.txt"
        path.write_text("\n".join(lines[p * per : (p + 1) * per]) + "\n")
        client = [*FEDFM, "client", "--server", f"127.0.0.1:{port}", "--token-file", path, "--data", "config"]
        client += ["--insecure", "--retry", "0.5"]
        procs.append(
            subprocess.Popen(client, stdout=(work / f"c{p}.log").open("w"), stderr=subprocess.STDOUT)
        )
    peaks = {"server": 0, **{f"client{p}": 0 for p in range(processes)}}
    watched = {
        "server": psutil.Process(server.pid),
        **{f"client{p}": psutil.Process(c.pid) for p, c in enumerate(procs)},
    }
    while server.poll() is None:
        for name, proc in watched.items():
            with contextlib.suppress(psutil.NoSuchProcess):
                peaks[name] = max(peaks[name], proc.memory_info().rss)
        time.sleep(0.05)
    wall = time.perf_counter() - start
    codes = [p.wait(timeout=120) for p in procs]
    if server.returncode != 0 or any(codes):
        raise RuntimeError(f"server exit {server.returncode}, clients {codes}: see {work}")
    mb = {k: round(v / 2**20, 1) for k, v in peaks.items()}
    client_peak = max(v for k, v in mb.items() if k != "server")
    return summary(
        records(out), wall, server_peak_rss_mb=mb["server"], client_process_peak_rss_mb=client_peak
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/split-deploy.json")
    args = parser.parse_args()
    result = {
        "rounds": args.rounds,
        "client_processes": args.processes,
        "identities_per_process": 10 // args.processes,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra, how in [
            ("split-simulated", SPLIT, "sim"),
            ("split-deployed", SPLIT, "deploy"),
            ("lora-deployed", {}, "deploy"),
        ]:
            work = Path(tmp) / name
            work.mkdir()
            cfg = experiment(args.rounds, extra)
            print(f"{name} ...", flush=True)
            result[name] = simulated(work, cfg) if how == "sim" else deployed(work, cfg, 10, args.processes)
            print(json.dumps(result[name]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
