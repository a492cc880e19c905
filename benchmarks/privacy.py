"""Privacy experiment: final test accuracy against the client-level privacy budget ε on BBC News.

100 IID clients (about 17 articles each), real MiniLM, uniform weighting, every client in every
round (m = 100) for 10 rounds, adaptive clipping to the median update norm (Andrew et al. 2021)
from a start near it, δ = 1e-5, RDP accounting. For each ε the noise multiplier is calibrated
before the run; "inf" is the same federation without DP (uniform FedAvg, no clipping, no
noise). Two trainable parts are compared, because DP noise grows with the number of trainable
values: LoRA (r = 8) + head, and the classification head alone.

    python benchmarks/privacy.py [--out benchmarks/results/privacy.json] [--md docs/privacy-table.md]
    python benchmarks/privacy.py --epsilons 8 inf --methods head --threads 1   # a slice

Each cell is the same as:

    fedfm run --set partition.method=iid --set partition.num_clients=100 \\
              --set sampling.clients_per_round=100 --set run.rounds=10 --set strategy.weighting=uniform \\
              --set privacy.dp=client --set privacy.target_epsilon=EPS --set privacy.adaptive_clipping=true \\
              --set peft.method=METHOD
"""

from __future__ import annotations

import argparse
import math

from _cells import CellStore, run_cell, run_grid

BASE = [
    "run.rounds=10",
    "partition.method=iid",
    "partition.num_clients=100",
    "sampling.clients_per_round=100",
    "strategy.weighting=uniform",
    "eval.at_start=false",
    "eval.every=5",
]
DP = ["privacy.dp=client", "privacy.adaptive_clipping=true", "privacy.delta=1e-5"]
# Initial C near the median update norm measured without DP (round 1, 20 clients): LoRA 1.60, head 3.32;
# adaptive clipping then tracks the median.
CLIP = {"lora": 1.5, "head": 3.0}
EPSILONS = ["1", "4", "8", "inf"]
METHODS = ["lora", "head"]


def cell(epsilon: str, method: str, threads: int | None) -> dict:
    overrides = [*BASE, f"peft.method={method}"]
    if method == "head":
        overrides.append("training.lr=0.05")  # a linear probe takes a larger step than LoRA
    if epsilon != "inf":
        overrides += [*DP, f"privacy.target_epsilon={epsilon}", f"privacy.clip_norm={CLIP[method]}"]
    overrides += [f"run.threads={threads}"] if threads else []
    result, seconds = run_cell(overrides)
    final = result.final_metrics
    return {
        "epsilon_target": epsilon,
        "method": method,
        "test_accuracy": final.get("test_accuracy"),
        "test_macro_f1": final.get("test_macro_f1"),
        "epsilon": final.get("epsilon"),
        "noise_multiplier": final.get("noise_multiplier"),
        "final_clip_norm": final.get("clip_norm"),
        "seconds": seconds,
        "overrides": overrides,
    }


def markdown(cells: list[dict]) -> str:
    methods = list(dict.fromkeys(c["method"] for c in cells))
    epsilons = sorted({c["epsilon_target"] for c in cells}, key=float)
    by = {(c["epsilon_target"], c["method"]): c for c in cells}
    head = "| ε (δ = 1e-5) | " + " | ".join(f"{m}: accuracy | {m}: z | {m}: final C" for m in methods) + " |"
    lines = [head, "| --- |" + " --- | --- | --- |" * len(methods)]
    for e in epsilons:
        row = []
        for m in methods:
            c = by.get((e, m))
            if c is None:
                row += ["", "", ""]
                continue
            z = "–" if c["noise_multiplier"] is None else f"{c['noise_multiplier']:.3f}"
            clip = "–" if c["final_clip_norm"] is None else f"{c['final_clip_norm']:.3f}"
            row += [f"{c['test_accuracy']:.3f}", z, clip]
        label = "∞ (no DP)" if math.isinf(float(e)) else e
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epsilons", nargs="*", default=EPSILONS)
    parser.add_argument("--methods", nargs="*", default=METHODS)
    parser.add_argument("--out", default="benchmarks/results/privacy.json")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run")
    parser.add_argument("--md", default=None, help="also write the markdown table here")
    args = parser.parse_args()
    done = CellStore(args.out, key=lambda c: (c["epsilon_target"], c["method"]))
    run_grid(
        args,
        done,
        [(epsilon, method) for method in args.methods for epsilon in args.epsilons],
        lambda epsilon, method: cell(epsilon, method, args.threads),
        lambda c: (
            f"ε={c['epsilon_target']:>4} {c['method']:<5} acc {c['test_accuracy']:.3f}  "
            f"z {c['noise_multiplier']}  C {c['final_clip_norm']}  ({c['seconds']:.0f}s)"
        ),
        markdown,
    )


if __name__ == "__main__":
    main()
