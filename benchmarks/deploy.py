"""Load test of the gRPC deployment: N light clients (a tiny random BERT) in one round on loopback.

The server is its own process (`fedfm server`, TLS off to measure the protocol, not the cipher);
the clients are `fedfm client --token-file` processes, each serving an equal share of the
identities on one shared model, so that 100 real gRPC clients fit on a 2-core machine. Reports
the round's wall time (server's `round_s`), the whole run's wall time and the server process's
peak RSS (sampled every 50 ms with psutil). Usage:

    python benchmarks/deploy.py [--clients 100] [--processes 4] [--out benchmarks/results/deploy.json]
    python benchmarks/deploy.py --stalled 260   # an honest Join beside 260 stalled uploads
"""

from __future__ import annotations

import argparse
import csv
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import tomli_w

WORDS = {
    "sport": "match goal team player coach league score win cup race",
    "money": "bank market shares profit economy price trade growth firm bond",
    "music": "album band song singer concert chart guitar tour record stage",
}


def tiny_model(folder: Path) -> None:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fedfm.models.resolve import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    config = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def toy_csv(path: Path, per_class: int) -> None:
    rng = np.random.default_rng(0)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for label, words in WORDS.items():
            for _ in range(per_class):
                w.writerow([" ".join(rng.choice(words.split(), size=12)), label])


def load_test(work: Path, clients: int, processes: int, rounds: int = 1) -> dict:
    model, data = work / "model", work / "data.csv"
    tiny_model(model)
    toy_csv(data, per_class=max(20, clients))
    cfg = {
        "run": {"rounds": rounds, "threads": 1},
        "model": {"name": str(model), "max_length": 16},
        "peft": {"method": "lora", "r": 4, "alpha": 8},
        "data": {"name": "csv", "path": str(data), "test_fraction": 0.25},
        "partition": {"method": "iid", "num_clients": clients},
        "sampling": {"fraction": 1.0},
        "training": {"local_steps": 1, "batch_size": 4},
        "validation": {"max_num_examples": 1000, "max_update_norm": 100.0},  # a deployment's bounds
    }
    (work / "exp.toml").write_text(tomli_w.dumps(cfg))
    lines = [f"site{k} tok-{k:04d}-{'z' * 12}" for k in range(clients)]
    (work / "tokens.txt").write_text("\n".join(lines) + "\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fedfm = [sys.executable, "-m", "fedfm.cli"]
    out = work / "run"
    start = time.perf_counter()
    server = subprocess.Popen(
        [
            *fedfm,
            "server",
            work / "exp.toml",
            "--address",
            f"127.0.0.1:{port}",
            "--tokens",
            work / "tokens.txt",
        ]
        + ["--insecure", "--quiet", "--output", out, "--round-timeout", "300"],
        stdout=(work / "server.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    procs = []
    for p, share in enumerate(np.array_split(np.arange(clients), processes)):
        path = work / f"tokens-{p}.txt"
        path.write_text("\n".join(lines[k] for k in share) + "\n")
        procs.append(
            subprocess.Popen(
                [
                    *fedfm,
                    "client",
                    "--server",
                    f"127.0.0.1:{port}",
                    "--token-file",
                    path,
                    "--data",
                    f"config:{data}",
                ]
                + ["--insecure", "--retry", "0.5"],
                stdout=(work / f"clients-{p}.log").open("w"),
                stderr=subprocess.STDOUT,
            )
        )
    peak, proc = 0, psutil.Process(server.pid)
    while server.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    wall = time.perf_counter() - start
    codes = [p.wait(timeout=120) for p in procs]
    if server.returncode != 0 or any(codes):
        raise RuntimeError(f"server exit {server.returncode}, clients {codes}: see {work}")
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rounds_ = [r for r in records if r.get("event") == "round" and r["round"] > 0]
    return {
        "clients": clients,
        "client_processes": processes,
        "rounds": rounds,
        "num_clients_per_round": [r["num_clients"] for r in rounds_],
        "failed": sum(len(r["failed"]) for r in rounds_),
        "round_s": [round(r["round_s"], 2) for r in rounds_],
        "run_wall_s": round(wall, 1),
        "server_peak_rss_mb": round(peak / 2**20, 1),
    }


def stalled_join(work: Path, stalled: int, repeats: int = 5) -> dict:
    """How long an honest client's Join takes while ``stalled`` uploads are held open (half with a
    member's token, half with an unknown one), next to the same server with none, in one run."""
    import threading

    import grpc

    from fedfm.deploy import fedfm_pb2 as pb
    from fedfm.deploy.fedfm_pb2_grpc import FedFMStub

    model, data = work / "model", work / "data.csv"
    tiny_model(model)
    toy_csv(data, per_class=20)
    cfg = {
        "run": {"rounds": 1, "threads": 1},
        "model": {"name": str(model), "max_length": 16},
        "data": {"name": "csv", "path": str(data), "test_fraction": 0.25},
        "partition": {"method": "iid", "num_clients": 2},
        "validation": {"max_num_examples": 1000, "max_update_norm": 100.0},
    }
    (work / "exp.toml").write_text(tomli_w.dumps(cfg))
    (work / "tokens.txt").write_text("site0 honest-token\nsite1 staller-token\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "fedfm.cli", "server", work / "exp.toml", "--address", f"127.0.0.1:{port}"]
    args += ["--tokens", work / "tokens.txt", "--insecure", "--quiet", "--output", work / "run"]
    server = subprocess.Popen(args, stdout=(work / "server.log").open("w"), stderr=subprocess.STDOUT)
    stub = FedFMStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    honest, staller = (
        (("authorization", "Bearer honest-token"),),
        (("authorization", "Bearer staller-token"),),
    )
    release = threading.Event()

    def never():
        release.wait()
        return
        yield  # noqa: B901

    def join_s() -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            stub.Join(pb.JoinRequest(), metadata=honest, wait_for_ready=True, timeout=120)
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    try:
        idle = join_s()
        calls = [
            stub.SubmitUpdate.future(never(), metadata=staller, timeout=300) for _ in range(stalled // 2)
        ]
        bogus = (("authorization", "Bearer nobody"),)
        calls += [
            stub.SubmitUpdate.future(never(), metadata=bogus, timeout=300)
            for _ in range(stalled - stalled // 2)
        ]
        time.sleep(1.0)
        busy = join_s()
        refused = sum(1 for c in calls if c.done() and c.exception() is not None)
    finally:
        release.set()
        server.kill()
        server.wait()
    return {
        "stalled_uploads": stalled,
        "refused_at_once": refused,
        "join_s_idle": round(idle, 4),
        "join_s_with_stalled": round(busy, 4),
        "ratio": round(busy / idle, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--stalled", type=int, default=0, help="measure a Join beside N stalled uploads")
    parser.add_argument("--out", default="benchmarks/results/deploy.json")
    args = parser.parse_args()
    if args.stalled:
        with tempfile.TemporaryDirectory() as tmp:
            result = stalled_join(Path(tmp), args.stalled)
        out = Path(args.out).with_name("deploy-stalled.json")
        out.write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        return
    with tempfile.TemporaryDirectory() as tmp:
        result = load_test(Path(tmp), args.clients, args.processes, args.rounds)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
