"""The ``fedfm`` command: ``run`` an experiment, rebuild a ``report``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Federated fine-tuning of foundation models."
)
err_console = Console(stderr=True)


def _user_errors() -> tuple[type[Exception], ...]:
    from fedfm.config import ConfigError
    from fedfm.data.partition import PartitionError
    from fedfm.data.sources import DataError
    from fedfm.models.resolve import ModelError

    return ConfigError, DataError, ModelError, PartitionError


@app.command()
def run(
    config: Path | None = typer.Argument(
        None, help="TOML experiment file (default: the embedded experiment)."
    ),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a field: --set partition.alpha=0.1 (repeatable)."
    ),
    output: Path | None = typer.Option(None, "--output", "-o", help="Run folder."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue the run in this folder."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    baselines: bool = typer.Option(
        False, "--baselines", help="Also train the local-only and centralized baselines (task.baselines)."
    ),
) -> None:
    """Run a federated experiment; with no arguments, the embedded default experiment."""
    import fedfm

    if baselines:
        set_ = [*set_, "task.baselines=true"]
    try:
        fedfm.run(config, output=output, resume=resume, overrides=set_, progress=not quiet)
    except _user_errors() as err:
        err_console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run folder.")) -> None:
    """Rebuild the plots and report.html of a run folder."""
    from fedfm.reporting.outputs import write_outputs

    try:
        path = write_outputs(run_dir)
    except FileNotFoundError as err:
        err_console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    Console().print(f"wrote {path}")


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A finished run folder."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder to write."),
    merge: bool = typer.Option(False, "--merge", help="Merge the adapter into the base weights."),
) -> None:
    """Write a run's final model: a PEFT adapter folder, or with --merge a plain transformers folder."""
    from fedfm.models.export import export_run

    try:
        path = export_run(run_dir, output, merge)
    except (FileNotFoundError, FileExistsError, *_user_errors()) as err:
        err_console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    kind = (
        "merged model (transformers from_pretrained)" if merge else "adapter (peft PeftModel.from_pretrained)"
    )
    Console().print(f"wrote {kind} to {path}")


@app.command()
def config(
    config: Path | None = typer.Argument(None, help="TOML experiment file."),
    set_: list[str] = typer.Option([], "--set", help="Override a field (repeatable)."),
) -> None:
    """Validate a config and print it fully resolved (every default filled in)."""
    from fedfm.config import ConfigError, load_config

    try:
        print(load_config(config, set_).to_toml())
    except ConfigError as err:
        err_console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
