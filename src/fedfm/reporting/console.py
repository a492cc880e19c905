"""Console output with rich: what is running, a progress bar, one table row per round."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedfm.reporting.logs import emit

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


def duration(seconds: float) -> str:
    """``3h05m``, ``4m12s``, ``9s``: a duration as people read one."""
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Eta:
    """The time left of ``total`` steps from the mean wall time of the ones done in this process."""

    def __init__(self, total: int, done: int = 0) -> None:
        self.total, self.first, self.started = total, done, time.monotonic()
        self.done = done

    def step(self, done: int) -> None:
        self.done = done

    def left(self) -> str:
        ran = self.done - self.first
        if ran <= 0:
            return "–"
        return duration((time.monotonic() - self.started) / ran * (self.total - self.done))


class _Bar:
    """The progress bar of the rounds; ``start_round`` returns the per-client advance callback."""

    def __init__(self, progress: Progress | None, task, total: int, eta: Eta | None = None) -> None:
        self.progress, self.task, self.total, self.eta = progress, task, total, eta

    def start_round(self, round_: int, cohort: int):
        if self.eta is not None:
            self.eta.step(round_ - 1)
        if self.progress is not None:
            left = self.eta.left() if self.eta is not None else "–"
            self.progress.update(
                self.task, total=cohort, completed=0, round=f"{round_}/{self.total}", eta=f"ETA {left}"
            )

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
    """In a terminal: a progress bar with the ETA, a table row per round. Elsewhere (a log file, a
    pipe): plain lines that never wrap, each round's row ending with the ETA."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.columns = COLUMNS
        self.console = Console(stderr=False, highlight=False, soft_wrap=True)  # never hard-wrapped in a pipe
        self.terminal = self.console.is_terminal
        if not self.terminal:  # a log file: one record per line, however long
            self.console.soft_wrap = True
        self.progress: Progress | None = None
        self.eta: Eta | None = None
        self.in_rounds = False  # inside the rounds a log gets only their rows (no per-round steps)

    def note(self, text: str) -> None:
        emit("info", text)  # the structured log has it, quiet or not (fedfm.reporting.logs)
        if self.enabled:
            self.console.print(f"[dim]{text}[/dim]")

    def warn(self, text: str) -> None:
        emit("warning", text)
        if self.enabled:
            self.console.print(f"[yellow]warning:[/yellow] {text}")

    def status(self, text: str):
        emit("info", f"{text} …", event="status")  # the dashboard's "now" line
        if self.enabled and not self.terminal and not self.in_rounds:  # a log: say what starts, once
            self.console.print(f"{text} …")
        return self.console.status(text) if self.enabled and self.terminal else contextlib.nullcontext()

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
        said = {k: record[k] for _, k, _ in self.columns if isinstance(record.get(k), int | float)}
        emit("info", f"round {record.get('round')}", event="round", **said)
        if self.enabled:
            row = "  ".join(f"{_fmt(record, k, f):>10}" for _, k, f in self.columns)
            if not self.terminal and self.eta is not None and record.get("round"):
                self.eta.step(record["round"])
                row += f"  ETA {self.eta.left()}"
            self.console.print(row)

    @contextlib.contextmanager
    def rounds(self, total: int, done: int):
        self.eta = Eta(total, done)
        if not self.enabled or not self.terminal:
            self.in_rounds = True
            try:
                yield _Bar(None, None, total, self.eta)
            finally:
                self.in_rounds = False
            return
        progress = Progress(
            TextColumn("round {task.fields[round]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("clients"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[eta]}"),
            console=self.console,
            transient=True,
        )
        with progress:
            task = progress.add_task("clients", total=1, round=f"{done + 1}/{total}", eta="ETA –")
            yield _Bar(progress, task, total, self.eta)

    def summary(self, history: list[dict], run_dir: Path) -> None:
        if not self.enabled:
            return
        if not self.terminal:  # the rows are in the log already, one per line
            self.console.print(
                f"done. outputs in {run_dir}: report.html, metrics.jsonl, adapter/, checkpoint/"
            )
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
