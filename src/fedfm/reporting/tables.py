"""Markdown tables of a run's side results (the baselines' comparison)."""

from __future__ import annotations


def baselines_markdown(baselines: dict) -> str:
    held = baselines["rows"][0]["all_held_out"]
    metric = next(m for m in ("perplexity", "reward_accuracy", "accuracy") if m in held)
    lines = [
        f"| setting | all held-out loss | all held-out {metric} | own held-out loss (mean) | "
        f"own held-out {metric} (mean) | worst client's own loss |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in baselines["rows"]:
        a, o = r["all_held_out"], r["own_held_out_mean"]
        lines.append(
            f"| {r['setting']} | {a['loss']:.4f} | {a[metric]:.4f} | {o['loss']:.4f} | "
            f"{o[metric]:.4f} | {r['own_held_out_worst']['loss']:.4f} |"
        )
    return "\n".join(lines)
