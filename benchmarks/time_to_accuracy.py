"""Virtual time (and bytes, and client compute) to a target accuracy, for every run of one or
more sweeps (several sweeps: one per seed, aggregated by cell name as mean ± sample std).

    python benchmarks/time_to_accuracy.py runs/sweeps/systems [runs/sweeps/systems-s1 ...] --target 0.90

Reads each cell's ``metrics.jsonl`` (runs with ``[systems] enabled`` or ``run.mode = "async"``
record ``virtual_time_s``); prints a Markdown table and writes ``time_to_accuracy.json`` into the
first sweep folder. A cell that never reaches the target counts as not reached (and is left out of
the means; the table says in how many seeds it was reached).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def summarise(run_dir: Path, target: float) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rounds = [r for r in rows if r.get("event") == "round" and r.get("round", 0) > 0]
    hit = next((r for r in rounds if r.get("test_accuracy", 0) >= target), None)

    def at(r):
        if r is None:
            return None
        return {
            "round": r["round"],
            "virtual_min": r.get("virtual_time_s", 0) / 60,
            "mb_moved": (r.get("bytes_up_total", 0) + r.get("bytes_down_total", 0)) / 1e6,
            "client_compute_h": r.get("virtual_compute_s_total", 0) / 3600,
            "updates": sum(x["num_clients"] for x in rounds if x["round"] <= r["round"]),
        }

    accs = [r["test_accuracy"] for r in rounds if "test_accuracy" in r]
    taus = [t for r in rounds for t in r.get("staleness", [])]
    return {
        "cell": run_dir.name,
        "target": target,
        "reached": at(hit),
        "end": at(rounds[-1]),
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": max(accs) if accs else None,
        "dropped": sum(len(r.get("dropped", [])) for r in rounds),
        "mean_staleness": sum(taus) / len(taus) if taus else 0.0,
    }


def _ms(values: list[float], fmt: str) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", type=Path, nargs="+")
    parser.add_argument("--target", type=float, default=0.90)
    args = parser.parse_args()
    by_cell: dict[str, list[dict]] = {}
    for sweep in args.sweeps:
        for cell in sorted(p for p in sweep.iterdir() if (p / "metrics.jsonl").is_file()):
            by_cell.setdefault(cell.name, []).append(summarise(cell, args.target))
    print(
        f"| run | reached {args.target:.2f} | virtual min to it | updates | MB moved | client compute h | "
        "final acc | best acc | mean staleness | dropped | at the end: virtual min, MB, compute h |"
    )
    print("|" + " --- |" * 11)
    for name, runs in by_cell.items():
        hits = [r["reached"] for r in runs if r["reached"]]
        ends = [r["end"] for r in runs]

        def col(rows, key, fmt):
            return _ms([x[key] for x in rows], fmt)

        end = f"{col(ends, 'virtual_min', '{:.0f}')}, {col(ends, 'mb_moved', '{:.0f}')}, "
        end += col(ends, "client_compute_h", "{:.1f}")
        reach = [col(hits, "virtual_min", "{:.0f}"), col(hits, "updates", "{:.0f}")]
        reach += [col(hits, "mb_moved", "{:.0f}"), col(hits, "client_compute_h", "{:.1f}")]
        scores = [_ms([r[k] for r in runs], "{:.3f}") for k in ("final_accuracy", "best_accuracy")]
        other = [
            _ms([r["mean_staleness"] for r in runs], "{:.2f}"),
            _ms([r["dropped"] for r in runs], "{:.0f}"),
        ]
        print(f"| {name} | {len(hits)}/{len(runs)} | {' | '.join([*reach, *scores, *other])} | {end} |")
    (args.sweeps[0] / "time_to_accuracy.json").write_text(json.dumps(by_cell, indent=1) + "\n")


if __name__ == "__main__":
    main()
