"""What federation costs on top of plain training, measured on the real MiniLM and BBC News.

(a) the same examples and optimizer steps trained centrally in one loop vs one federated
    in-process round (10 clients) — wall-time ratio and peak RSS (goal ≤ 1.02× time, ≤ 1.1× memory);
(b) peak RSS of a round with 10, 100 and 1,000 clients holding the same total data (goal: flat);
(c) per-client overhead in ms on that many-small-clients workload, against a central loop with
    the same steps.

This machine is shared and noisy (the same loop varies by ±20% between runs), so time ratios
come from the two loops alternated in one process, model loaded once, reported as the ratio of
medians and of minimums over the repeats, plus CPU time. Peak RSS comes from running each mode
in its own process. Timings exclude model loading. Usage:

    python benchmarks/overhead.py [--out benchmarks/results/overhead.json] [--repeats 4]
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
            "run.rounds=2",  # round 1 is timed: not the last round and not an eval round
            "eval.every=1000",
            "eval.at_start=false",
            "run.threads=2",
        ],
    )


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _central_fn(run, cfg):
    """Train the same rows with the same steps and batch sizes as the round, in one plain loop."""
    from fedfm.client.program import make_optimizer, num_local_steps

    bundle, task, bs = run.bundle, run.task, cfg.training.batch_size

    def central() -> None:
        optimizer = make_optimizer(list(bundle.trainable.values()), cfg.training)
        bundle.model.train()
        for rows in run.data.client_train:
            for b in range(num_local_steps(len(rows), cfg.training)):
                loss = task.loss(
                    bundle.model, task.batch(task.train, rows[b * bs : (b + 1) * bs], bundle.device)
                )
                loss.backward()
                torch.nn.utils.clip_grad_norm_(bundle.trainable.values(), cfg.training.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    return central


def worker(
    mode: str, num_clients: int, examples: int, batch_size: int, max_length: int, repeats: int
) -> dict:
    """``mode`` central / federated: one run, for its own peak RSS; ``ab``: both, alternated."""
    from fedfm.client.program import num_local_steps
    from fedfm.reporting.console import _Bar
    from fedfm.server.driver import Run

    cfg = _config(num_clients, examples, batch_size, max_length)
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(cfg, Path(tmp), progress=False)
        steps = sum(num_local_steps(len(rows), cfg.training) for rows in run.data.client_train)
        central = _central_fn(run, cfg)
        initial = run.state.params

        def federated() -> None:
            run.state.params = initial
            record = run.run_round(1, _Bar(None, None, 1))
            assert record["num_clients"] == num_clients, record

        fns = {"central": [central], "federated": [federated], "ab": [central, federated] * repeats}[mode]
        times: dict[str, list] = {"central": [], "federated": []}
        for fn in fns:
            times[fn.__name__].append(_timed(fn))
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {
        "mode": mode,
        "clients": num_clients,
        "examples": len(run.data.train),
        "steps": steps,
        "peak_rss_mb": rss_mb,
    }
    for name, ts in times.items():
        if ts:
            out[name] = {"wall_s": [t[0] for t in ts], "cpu_s": [t[1] for t in ts]}
    return out


def spawn(*args) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", *map(str, args)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def ratios(ab: dict) -> dict:
    c, f = ab["central"], ab["federated"]
    return {
        "central_wall_s": c["wall_s"],
        "federated_wall_s": f["wall_s"],
        "time_ratio_median": statistics.median(f["wall_s"]) / statistics.median(c["wall_s"]),
        "time_ratio_min": min(f["wall_s"]) / min(c["wall_s"]),
        "cpu_ratio_min": min(f["cpu_s"]) / min(c["cpu_s"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--worker", nargs=6, metavar=("MODE", "CLIENTS", "EXAMPLES", "BATCH", "LEN", "REPEATS")
    )
    parser.add_argument("--out", default="benchmarks/results/overhead.json")
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    if args.worker:
        mode, *nums = args.worker
        print(json.dumps(worker(mode, *map(int, nums))))
        return

    results: dict = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": 2,
            "platform": platform.platform(),
        },
        "method": "time ratios: both loops alternated in one process (machine noise hits both); "
        "peak RSS: each mode in its own process",
    }
    # (a) 10 clients x 48 examples, batch 16 -> 30 steps either way
    ab = spawn("ab", 10, 480, 16, 32, args.repeats)
    rss_c, rss_f = spawn("central", 10, 480, 16, 32, 1), spawn("federated", 10, 480, 16, 32, 1)
    a = {
        **ratios(ab),
        "steps": ab["steps"],
        "central_peak_rss_mb": rss_c["peak_rss_mb"],
        "federated_peak_rss_mb": rss_f["peak_rss_mb"],
        "memory_ratio": rss_f["peak_rss_mb"] / rss_c["peak_rss_mb"],
    }
    results["a_central_vs_federated"] = a
    print(
        f"(a) {a['steps']} steps: time x{a['time_ratio_median']:.3f} (median of {args.repeats}), "
        f"x{a['time_ratio_min']:.3f} (min), cpu x{a['cpu_ratio_min']:.3f}; peak RSS central "
        f"{a['central_peak_rss_mb']:.0f} MB, federated {a['federated_peak_rss_mb']:.0f} MB "
        f"(x{a['memory_ratio']:.3f})"
    )
    # (b) peak RSS: 1,100 examples at batch 1 split among 10 / 100 / 1,000 clients
    scaling = []
    for clients in (10, 100, 1000):
        r = spawn("federated", clients, 1100, 1, 16, 1)
        scaling.append(
            {"clients": clients, "peak_rss_mb": r["peak_rss_mb"], "round_wall_s": r["federated"]["wall_s"][0]}
        )
        print(
            f"(b) {clients:>5} clients: peak RSS {r['peak_rss_mb']:.0f} MB, "
            f"round {r['federated']['wall_s'][0]:.1f} s"
        )
    results["b_peak_rss_by_clients"] = scaling
    # (c) per-client overhead: 1,000 one-step clients vs the same 1,000+ steps in one loop
    ab = spawn("ab", 1000, 1100, 1, 16, args.repeats)
    c = ratios(ab)
    c["overhead_ms_per_client_min"] = 1000 * (min(c["federated_wall_s"]) - min(c["central_wall_s"])) / 1000
    c["overhead_ms_per_client_median"] = (
        1000 * (statistics.median(c["federated_wall_s"]) - statistics.median(c["central_wall_s"])) / 1000
    )
    results["c_many_small_clients"] = c
    print(
        f"(c) 1000 clients, {ab['steps']} steps: overhead {c['overhead_ms_per_client_min']:.2f} ms/client "
        f"(min), {c['overhead_ms_per_client_median']:.2f} (median); time x{c['time_ratio_min']:.3f} (min)"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
