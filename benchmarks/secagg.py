"""Secure-aggregation overhead against the number of clients, at the real LoRA payload size.

For each cohort size n, one protocol round (keys, encrypted Shamir shares, masking, unmasking)
is run with every client in this process, for SecAgg (every pair masks) and SecAgg+ (k
neighbours, k = the even number ≥ 2·log2 n), without dropouts and with 10% of the clients
dropping after sharing keys (their pairwise masks must then be rebuilt at the server). Reported:
client seconds per client (setup + masking), server seconds (routing + unmasking), bytes per
client up and down, next to the plain float32 upload of the same update. Times are medians of
``--repeats`` rounds in one process.

    python benchmarks/secagg.py [--clients 5 10 20 50 100] [--e2e-rounds 3] [--md docs/secagg-table.md]

The payload length defaults to the trainable values of the default experiment (MiniLM, LoRA r = 8 +
classification head), read from the model; ``--length`` overrides it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from fedfm.privacy.secagg import SecAggClient, SecAggParams
from fedfm.privacy.secagg_server import SecAggServer

BITS = 42  # the field the default run uses: 24-bit fixed point, weights up to the training set size


def default_length() -> int:
    from fedfm.config import make_config
    from fedfm.tasks.setup import build_task, prepare_data

    cfg = make_config()
    bundle, _ = build_task(cfg, prepare_data(cfg))
    return sum(p.numel() for p in bundle.trainable.values())


def one_round(n: int, length: int, k: int | None, drop: int) -> dict:
    params = SecAggParams(BITS, length, 0.67, k, graph_seed=n)
    gen = torch.Generator().manual_seed(n)
    xs = [torch.randint(0, 1 << 20, (length,), generator=gen) for _ in range(n)]
    client_s = server_s = 0.0
    up = down = 0

    t = time.perf_counter()
    clients = {u: SecAggClient(u, params) for u in range(n)}
    adverts = [c.advertise() for c in clients.values()]
    client_s += time.perf_counter() - t
    server = SecAggServer(params)
    t = time.perf_counter()
    roster = server.collect_keys(adverts)
    server_s += time.perf_counter() - t
    up += sum(a.nbytes() for a in adverts)
    down += n * sum(a.nbytes() for a in adverts)

    t = time.perf_counter()
    outgoing = {u: c.share_keys(roster) for u, c in clients.items()}
    client_s += time.perf_counter() - t
    t = time.perf_counter()
    inbox = server.route_shares(outgoing)
    server_s += time.perf_counter() - t
    t = time.perf_counter()
    for u, c in clients.items():
        c.receive_shares(inbox[u])
    client_s += time.perf_counter() - t
    up += sum(s.nbytes() for v in outgoing.values() for s in v)
    down += sum(s.nbytes() for v in inbox.values() for s in v)

    dropped = set(range(drop))
    for u, c in clients.items():
        if u in dropped:
            continue
        t = time.perf_counter()
        masked = c.mask(xs[u])
        client_s += time.perf_counter() - t
        t = time.perf_counter()
        server.collect_input(masked)
        server_s += time.perf_counter() - t
        up += masked.nbytes(BITS)

    t = time.perf_counter()
    request = server.unmask_request()
    server_s += time.perf_counter() - t
    t = time.perf_counter()
    responses = [clients[u].unmask(request) for u in request.survivors]
    client_s += time.perf_counter() - t
    t = time.perf_counter()
    total = server.finish(responses, request)
    server_s += time.perf_counter() - t
    expected = sum(x for u, x in enumerate(xs) if u not in dropped) & ((1 << BITS) - 1)
    assert torch.equal(total, expected), "secure sum differs from the plain sum"
    down += len(request.survivors) * request.nbytes()
    up += sum(r.nbytes() for r in responses)
    return {"client_s": client_s / n, "server_s": server_s, "up": up / n, "down": down / n}


def measure(n: int, length: int, k: int | None, drop: int, repeats: int) -> dict:
    runs = [one_round(n, length, k, drop) for _ in range(repeats)]
    median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    return {
        "clients": n,
        "protocol": "SecAgg" if k is None else f"SecAgg+ (k={k})",
        "dropped": drop,
        "client_s_per_client": median["client_s"],
        "server_s": median["server_s"],
        "bytes_up_per_client": median["up"],
        "bytes_down_per_client": median["down"],
        "plain_upload_bytes": 4 * length,
        "length": length,
    }


def end_to_end(rounds: int) -> list[dict]:
    """The default experiment (10 clients, 5 per round) with and without secure aggregation, in one
    process, alternated: mean round time (training included) and bytes per round."""
    from _cells import run_cell

    out = []
    for secure in (False, True, False, True):
        overrides = [f"run.rounds={rounds}", "eval.at_start=false", f"eval.every={rounds}"]
        overrides += ["secagg.enabled=true"] if secure else []
        result, seconds = run_cell(overrides)
        rounds_ = [r for r in result.history if r["round"] > 0]
        out.append(
            {
                "secagg": secure,
                "round_s": statistics.mean(r["round_s"] for r in rounds_),
                "bytes_up_per_round": statistics.mean(r["bytes_up"] for r in rounds_),
                "bytes_down_per_round": statistics.mean(r["bytes_down"] for r in rounds_),
                "unmask_server_s": statistics.mean(r["secagg"]["server_s"] for r in rounds_)
                if secure
                else 0.0,
                "test_accuracy": result.final_metrics["test_accuracy"],
                "seconds": seconds,
            }
        )
        print(json.dumps(out[-1]), flush=True)
    return out


def markdown(rows: list[dict]) -> str:
    lines = [
        "| clients | protocol | dropped | client s / client | server s | up / client | "
        "down / client | up ÷ plain fp32 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['protocol']} | {r['dropped']} | {r['client_s_per_client']:.3f} | "
            f"{r['server_s']:.3f} | {r['bytes_up_per_client'] / 1e6:.3f} MB | "
            f"{r['bytes_down_per_client'] / 1e6:.3f} MB | "
            f"{r['bytes_up_per_client'] / r['plain_upload_bytes']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", nargs="*", type=int, default=[5, 10, 20, 50, 100])
    parser.add_argument("--length", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/secagg.json")
    parser.add_argument("--md", default=None)
    parser.add_argument("--e2e-rounds", type=int, default=0, help="also run the default experiment")
    args = parser.parse_args()
    length = args.length or default_length()
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the protocol is single-threaded Python + AES; measure it so
    for n in args.clients:
        k = 2 * math.ceil(math.log2(n))
        for neighbours in [None] + ([k] if k < n - 1 else []):
            for drop in (0, max(1, n // 10)):
                row = measure(n, length, neighbours, drop, args.repeats)
                rows.append(row)
                print(json.dumps(row), flush=True)
    torch.set_num_threads(threads)
    e2e = end_to_end(args.e2e_rounds) if args.e2e_rounds else []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"protocol": rows, "end_to_end": e2e}, indent=1))
    table = markdown(rows)
    print(table)
    if args.md:
        Path(args.md).write_text(table + "\n")


if __name__ == "__main__":
    main()
