"""Virtual time (and bytes, and client compute) to a target accuracy, for every run of a sweep.

    python benchmarks/time_to_accuracy.py runs/sweeps/systems --target 0.90

Reads each cell's ``metrics.jsonl`` (runs with ``[systems] enabled`` or ``run.mode = "async"``
record ``virtual_time_s``); prints a Markdown table and writes ``time_to_accuracy.json`` beside
the cells.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def summarise(run_dir: Path, target: float) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rounds = [r for r in rows if r.get("event") == "round" and r.get("round", 0) > 0]
    hit = next((r for r in rounds if r.get("test_accuracy", 0) >= target), None)
    last = rounds[-1]

    def at(r):
        if r is None:
            return None
        return {
            "round": r["round"],
            "virtual_h": r.get("virtual_time_s", 0) / 3600,
            "mb_moved": (r.get("bytes_up_total", 0) + r.get("bytes_down_total", 0)) / 1e6,
            "client_compute_h": r.get("virtual_compute_s_total", 0) / 3600,
            "updates": sum(x["num_clients"] for x in rounds if x["round"] <= r["round"]),
        }

    accs = [r["test_accuracy"] for r in rounds if "test_accuracy" in r]
    return {
        "cell": run_dir.name,
        "target": target,
        "reached": at(hit),
        "end": at(last),
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": max(accs) if accs else None,
        "dropped": sum(len(r.get("dropped", [])) for r in rounds),
        "mean_staleness": (
            sum(sum(r.get("staleness", [])) for r in rounds)
            / max(1, sum(len(r.get("staleness", [])) for r in rounds))
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--target", type=float, default=0.90)
    args = parser.parse_args()
    cells = sorted(p for p in args.sweep.iterdir() if (p / "metrics.jsonl").is_file())
    results = [summarise(c, args.target) for c in cells]
    print(
        f"| run | virtual h to {args.target:.2f} | round/step | updates | MB moved | client compute h | "
        "final acc | best | dropped | mean staleness | virtual h (end) | MB (end) | compute h (end) |"
    )
    print("|" + " --- |" * 13)
    for r in results:
        hit, end = r["reached"], r["end"]
        reach = (
            f"{hit['virtual_h']:.1f} | {hit['round']} | {hit['updates']} | {hit['mb_moved']:.0f} | "
            f"{hit['client_compute_h']:.1f}"
            if hit
            else "not reached | – | – | – | –"
        )
        accuracy = f"{r['final_accuracy']:.3f} | {r['best_accuracy']:.3f}"
        ended = f"{end['virtual_h']:.1f} | {end['mb_moved']:.0f} | {end['client_compute_h']:.1f}"
        print(
            f"| {r['cell']} | {reach} | {accuracy} | {r['dropped']} | {r['mean_staleness']:.2f} | {ended} |"
        )
    (args.sweep / "time_to_accuracy.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
