"""Write a run's derived outputs (partition.json, plots, report.html) from the files in its folder.

Everything here reads the run folder, so ``fedfm report DIR`` rebuilds the same outputs later.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedfm.reporting.html import computation_section, render_report
from fedfm.reporting.metrics import MetricsLog, read_jsonl
from fedfm.reporting.plots import plot_curves, plot_partition

PLOTS = {
    "accuracy.png": (
        [
            ("test_accuracy", "test accuracy"),
            ("test_macro_f1", "test macro-F1"),
            ("emulator_test_accuracy", "emulator's test accuracy (offsite)"),
        ],
        "score",
    ),
    "loss.png": ([("train_loss", "train loss"), ("test_loss", "test loss")], "loss"),
    "perplexity.png": ([("test_perplexity", "held-out perplexity")], "perplexity"),
    "reward.png": (
        [
            ("test_reward_accuracy", "held-out reward accuracy"),
            ("test_reward_margin", "held-out reward margin"),
        ],
        "reward",
    ),
    "personal.png": (
        [
            (f"{who}_local_{m}_{s}", f"{who} model, {s.replace('10', ' 10%')} client ({m.replace('_', ' ')})")
            for m in ("accuracy", "perplexity", "reward_accuracy")
            for who in ("global", "personal")
            for s in ("mean", "worst10")
        ],
        "score on the client's own test split",
    ),
    # client systems on the virtual clock (docs/systems.md): accuracy against virtual time
    "virtual-time.png": (
        [("test_accuracy", "test accuracy"), ("test_perplexity", "held-out perplexity")],
        "score",
    ),
}
X_AXIS = {"virtual-time.png": "virtual_time_s"}  # plots over something else than the round


SAMPLES_FILE = "client-samples.png"


def write_client_samples(run_dir: Path, data, per_client: int = 6, max_clients: int = 12) -> Path | None:
    """Image data: the first ``per_client`` training images of the first ``max_clients`` clients
    as ``client-samples.png`` (the report's partition section shows it); text data: nothing."""
    images = getattr(data.train, "images", None)
    if images is None:
        return None
    from fedfm.reporting.plots import plot_client_samples

    names = data.train.label_names
    samples = [
        (k, images[rows[:per_client]], [names[int(y)] for y in data.train.labels[rows[:per_client]]])
        for k, rows in enumerate(data.client_train[:max_clients])
        if len(rows)
    ]
    return plot_client_samples(samples, Path(run_dir) / SAMPLES_FILE) if samples else None


MODEL_FILES = "# model files: "


def note_model_files(run_dir: Path, name: str, source: str | None) -> None:
    """Say in ``config.toml`` (a comment) where the model's files are, when ``model.name`` does not
    say it (a packaged model, a relative path): the line is replaced on every (re)start."""
    path = Path(run_dir) / "config.toml"
    if not source or not path.is_file() or name == source:
        return
    lines = [line for line in path.read_text().splitlines() if not line.startswith(MODEL_FILES)]
    where = "a packaged model" if not Path(name).expanduser().exists() else "a local folder"
    lines.insert(0, f"{MODEL_FILES}{source} (model.name = {name!r} is {where})")
    path.write_text("\n".join(lines) + "\n")


def write_partition(run_dir: Path, summary: dict) -> Path:
    path = Path(run_dir) / "partition.json"
    path.write_text(json.dumps(summary, indent=1))
    return path


def table_html(table: str) -> str:
    """A simple markdown table (a header row, a rule, data rows) as HTML."""
    import html

    lines = [line.strip("|").split("|") for line in table.splitlines()]
    head = "".join(f"<th>{html.escape(c.strip())}</th>" for c in lines[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in row) + "</tr>" for row in lines[2:]
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def baselines_html(baselines: dict, table: str) -> str:
    """The markdown baselines table as HTML."""
    return (
        "<h2>Is federation worth it? Baselines</h2>"
        f"<p>Local-only: each client alone for {baselines['rounds']} rounds of its local steps; "
        f"centralized: the pooled data for the federation's {baselines['federated_total_steps']} total "
        "steps. Own held-out: each client's groups in the test split (mean over clients).</p>"
        + table_html(table)
    )


def audit_html(markdown: str) -> str:
    """``fedfm audit``'s audit.md as HTML: each attack's heading, notes and table."""
    import html

    parts, table = ["<h2>Privacy audit (fedfm audit)</h2>"], []
    for line in markdown.splitlines()[1:] + [""]:
        if line.startswith("|"):
            table.append(line)
            continue
        if table:
            parts.append(table_html("\n".join(table)))
            table = []
        if line.startswith("## "):
            parts.append(f"<h3>{html.escape(line[3:])}</h3>")
        elif line.strip():
            parts.append(f"<p>{html.escape(line)}</p>")
    return "".join(parts)


def finetuned_html(event: dict) -> str:
    """Local fine-tuning after FL: the summary over the clients' own test splits."""
    parts = [
        f"{k[len('finetuned_local_') :].replace('_', ' ')}: {v:.4f}"
        for k, v in event.items()
        if k.startswith("finetuned_local_") and isinstance(v, float)
    ]
    return (
        f"<h2>Local fine-tuning after FL</h2><p>{event['finetune_steps']} steps per client from its "
        f"model, scored on its own test split: {'; '.join(parts)}.</p>"
    )


def write_outputs(run_dir: str | Path) -> Path:
    """Plots and ``report.html`` from ``config.toml``, ``metrics.jsonl`` and ``partition.json``."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir} is not a fedfm run folder (no metrics.jsonl)")
    history = MetricsLog(run_dir / "metrics.jsonl").rounds()
    plots = []
    for name, (keys, ylabel) in PLOTS.items():
        x = X_AXIS.get(name, "round")
        if any(r.get(k) is not None and x in r for r in history for k, _ in keys):
            plots.append(plot_curves(history, keys, ylabel, run_dir / name, x=x))
    partition = None
    if (run_dir / "partition.json").is_file():
        partition = json.loads((run_dir / "partition.json").read_text())
        plots.append(plot_partition(partition, run_dir / "partition.png"))
    config_text = (run_dir / "config.toml").read_text() if (run_dir / "config.toml").is_file() else ""
    extra = []
    sharing = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("event") == "sharing"]
    computation = computation_section(history, sharing[-1] if sharing else None)
    if computation:
        extra.append(computation)
    tuned = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("event") == "personalization"]
    if tuned:
        extra.append(finetuned_html(tuned[-1]))
    if (run_dir / "baselines.json").is_file():
        from fedfm.reporting.tables import baselines_markdown as markdown

        baselines = json.loads((run_dir / "baselines.json").read_text())
        extra.append(baselines_html(baselines, markdown(baselines)))
    if (run_dir / "audit.md").is_file():
        extra.append(audit_html((run_dir / "audit.md").read_text()))
    samples = run_dir / SAMPLES_FILE
    html = render_report(
        run_dir.name, config_text, history, partition, plots, extra, samples if samples.is_file() else None
    )
    path = run_dir / "report.html"
    path.write_text(html)
    return path
