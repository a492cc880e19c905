"""Load test of the gRPC deployment: N light clients (a tiny random BERT) in one round on loopback.

The server is its own process (`fedfm server`, TLS off to measure the protocol, not the cipher);
the clients are `fedfm client --token-file` processes, each serving an equal share of the
identities on one shared model, so that 100 real gRPC clients fit on a 2-core machine. Reports
the round's wall time (server's `round_s`), the whole run's wall time and the server process's
peak RSS (sampled every 50 ms with psutil). Usage:

    python benchmarks/deploy.py [--clients 100] [--processes 4] [--out benchmarks/results/deploy.json]
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
                [*fedfm, "client", "--server", f"127.0.0.1:{port}", "--token-file", path, "--data", "config"]
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/deploy.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = load_test(Path(tmp), args.clients, args.processes, args.rounds)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
