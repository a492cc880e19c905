"""Communication experiment: accuracy and total bytes of the default BBC News experiment under
each compression setting, and with naive vs exact LoRA aggregation at homogeneous and
heterogeneous ranks, measured in one run of this script.

    python benchmarks/communication.py [--out benchmarks/results/communication.json] [--md FILE]
    python benchmarks/communication.py --methods none q8            # a slice

Each row is the same as ``fedfm run --set compression.method=METHOD [--set ...]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _cells import CellStore, run_cell

SETTINGS = {
    "none": [],
    "fp16": ["compression.method=fp16"],
    "bf16": ["compression.method=bf16"],
    "q8": ["compression.method=q8"],
    "q4 (block 256)": ["compression.method=q4", "compression.block_size=256"],
    "topk 10% + EF": ["compression.method=topk", "compression.ratio=0.1"],
    "topk 1% + EF": ["compression.method=topk", "compression.ratio=0.01"],
    "randk 10%": ["compression.method=randk", "compression.ratio=0.1"],
    # LoRA-aware aggregation and heterogeneous ranks (r = 8 everywhere, as in the default run)
    "exact LoRA (SVD)": ["strategy.lora_aggregation=exact"],
    "tiers 2/4/8, naive (HetLoRA)": ["peft.rank_tiers=[2,4,8]"],
    "tiers 2/4/8, exact (FlexLoRA)": ["peft.rank_tiers=[2,4,8]", "strategy.lora_aggregation=exact"],
    "stacked rank (FLoRA)": ["strategy.lora_aggregation=stack"],
}


def row(name: str, overrides: list[str]) -> dict:
    result, seconds = run_cell(overrides)
    rounds = [r for r in result.history if r.get("bytes_up") is not None]
    last = rounds[-1]
    return {
        "setting": name,
        "overrides": overrides,
        "test_accuracy": result.final_metrics["test_accuracy"],
        "best_accuracy": max(
            r["test_accuracy"] for r in result.history if r.get("test_accuracy") is not None
        ),
        "bytes_up_total": last["bytes_up_total"],
        "bytes_down_total": last["bytes_down_total"],
        "full_finetune_bytes_total": sum(r["full_finetune_bytes"] for r in rounds),
        "seconds": seconds,
    }


def markdown(rows: list[dict]) -> str:
    base = next((r for r in rows if r["setting"] == "none"), rows[0])
    lines = [
        "| setting | final acc | best acc | upload total | × smaller than none | download total |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['test_accuracy']:.3f} | {r['best_accuracy']:.3f} | "
            f"{r['bytes_up_total'] / 1e6:.2f} MB | {base['bytes_up_total'] / r['bytes_up_total']:.1f} | "
            f"{r['bytes_down_total'] / 1e6:.2f} MB |"
        )
    full = base["full_finetune_bytes_total"]
    lines.append(f"\nFull fine-tuning of the same cohorts would move {full / 1e6:,.0f} MB (up + down).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="*", default=list(SETTINGS))
    parser.add_argument("--out", default="benchmarks/results/communication.json")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per run (1 lets two experiments share 2 cores)",
    )
    parser.add_argument("--md", default=None)
    args = parser.parse_args()
    done = CellStore(args.out, key=lambda r: r["setting"])
    for name in args.methods:
        if name not in done:  # resumable: finished rows are kept
            r = row(name, SETTINGS[name] + ([f"run.threads={args.threads}"] if args.threads else []))
            done.add(r)
            print(
                f"{name:>30}: acc {r['test_accuracy']:.3f}, up {r['bytes_up_total'] / 1e6:.2f} MB", flush=True
            )
    table = markdown([done.cells[n] for n in SETTINGS if n in done])
    print(table)
    if args.md:
        Path(args.md).write_text(table + "\n")


if __name__ == "__main__":
    main()
