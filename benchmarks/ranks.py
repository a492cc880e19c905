"""One client's local training on 2 processes (``fedfm.systems.ranks``, gloo) against 1 process,
and on 2 processes with the frozen base sharded across them (FSDP, ``--fsdp``).

The packaged MiniLM with LoRA r = 8 on BBC News, one client of the default partition, batch 16 of
64 tokens, ``--steps`` steps; the same global batch either way. 1 process runs with every core's
thread; each of 2 ranks with its share of the threads. Seconds per step are the round's training
time over its steps (model building excluded), side by side in one run. With FSDP, each rank's
held parameter bytes (its shards plus the whole trainable weights) against the whole model's, and
each rank's peak RSS (which includes loading the whole model before sharding it).

    python benchmarks/ranks.py [--steps 12] [--out benchmarks/results/ranks.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from _stamp import stamp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def config(steps: int) -> dict:
    return {
        "run": {"rounds": 1, "seed": 0},
        "model": {"name": "minilm", "max_length": 64},
        "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"name": "bbc-news", "max_examples": 600},
        "training": {"local_steps": steps, "batch_size": 16, "lr": 5e-4},
    }


def train_round(cfg_dict: dict, theta_path: str) -> tuple[float, dict, object]:
    from fedfm.client.program import ClientJob, ClientProgram
    from fedfm.config import make_config
    from fedfm.tasks.setup import build_task, prepare_data
    from fedfm.types import RoundContext

    cfg = make_config(cfg_dict)
    data = prepare_data(cfg)
    bundle, task = build_task(cfg, data)
    program = ClientProgram.from_config(cfg)
    job = ClientJob(0, data.client_train[0], None)
    theta = torch.load(theta_path)
    start = time.perf_counter()
    payload, _ = program(bundle, task, job, theta, RoundContext(round=1, seed=0), {})
    return time.perf_counter() - start, payload.delta, bundle.model


def _rank(
    rank: int, world: int, port: int, cfg_dict: dict, theta_path: str, out: str, threads: int, shard: bool
) -> None:
    import resource

    from fedfm.systems import ranks

    torch.set_num_threads(threads)
    ranks.join(rank, world, f"127.0.0.1:{port}", shard_base=shard)
    seconds, delta, model = train_round(cfg_dict, theta_path)
    held, total = ranks.held_bytes(model)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.save(
        {"seconds": seconds, "delta": delta, "held": held, "total": total, "peak_mb": peak_mb},
        f"{out}.{rank}",
    )
    ranks.leave()


def two_ranks(cfg: dict, theta: str, out: str, threads: int, shard: bool) -> list[dict]:
    """Both ranks' results of one round on 2 processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(2, port, cfg, theta, out, threads, shard), nprocs=2, join=True)
    return [torch.load(f"{out}.{r}") for r in (0, 1)]


def main() -> None:
    from fedfm.config import make_config
    from fedfm.models.state import get_trainable_state
    from fedfm.tasks.setup import build_task, prepare_data

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ranks.json")
    args = ap.parse_args()
    cores = os.cpu_count() or 2
    cfg = config(args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        theta = f"{tmp}/theta.pt"
        c = make_config(cfg)
        torch.save(get_trainable_state(build_task(c, prepare_data(c))[0].trainable), theta)
        torch.set_num_threads(cores)
        one_s, one, _ = train_round(cfg, theta)
        threads = max(1, cores // 2)
        two = two_ranks(cfg, theta, f"{tmp}/ddp", threads, False)[0]
        sharded = two_ranks(cfg, theta, f"{tmp}/fsdp", threads, True)
    diff = max(float((two["delta"][k] - one[k]).abs().max()) for k in one)
    fsdp_diff = max(float((sharded[0]["delta"][k] - two["delta"][k]).abs().max()) for k in one)
    result = {
        **stamp("scale/two-process-client", cfg, [0]),
        "one_process": {"threads": cores, "seconds_per_step": round(one_s / args.steps, 3)},
        "two_processes": {
            "threads_each": max(1, cores // 2),
            "seconds_per_step": round(two["seconds"] / args.steps, 3),
        },
        "ratio_two_over_one": round(two["seconds"] / one_s, 3),
        "max_abs_update_difference": diff,
        "two_processes_fsdp": {
            "threads_each": threads,
            "seconds_per_step": round(sharded[0]["seconds"] / args.steps, 3),
            "ratio_over_one_process": round(sharded[0]["seconds"] / one_s, 3),
            "model_mb": round(sharded[0]["total"] / 2**20, 1),
            "held_mb_per_rank": [round(r["held"] / 2**20, 1) for r in sharded],
            "unsharded_held_mb_per_rank": round(two["held"] / 2**20, 1),
            "peak_rss_mb_per_rank": [round(r["peak_mb"]) for r in sharded],
            "unsharded_peak_rss_mb_rank_0": round(two["peak_mb"]),
            "max_abs_update_difference_vs_unsharded": fsdp_diff,
        },
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
