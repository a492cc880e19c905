"""Console output with rich: what is running, a progress bar, one table row per round."""

from __future__ import annotations

import contextlib
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

COLUMNS = [
    ("round", "round", "{:d}"),
    ("clients", "num_clients", "{:d}"),
    ("train loss", "train_loss", "{:.4f}"),
    ("test loss", "test_loss", "{:.4f}"),
    ("test acc", "test_accuracy", "{:.4f}"),
    ("macro-F1", "test_macro_f1", "{:.4f}"),
    ("ε", "epsilon", "{:.3f}"),
    ("time (s)", "elapsed_s", "{:.1f}"),
]


def _fmt(record: dict, key: str, fmt: str) -> str:
    value = record.get(key)
    return "–" if value is None else fmt.format(value)


class _Bar:
    """The progress bar of the rounds; ``start_round`` returns the per-client advance callback."""

    def __init__(self, progress: Progress | None, task, total: int) -> None:
        self.progress, self.task, self.total = progress, task, total

    def start_round(self, round_: int, cohort: int):
        if self.progress is not None:
            self.progress.update(self.task, total=cohort, completed=0, round=f"{round_}/{self.total}")

        def advance() -> None:
            if self.progress is not None:
                self.progress.advance(self.task)

        return advance


def _synthetic_note(cfg, data) -> str:
    n = len(data.synthetic_rows)
    if not n:
        return ""
    used = sum(int((rows >= data.num_real).sum()) for rows in data.client_train)
    return f" + {n} synthetic ({cfg.synthetic.mode}; {used} held by clients)"


class ConsoleReporter:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.columns = COLUMNS
        self.console = Console(stderr=False, highlight=False)
        self.progress: Progress | None = None

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(f"[dim]{text}[/dim]")

    def warn(self, text: str) -> None:
        if self.enabled:
            self.console.print(f"[yellow]warning:[/yellow] {text}")

    def status(self, text: str):
        return self.console.status(text) if self.enabled else contextlib.nullcontext()

    def describe(self, cfg, data, bundle, cohort: int, truncated: dict | None = None, columns=None) -> None:
        """What runs; ``columns``: the task kind's table (default: classification's)."""
        self.columns = columns or COLUMNS
        if not self.enabled:
            return
        self.console.print(
            f"[bold]{cfg.model.name}[/bold] + {cfg.peft.method}: {bundle.num_trainable():,} trainable of "
            f"{bundle.num_total():,} params on {bundle.device}; [bold]{cfg.data.name}[/bold]: "
            f"{data.num_real} train{_synthetic_note(cfg, data)} / {len(data.test)} test, "
            f"{data.num_clients} clients "
            f"({cfg.partition.method}), {cohort} per round; {cfg.strategy.aggregator} + "
            f"{cfg.strategy.server_optimizer} + {cfg.strategy.objective}"
        )
        if truncated:
            self.console.print(
                f"truncated at model.max_length = {cfg.model.max_length} tokens: {truncated['train']} of "
                f"{len(data.train)} train and {truncated['test']} of {len(data.test)} test conversations"
            )
        self.console.print("  ".join(f"{h:>10}" for h, _, _ in self.columns))

    def round_row(self, record: dict) -> None:
        if self.enabled:
            self.console.print("  ".join(f"{_fmt(record, k, f):>10}" for _, k, f in self.columns))

    @contextlib.contextmanager
    def rounds(self, total: int, done: int):
        if not self.enabled:
            yield _Bar(None, None, total)
            return
        progress = Progress(
            TextColumn("round {task.fields[round]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("clients"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        with progress:
            task = progress.add_task("clients", total=1, round=f"{done + 1}/{total}")
            yield _Bar(progress, task, total)

    def summary(self, history: list[dict], run_dir: Path) -> None:
        if not self.enabled:
            return
        table = Table(title="per-round metrics")
        for header, _, _ in self.columns:
            table.add_column(header, justify="right")
        for record in history:
            table.add_row(*(_fmt(record, k, f) for _, k, f in self.columns))
        self.console.print(table)
        self.console.print(f"[bold green]done.[/bold green] outputs in [bold]{run_dir}[/bold]:")
        for name in (
            "report.html",
            "metrics.jsonl",
            "config.toml",
            "partition.json",
            "adapter/",
            "checkpoint/",
        ):
            self.console.print(f"  {run_dir / name}")
