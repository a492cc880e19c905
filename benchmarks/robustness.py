"""Robustness experiment: clean accuracy and accuracy / attack success under 20% attackers of each
kind, for the mean and each robust aggregator, on BBC News with the real MiniLM.

Writes JSON (every cell) and a markdown table. A lighter set-up than the default run so the whole
grid fits on a laptop: 30 IID clients, 15 per round (3 attackers each round at 20%), 4 rounds.

    python benchmarks/robustness.py [--out benchmarks/results/robustness.json] [--md docs/robustness.md]
    python benchmarks/robustness.py --attacks none scale --aggregators mean median   # a slice

Each cell is the same as:

    fedfm run --set partition.num_clients=30 --set sampling.clients_per_round=15 ... \\
              --set strategy.aggregator=AGG --set attack.kind=ATTACK --set attack.fraction=0.2
"""

from __future__ import annotations

import argparse

from _cells import CellStore, run_cell, run_grid

BASE = [
    "run.rounds=4",
    "partition.method=iid",
    "partition.num_clients=30",
    "sampling.clients_per_round=15",
    "training.local_steps=3",
    "data.max_test_examples=200",
    "eval.at_start=false",
    "eval.every=4",
    "strategy.byzantine=3",
    "strategy.trim_ratio=0.2",
    "strategy.norm_bound=2.5",  # ≈ 1.1 × the median benign update norm here (2.18–2.31 in round 1)
    "attack.fraction=0.2",
    "attack.scale=10",
]
ATTACKS = ["none", "label_flip", "sign_flip", "scale", "gaussian", "alie", "backdoor", "nan"]
AGGREGATORS = [
    "mean",
    "median",
    "trimmed_mean",
    "krum",
    "multi_krum",
    "bulyan",
    "norm_bound",
    "geometric_median",
]


def cell(attack: str, aggregator: str, threads: int | None = None) -> dict:
    overrides = [*BASE, f"strategy.aggregator={aggregator}", f"attack.kind={attack}"]
    overrides += [f"run.threads={threads}"] if threads else []
    result, seconds = run_cell(overrides)
    history = result.history
    final = result.final_metrics
    return {
        "attack": attack,
        "aggregator": aggregator,
        "test_accuracy": final.get("test_accuracy"),
        "attack_success_rate": final.get("attack_success_rate"),
        "rejected": sum(len(r.get("rejected", [])) for r in history),
        "skipped_rounds": sum(1 for r in history if r.get("skipped")),
        "seconds": seconds,
        "overrides": overrides,
    }


def markdown(cells: list[dict]) -> str:
    attacks = list(dict.fromkeys(c["attack"] for c in cells))
    aggs = list(dict.fromkeys(c["aggregator"] for c in cells))
    by = {(c["attack"], c["aggregator"]): c for c in cells}
    lines = ["| attack \\ aggregator | " + " | ".join(aggs) + " |", "| --- |" + " --- |" * len(aggs)]
    for a in attacks:
        row = []
        for g in aggs:
            c = by.get((a, g))
            if c is None:
                row.append("")
                continue
            text = "–" if c["test_accuracy"] is None else f"{c['test_accuracy']:.3f}"
            if c.get("attack_success_rate") is not None:
                text += f" / ASR {c['attack_success_rate']:.2f}"
            if c["skipped_rounds"]:
                text += f" ({c['skipped_rounds']} skipped)"
            row.append(text)
        lines.append(f"| {a} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--attacks", nargs="*", default=ATTACKS)
    parser.add_argument("--aggregators", nargs="*", default=AGGREGATORS)
    parser.add_argument("--out", default="benchmarks/results/robustness.json")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per run (1 lets two experiments share 2 cores)",
    )
    parser.add_argument("--md", default=None, help="also write the markdown table here")
    args = parser.parse_args()
    done = CellStore(args.out, key=lambda c: (c["attack"], c["aggregator"]))
    run_grid(
        args,
        done,
        [(attack, agg) for attack in args.attacks for agg in args.aggregators],
        lambda attack, agg: cell(attack, agg, args.threads),
        lambda c: (
            f"{c['attack']:>11} × {c['aggregator']:<17} acc {c['test_accuracy']}  "
            f"asr {c['attack_success_rate']}  rejected {c['rejected']}  ({c['seconds']:.0f}s)"
        ),
        markdown,
    )


if __name__ == "__main__":
    main()
