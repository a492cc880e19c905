"""Write a run's derived outputs (partition.json, plots, report.html) from the files in its folder.

Everything here reads the run folder, so ``fedfm report DIR`` rebuilds the same outputs later.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedfm.reporting.html import render_report
from fedfm.reporting.metrics import MetricsLog
from fedfm.reporting.plots import plot_curves, plot_partition

PLOTS = {
    "accuracy.png": (
        [("test_accuracy", "test accuracy"), ("test_macro_f1", "test macro-F1")],
        "score",
    ),
    "loss.png": ([("train_loss", "train loss"), ("test_loss", "test loss")], "loss"),
    "perplexity.png": ([("test_perplexity", "held-out perplexity")], "perplexity"),
}


def write_partition(run_dir: Path, summary: dict) -> Path:
    path = Path(run_dir) / "partition.json"
    path.write_text(json.dumps(summary, indent=1))
    return path


def write_outputs(run_dir: str | Path) -> Path:
    """Plots and ``report.html`` from ``config.toml``, ``metrics.jsonl`` and ``partition.json``."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir} is not a fedfm run folder (no metrics.jsonl)")
    history = MetricsLog(run_dir / "metrics.jsonl").rounds()
    plots = []
    for name, (keys, ylabel) in PLOTS.items():
        if any(r.get(k) is not None for r in history for k, _ in keys):
            plots.append(plot_curves(history, keys, ylabel, run_dir / name))
    partition = None
    if (run_dir / "partition.json").is_file():
        partition = json.loads((run_dir / "partition.json").read_text())
        plots.append(plot_partition(partition, run_dir / "partition.png"))
    config_text = (run_dir / "config.toml").read_text() if (run_dir / "config.toml").is_file() else ""
    html = render_report(run_dir.name, config_text, history, partition, plots)
    path = run_dir / "report.html"
    path.write_text(html)
    return path
