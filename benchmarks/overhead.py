"""What federation costs on top of plain training, measured on the real MiniLM and BBC News.

(a) the same examples and optimizer steps trained centrally in one loop vs one federated
    in-process round (10 clients) — wall-time ratio and peak RSS (goal ≤ 1.02× time, ≤ 1.1× memory);
(b) peak RSS of a round with 10, 100 and 1,000 clients holding the same total data (goal: flat);
(c) per-client overhead in ms on that many-small-clients workload, against a central loop with
    the same steps.

Each measurement runs in its own process (so peak RSS is its own); timings exclude model loading
and are the median of repeats run alternately, side by side. Usage:

    python benchmarks/overhead.py [--out benchmarks/results/overhead.json] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _config(num_clients: int, examples: int, batch_size: int, max_length: int):
    from fedfm.config import make_config

    return make_config(
        {},
        [
            f"data.max_examples={examples}",
            "data.max_test_examples=10",
            f"model.max_length={max_length}",
            f"partition.num_clients={num_clients}",
            "partition.method=iid",
            "sampling.fraction=1.0",
            f"training.batch_size={batch_size}",
            "training.local_epochs=1",
            "run.rounds=2",  # round 1 is timed; it is not the last, so it does not evaluate
            "eval.at_start=false",
            "run.threads=2",
        ],
    )


def worker(mode: str, num_clients: int, examples: int, batch_size: int, max_length: int) -> dict:
    from fedfm.loop import Run
    from fedfm.reporting.console import _Bar
    from fedfm.training import make_optimizer, num_local_steps

    cfg = _config(num_clients, examples, batch_size, max_length)
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(cfg, Path(tmp), progress=False)
        steps = sum(num_local_steps(len(rows), cfg.training) for rows in run.data.client_train)
        start = time.perf_counter()
        if mode == "federated":
            record = run.run_round(1, _Bar(None, None, 1))
            assert record["num_clients"] == num_clients, record
        else:  # the same rows, the same number of steps and batch sizes, one model, one loop
            bundle, task = run.bundle, run.task
            optimizer = make_optimizer(list(bundle.trainable.values()), cfg.training)
            bundle.model.train()
            for rows in run.data.client_train:
                for b in range(num_local_steps(len(rows), cfg.training)):
                    idx = rows[b * batch_size : (b + 1) * batch_size]
                    loss = task.loss(bundle.model, task.batch(task.train, idx, bundle.device))
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(bundle.trainable.values(), cfg.training.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "mode": mode,
        "clients": num_clients,
        "examples": examples,
        "steps": steps,
        "seconds": seconds,
        "peak_rss_mb": rss_mb,
    }


def spawn(*args) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", *map(str, args)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_pair(mode_a: tuple, mode_b: tuple, repeats: int) -> tuple[dict, dict]:
    runs: dict[str, list[dict]] = {"a": [], "b": []}
    for _ in range(repeats):  # alternate, so machine noise hits both sides alike
        runs["a"].append(spawn(*mode_a))
        runs["b"].append(spawn(*mode_b))

    def med(rs: list[dict]) -> dict:
        return {
            **rs[0],
            "seconds": statistics.median(r["seconds"] for r in rs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "repeats": [r["seconds"] for r in rs],
        }

    return med(runs["a"]), med(runs["b"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", nargs=5, metavar=("MODE", "CLIENTS", "EXAMPLES", "BATCH", "LEN"))
    parser.add_argument("--out", default="benchmarks/results/overhead.json")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.worker:
        mode, *nums = args.worker
        print(json.dumps(worker(mode, *map(int, nums))))
        return

    results: dict = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": torch.get_num_threads(),
            "platform": platform.platform(),
        }
    }
    # (a) 10 clients × 48 examples, batch 16: 30 steps either way
    central, fed = median_pair(("central", 10, 480, 16, 48), ("federated", 10, 480, 16, 48), args.repeats)
    results["a_central_vs_federated"] = {
        "central": central,
        "federated": fed,
        "time_ratio": fed["seconds"] / central["seconds"],
        "memory_ratio": fed["peak_rss_mb"] / central["peak_rss_mb"],
    }
    print(
        f"(a) central {central['seconds']:.2f}s {central['peak_rss_mb']:.0f}MB | federated "
        f"{fed['seconds']:.2f}s {fed['peak_rss_mb']:.0f}MB | time ×{results['a_central_vs_federated']['time_ratio']:.3f}"
        f" memory ×{results['a_central_vs_federated']['memory_ratio']:.3f}"
    )
    # (b), (c) 1,000 examples at batch 1 (1,000 steps) split among 10 / 100 / 1,000 clients
    scaling = []
    base = spawn("central", 10, 1000, 1, 32)
    for clients in (10, 100, 1000):
        r = spawn("federated", clients, 1000, 1, 32)
        r["overhead_ms_per_client"] = 1000 * (r["seconds"] - base["seconds"]) / clients
        scaling.append(r)
        print(
            f"(b) {clients:>5} clients: {r['seconds']:.2f}s peak {r['peak_rss_mb']:.0f}MB; "
            f"(c) overhead {r['overhead_ms_per_client']:.2f} ms/client (central {base['seconds']:.2f}s)"
        )
    results["b_c_many_clients"] = {"central_same_steps": base, "federated": scaling}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
