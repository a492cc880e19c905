"""Full fine-tuning at a few hundred MB per update, deployed on loopback, the server killed with
SIGKILL after round 1 and resumed.

A randomly initialised BERT (hidden 768, 7 layers: 73M parameters, so every update is about
292 MB in float32, above 256 MiB) with MiniLM's tokenizer; ``peft.method = "full"``; 3 real
``fedfm client`` processes on BBC News (300 rows, IID); 3 rounds. The server is killed with
SIGKILL once round 1 is recorded, restarted with ``--resume``, and the clients (which retry)
finish the run. Plaintext on loopback (TLS would add its CPU cost to the same two cores).

    python benchmarks/fullft.py [--layers 7] [--out benchmarks/results/fullft.json]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _stamp import stamp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
FEDFM = [sys.executable, "-m", "fedfm.cli"]


def make_model(folder: Path, layers: int) -> int:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fedfm.models.resolve import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=768, num_hidden_layers=layers, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=128, num_labels=5,
    )  # fmt: skip
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def peak_watch(pid_box: list, peaks: list, stop: threading.Event) -> None:
    """The server's VmHWM, polled (its process changes on the restart)."""
    while not stop.is_set():
        for pid in list(pid_box):
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peaks.append((pid, int(line.split()[1]) / 1024))
            except OSError:
                pass
        time.sleep(0.5)


def main() -> None:
    import tomli_w

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=7)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fullft.json")
    args = ap.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        params = make_model(tmp / "model", args.layers)
        cfg = {
            "run": {"rounds": 3, "seed": 0, "threads": 1},
            "model": {"name": str(tmp / "model"), "max_length": 32},
            "peft": {"method": "full"},
            "data": {"name": "bbc-news", "max_examples": 300, "test_fraction": 0.25},
            "partition": {"method": "iid", "num_clients": 3},
            "sampling": {"fraction": 1.0},
            "training": {"local_steps": 2, "batch_size": 8, "lr": 1e-5},
            "strategy": {"weighting": "uniform"},
            "validation": {"max_update_norm": 1e6},
            "eval": {"batch_size": 32},
        }
        (tmp / "exp.toml").write_text(tomli_w.dumps(cfg))
        (tmp / "tokens.txt").write_text("".join(f"site{k} tok{k}-xxxxxxxxxxxx\n" for k in range(3)))
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = tmp / "run"
        server_cmd = [*FEDFM, "server", "--address", f"127.0.0.1:{port}", "--tokens", str(tmp / "tokens.txt"),
                      "--insecure", "--quiet", "--round-timeout", "900"]  # fmt: skip
        log = open(tmp / "server.log", "w")  # noqa: SIM115
        server = subprocess.Popen(
            [*server_cmd, str(tmp / "exp.toml"), "--output", str(out)], stdout=log, stderr=log
        )
        pids, peaks, stop = [server.pid], [], threading.Event()
        threading.Thread(target=peak_watch, args=(pids, peaks, stop), daemon=True).start()
        logs = [open(tmp / f"c{k}.log", "w") for k in range(3)]  # noqa: SIM115 (closed at exit)
        address = f"127.0.0.1:{port}"
        clients = [
            subprocess.Popen(
                [*FEDFM, "client", "--server", address, "--insecure", "--data", "config", "--token",
                 f"tok{k}-xxxxxxxxxxxx", "--retry", "1"],
                stdout=logs[k], stderr=subprocess.STDOUT,
            )
            for k in range(3)
        ]  # fmt: skip
        metrics = out / "metrics.jsonl"
        while '"event": "round", "round": 1,' not in (metrics.read_text() if metrics.exists() else ""):
            time.sleep(0.5)
            if server.poll() is not None:
                raise SystemExit((tmp / "server.log").read_text()[-3000:])
        files = sorted(p.name for p in (out / "checkpoint").iterdir())
        killed_at = time.perf_counter()
        server.send_signal(signal.SIGKILL)
        server.wait()
        resumed = subprocess.Popen([*server_cmd, "--resume", str(out)], stdout=log, stderr=log)
        pids.append(resumed.pid)
        code = resumed.wait(timeout=3600)
        stop.set()
        client_codes = [c.wait(timeout=120) for c in clients]
        if code != 0 or any(client_codes):
            raise SystemExit((tmp / "server.log").read_text()[-3000:])
        rounds = [json.loads(x) for x in metrics.read_text().splitlines()]
        rounds = [r for r in rounds if r.get("event") == "round"]
        by_pid = {}
        for pid, mb in peaks:
            by_pid[pid] = max(by_pid.get(pid, 0), mb)
        shape = {"model": {"layers": args.layers, "hidden": 768, "parameters": params}}
        result = {
            **stamp("scale/full-finetuning-deployed", cfg | shape, [0]),
            "update_bytes_per_client": params * 4,
            "checkpoint_files_after_round_1": files,
            "rounds_recorded": [r["round"] for r in rounds],
            "bytes_up_per_round": [r.get("bytes_up") for r in rounds if r["round"] > 0],
            "test_accuracy": [r.get("test_accuracy") for r in rounds],
            "killed_after_round_1_at_s": round(killed_at - started, 1),
            "server_peak_rss_mb": {
                "before_kill": round(by_pid.get(server.pid, 0), 1),
                "resumed": round(by_pid.get(resumed.pid, 0), 1),
            },  # fmt: skip
            "wall_s": round(time.perf_counter() - started, 1),
        }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
