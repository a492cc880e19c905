"""The ``fedfm`` command: ``run`` an experiment, rebuild a ``report``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Federated fine-tuning of foundation models."
)
err_console = Console(stderr=True, soft_wrap=True)  # messages are never hard-wrapped (pipes, logs)


def _version(value: bool) -> None:
    if value:
        import fedfm

        Console(soft_wrap=True).print(f"fedfm {fedfm.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print fedfm's version and exit."
    ),
    plugin: list[str] = typer.Option(
        [],
        "--plugin",
        envvar="FEDFM_PLUGINS",
        help="A module to import first, which registers components (repeatable; FEDFM_PLUGINS: "
        "comma-separated). Its components and their options are then usable in every command.",
    ),
) -> None:
    """Federated fine-tuning of foundation models."""
    from fedfm.registry import load_plugins

    try:
        load_plugins(name for text in plugin for name in text.split(","))
    except ImportError as err:
        _fail(err)


def stop_on_sigterm() -> None:
    """SIGTERM (docker stop, a Kubernetes pod's termination) stops the command as Ctrl-C does,
    through its cleanup (the server tells its clients, closes its ports), instead of killing it."""
    import signal
    import threading

    def stop(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


def _fail(err: Exception, status: int = 2) -> None:
    """Print a user error (brackets in it are text, not markup) and exit with ``status`` (2: bad
    input; 1: the run itself failed)."""
    err_console.print(f"[red]error:[/red] {escape(str(err))}")
    raise typer.Exit(status) from None


def _user_errors() -> tuple[type[Exception], ...]:
    from fedfm.config import ConfigError
    from fedfm.data.partition import PartitionError
    from fedfm.data.sources import DataError
    from fedfm.models.resolve import ModelError
    from fedfm.server.checkpoint import CheckpointError

    return CheckpointError, ConfigError, DataError, ModelError, PartitionError


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
    from fedfm.api import RunFinished, RunInterrupted, check_not_finished
    from fedfm.server.driver import RunFailedError

    if baselines:
        set_ = [*set_, "task.baselines=true"]
    stop_on_sigterm()
    try:
        if resume is not None:
            check_not_finished(resume, set_)
        fedfm.run(config, output=output, resume=resume, overrides=set_, progress=not quiet)
    except RunFinished as done:  # one line, never wrapped: a path and a command to copy
        Console(soft_wrap=True).print(escape(str(done)), soft_wrap=True)
    except RunInterrupted as stop:
        err_console.print(f"[yellow]{escape(str(stop))}[/yellow]", soft_wrap=True)
        raise typer.Exit(130) from None
    except _user_errors() as err:
        _fail(err)
    except RunFailedError as err:
        _fail(err, status=1)


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A run folder."),
    json_: bool = typer.Option(False, "--json", help="Print what was written and the last metrics as JSON."),
) -> None:
    """Rebuild the plots and report.html of a run folder."""
    from fedfm.reporting.outputs import write_outputs

    try:
        path = write_outputs(run_dir)
    except FileNotFoundError as err:
        _fail(err)
    if json_:
        import json

        from fedfm.reporting.status import run_status

        said = run_status(run_dir)
        print(json.dumps({"report": str(path), "plots": sorted(str(p) for p in Path(run_dir).glob("*.png")),
                          "round": said["round"], "metrics": said["metrics"]}, indent=1))  # fmt: skip
        return
    Console(soft_wrap=True).print(f"wrote {path}")


@app.command()
def status(
    run_dir: Path = typer.Argument(..., help="A run folder (running, stopped or finished)."),
    json_: bool = typer.Option(False, "--json", help="Machine-readable: one JSON object."),
) -> None:
    """Where a run stands: state, round, ETA and its basis, last metrics, failed sites, ε."""
    from fedfm.reporting.status import describe, run_status

    if not (Path(run_dir) / "config.toml").is_file():
        _fail(FileNotFoundError(f"{run_dir} is not a run folder (no config.toml)"))
    said = run_status(run_dir)
    if json_:
        import json

        print(json.dumps(said, indent=1))
    else:
        Console(soft_wrap=True).print(describe(said), markup=False)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A finished run folder."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder to write."),
    merge: bool = typer.Option(False, "--merge", help="Merge the adapter into the base weights."),
) -> None:
    """Write a run's final model: a PEFT adapter folder, or with --merge a plain transformers folder."""
    from fedfm.server.export import export_run

    try:
        with Console(soft_wrap=True).status(
            "merging the adapter into the base weights" if merge else "writing the adapter"
        ):
            path = export_run(run_dir, output, merge)
    except (FileNotFoundError, FileExistsError, *_user_errors()) as err:
        _fail(err)
    kind = (
        "merged model (transformers from_pretrained)" if merge else "adapter (peft PeftModel.from_pretrained)"
    )
    Console(soft_wrap=True).print(f"wrote {kind} to {path}")


@app.command()
def sweep(
    sweep_file: Path = typer.Argument(..., help="TOML sweep file (\\[sweep] with grid and/or variants)."),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Sweep folder (one run folder per cell)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-round progress output."),
    set_: list[str] = typer.Option([], "--set", help="Override a field in every cell (repeatable)."),
) -> None:
    """Run a grid of experiments (resumable); write summary.csv, summary.md and plots."""
    from fedfm.api import run_sweep

    try:
        run_sweep(sweep_file, output, progress=not quiet, note=Console(soft_wrap=True).print, overrides=set_)
    except _user_errors() as err:
        _fail(err)


@app.command()
def reproduce(
    targets: list[str] = typer.Argument(None, help="Entries or groups to rerun ('all': every entry)."),
    list_: bool = typer.Option(False, "--list", help="List the documented experiments and their cost."),
    quick: bool = typer.Option(False, "--quick", help="At each entry's documented reduced size."),
    record: bool = typer.Option(
        False, "--record", help="Measure and write the committed results themselves (maintainers)."
    ),
    root: Path | None = typer.Option(
        None, "--root", help="The fedfm source checkout (default: found from here)."
    ),
) -> None:
    """Rerun documented experiments and judge them against the committed results."""
    from fedfm.reproduce import find_root, listing, load, select
    from fedfm.reproduce import reproduce as rerun

    try:
        checkout = find_root(root)
        entries = select(load(checkout), list(targets or []))
        if list_ or not targets:
            Console(soft_wrap=True).print(listing(entries), markup=False, soft_wrap=True)
            if not list_:
                Console(soft_wrap=True).print("\nrerun: fedfm reproduce NAME|GROUP|all [--quick]")
            return
        outcomes = rerun(
            entries,
            checkout,
            quick=quick,
            note=lambda s: Console(soft_wrap=True).print(s, markup=False),
            record=record,
        )
    except (FileNotFoundError, ValueError, *_user_errors()) as err:
        _fail(err)
    Console(soft_wrap=True).print(f"comparison: {checkout / 'benchmarks/results/reproduced/comparison.md'}")
    if not all(o.ok for o in outcomes):
        raise typer.Exit(1)


@app.command()
def audit(
    source: Path = typer.Argument(..., help="A run folder, or a config TOML."),
    attack: list[str] = typer.Option(
        [], "--attack", "-a", help="inversion, canaries, membership (repeatable; default: all)."
    ),
    budget: float | None = typer.Option(
        None,
        "--budget",
        help="Minutes: an attack whose estimated cost does not fit is skipped, with the reason.",
    ),
    set_: list[str] = typer.Option([], "--set", help="An attack's option, ATTACK.OPTION=VALUE (repeatable)."),
    output: Path | None = typer.Option(
        None,
        "--output",
        "-o",
        help="Where audit.json/audit.md go (default: the run folder, or runs/audit-NAME-TIME).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the attacks' own randomness."),
) -> None:
    """Attack fedfm's privacy promises on a run or config: update inversion (your configuration,
    the attack's best case, secure aggregation, DP), canary clients against DP's ε, membership
    inference; tables in audit.md (and the run's report), numbers in audit.json."""
    from fedfm.audit.runner import audit as run_audit

    console = Console(soft_wrap=True)
    try:
        written = run_audit(
            source,
            list(attack) or None,
            budget,
            list(set_),
            output,
            seed,
            note=lambda s: console.print(s, markup=False),
        )
    except (ValueError, FileNotFoundError, *_user_errors()) as err:
        _fail(err)
    from fedfm.audit.runner import markdown

    console.print(markdown(written), markup=False)


@app.command()
def synth(
    output: Path = typer.Option(..., "--output", "-o", help="JSONL file to write (and resume)."),
    generator: str = typer.Option("smollm2-135m", help="Causal LM: registered name, folder or HF id."),
    dataset: str | None = typer.Option(None, help="Registered dataset whose label names to use."),
    labels: str | None = typer.Option(None, help="Comma-separated label names (instead of --dataset)."),
    per_class: int = typer.Option(20, "--per-class", help="Accepted samples wanted per class."),
    kind: str | None = typer.Option(None, help="What a text is, e.g. 'short news article'."),
    descriptions: Path | None = typer.Option(None, help="JSON file {label: description}."),
    seeds: Path | None = typer.Option(
        None, help="JSONL of a few PUBLIC examples (text, label) quoted in the prompt; never client data."
    ),
    prompt: str | None = typer.Option(None, help="Prompt template with {label}, {kind}, {description}."),
    batch_size: int = typer.Option(8, "--batch-size", help="Samples per generate call."),
    temperature: float = typer.Option(0.9, help="Sampling temperature."),
    top_p: float = typer.Option(0.95, "--top-p", help="Nucleus sampling mass."),
    max_new_tokens: int | None = typer.Option(
        None, "--max-new-tokens", help="Tokens per sample (default 96; --preference: 48)."
    ),
    min_words: int = typer.Option(12, "--min-words", help="Shorter samples are dropped."),
    max_words: int = typer.Option(400, "--max-words", help="Longer samples are dropped."),
    max_batches: int | None = typer.Option(None, "--max-batches", help="Batch budget per class."),
    quality_filter: bool = typer.Option(False, "--quality-filter", help="Keep samples nearest their class."),
    encoder: str = typer.Option("minilm", help="Encoder FM of the quality filter."),
    seed: int = typer.Option(0, help="Root seed of the sampling."),
    device: str = typer.Option("auto", help="'auto', 'cpu', 'cuda'."),
    preference: bool = typer.Option(
        False,
        "--preference",
        help="Preference pairs from chatterbot instead: corpus reply chosen, the "
        "untuned generator's greedy reply rejected (docs/preference.md).",
    ),
    per_category: int = typer.Option(24, "--per-category", help="--preference: pairs per category."),
) -> None:
    """Generate labelled synthetic examples with a generative FM from label names, or preference
    pairs with --preference (resumable JSONL)."""
    import json

    from fedfm.synthetic.generate import (
        DEFAULT_PROMPT,
        KINDS,
        SynthError,
        SynthSettings,
        dataset_labels,
        synthesize,
    )

    if preference:
        _synth_preference(output, generator, per_category, max_new_tokens or 48, batch_size, seed, device)
        return
    try:
        if (dataset is None) == (labels is None):
            raise SynthError("give exactly one of --dataset and --labels")
        names = dataset_labels(dataset) if dataset else [x.strip() for x in labels.split(",") if x.strip()]
        seed_examples: dict[str, list[str]] = {}
        if seeds:  # the project's JSONL reader: a bad line is named by file and number
            from fedfm.data.sources import _read_rows

            for row in _read_rows(seeds, "jsonl"):
                seed_examples.setdefault(str(row["label"]), []).append(str(row["text"]))
        settings = SynthSettings(
            generator=generator,
            labels=tuple(names),
            per_class=per_class,
            kind=kind or KINDS.get(dataset or "", "text"),
            descriptions=json.loads(descriptions.read_text()) if descriptions else {},
            seed_examples=seed_examples,
            prompt=prompt or DEFAULT_PROMPT,
            batch_size=batch_size,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens or 96,
            min_words=min_words,
            max_words=max_words,
            max_batches=max_batches,
            quality_filter=quality_filter,
            encoder=encoder,
            seed=seed,
        )
        summary = synthesize(settings, output, device=device, note=Console(soft_wrap=True).print)
    except (SynthError, FileNotFoundError, json.JSONDecodeError, KeyError, *_user_errors()) as err:
        _fail(err)
    total = sum(summary["accepted"].values())
    Console(soft_wrap=True).print(f"wrote {total} samples to {output}; rejected {summary['rejected']}")


def _synth_preference(output, generator, per_category, max_new_tokens, batch_size, seed, device) -> None:
    from fedfm.synthetic.generate import SynthError
    from fedfm.synthetic.preference import PreferenceSettings, preference_pairs

    settings = PreferenceSettings(generator, per_category, max_new_tokens, batch_size, seed)
    try:
        summary = preference_pairs(settings, output, device=device, note=Console(soft_wrap=True).print)
    except (SynthError, *_user_errors()) as err:
        _fail(err)
    Console(soft_wrap=True).print(
        f"wrote {summary['written']} preference pairs to {output}; dropped {summary['dropped']}"
    )


@app.command()
def dashboard(
    run_dirs: list[Path] = typer.Argument(..., help="Run folders to watch (several: side by side)."),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to bind (others need --token, --cert, --key)."
    ),
    port: int = typer.Option(8765, "--port", help="Port of the page."),
    token: str | None = typer.Option(
        None, "--token", help="Required as ?token=… (or FEDFM_DASHBOARD_TOKEN)."
    ),
    cert: Path | None = typer.Option(None, "--cert", help="TLS certificate (PEM)."),
    key: Path | None = typer.Option(None, "--key", help="TLS private key (PEM)."),
) -> None:
    """Serve a live page of one or more runs: progress, curves, the cohort, failures, ε, bytes."""
    import os

    from fedfm.reporting.dashboard.app import DashboardError, make_server

    token = token or os.environ.get("FEDFM_DASHBOARD_TOKEN")
    try:
        for d in run_dirs:
            if d.exists() and not d.is_dir():
                raise DashboardError(f"{d} is not a run folder")
            if not d.exists():  # a run about to start: its card fills in when the folder appears
                Console(soft_wrap=True).print(f"waiting for {d} to appear")
        server = make_server(
            run_dirs, host, port, token, str(cert) if cert else None, str(key) if key else None
        )
    except (DashboardError, ImportError) as err:
        _fail(err)
    scheme = "https" if cert else "http"
    Console(soft_wrap=True).print(
        f"dashboard on {scheme}://{host}:{port}/{'?token=…' if token else ''} (Ctrl-C stops it)"
    )
    server.run()


@app.command()
def server(
    config: Path | None = typer.Argument(None, help="TOML experiment file (model, training, rounds...)."),
    address: str = typer.Option("0.0.0.0:50051", "--address", help="HOST:PORT to listen on."),
    tokens: Path = typer.Option(..., "--tokens", help="File of 'name token' lines, one per client."),
    cert: Path | None = typer.Option(None, "--cert", help="Server certificate (PEM)."),
    key: Path | None = typer.Option(None, "--key", help="Server private key (PEM)."),
    client_ca: Path | None = typer.Option(
        None, "--client-ca", help="Require client certificates from this CA."
    ),
    insecure: bool = typer.Option(False, "--insecure", help="Plaintext (no TLS): trusted networks only."),
    round_timeout: float = typer.Option(600.0, "--round-timeout", help="Seconds a round waits for updates."),
    min_available: int | None = typer.Option(
        None,
        "--min-available",
        help="Connected clients to wait for before each round (default sampling.min_clients).",
    ),
    wait_timeout: float = typer.Option(
        600.0,
        "--wait-timeout",
        help="Seconds to wait: for all clients before round 1, then for --min-available.",
    ),
    mode: str | None = typer.Option(
        None,
        "--mode",
        help="sync (rounds) or async (FedBuff: clients pull and push when ready); default run.mode.",
    ),
    dashboard_port: int | None = typer.Option(
        None, "--dashboard", help="Serve the live dashboard of this run on 127.0.0.1:PORT."
    ),
    metrics: str | None = typer.Option(
        None,
        "--metrics",
        help="Prometheus /metrics on [HOST:]PORT (default host 127.0.0.1; counts and times only).",
    ),
    health: str | None = typer.Option(
        None, "--health", help="/healthz and /readyz on [HOST:]PORT for an orchestrator's probes."
    ),
    log_json: str | None = typer.Option(
        None, "--log-json", help="Also write every message as JSON lines to PATH ('-': stdout)."
    ),
    resume_existing: bool = typer.Option(
        False,
        "--resume-existing",
        help="If --output already holds a run, resume it (a restarted container or pod).",
    ),
    set_: list[str] = typer.Option([], "--set", help="Override a field (repeatable)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Run folder."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue the run in this folder."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Serve a federated experiment to clients on other machines (gRPC, TLS, per-client tokens).
    SIGTERM (a pod's stop) ends it at once; every finished round is checkpointed, so `--resume`
    (or `--resume-existing`) continues from the last one."""
    from fedfm.api import RunFinished, check_not_finished
    from fedfm.config import ConfigError, load_config
    from fedfm.deploy.server import DeployError, Security, serve
    from fedfm.server.driver import RunFailedError

    if resume_existing and resume is None and output is not None and (output / "checkpoint").exists():
        resume, config = output, None
    stop_on_sigterm()
    if log_json:
        from fedfm.reporting.logs import attach

        attach(log_json, "server")
    try:
        if mode is not None and resume:
            raise ConfigError("--mode with --resume: a resumed run keeps its own run.mode")
        if resume is not None:
            check_not_finished(resume, set_)
        cfg = None if resume else load_config(config, [*set_, *([f"run.mode={mode}"] if mode else [])])
        security = Security(
            str(cert) if cert else None,
            str(key) if key else None,
            str(client_ca) if client_ca else None,
            insecure,
        )
        serve(
            cfg,
            address,
            tokens,
            security,
            output=output,
            resume=resume,
            round_timeout_s=round_timeout,
            min_available=min_available,
            wait_timeout_s=wait_timeout,
            progress=not quiet,
            dashboard_port=dashboard_port,
            metrics_address=metrics,
            health_address=health,
            overrides=set_ if resume else (),
        )
    except RunFinished as done:  # as `fedfm run --resume` says it, rather than wait for clients
        Console(soft_wrap=True).print(escape(str(done)), soft_wrap=True)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the last finished round is checkpointed
        err_console.print(
            "stopped; every finished round is checkpointed: resume with fedfm server --resume RUN"
        )
        raise typer.Exit(143) from None
    except (DeployError, OSError, *_user_errors()) as err:
        _fail(err)
    except RunFailedError as err:
        _fail(err, status=1)


@app.command()
def client(
    server_address: str = typer.Option(..., "--server", help="HOST:PORT of the fedfm server."),
    token: str | None = typer.Option(
        None,
        "--token",
        help="This client's token. Visible to other local users in the process list: prefer "
        "--token-file or the FEDFM_TOKEN environment variable.",
    ),
    token_file: Path | None = typer.Option(
        None,
        "--token-file",
        help="Serve every 'name token' line of this file from this process (one shared model).",
    ),
    data: str = typer.Option(
        ...,
        "--data",
        help="A .csv/.jsonl file, a registered dataset, or 'config' (demos: the run's own dataset cut by "
        "its partitioner; 'config:FILE' names this client's copy of the run's file).",
    ),
    partition: int | None = typer.Option(None, "--partition", help="Partition of a registered dataset."),
    ca: Path | None = typer.Option(None, "--ca", help="CA certificate that signed the server's (PEM)."),
    cert: Path | None = typer.Option(None, "--cert", help="Client certificate for mutual TLS (PEM)."),
    key: Path | None = typer.Option(None, "--key", help="Client private key for mutual TLS (PEM)."),
    server_name: str | None = typer.Option(None, "--server-name", help="Host name the certificate names."),
    insecure: bool = typer.Option(False, "--insecure", help="Plaintext (no TLS): trusted networks only."),
    name: str = typer.Option("", "--name", help="Shown in the server's log."),
    log_json: str | None = typer.Option(
        None, "--log-json", help="Also write every message as JSON lines to PATH ('-': stdout)."
    ),
    retry: float = typer.Option(1.0, "--retry", help="Seconds between reconnection attempts."),
    give_up: float = typer.Option(600.0, "--give-up", help="Stop after this long without the server."),
    delay: float = typer.Option(
        0.0, "--delay", help="Seconds each update waits before its upload (emulates a slower device).", min=0
    ),
    nproc: int = typer.Option(
        1,
        "--nproc",
        help="Train this client on N processes (torch.distributed, gloo): each takes a share of every batch.",
        min=1,
    ),
    rank_timeout: float = typer.Option(
        300.0,
        "--rank-timeout",
        help="With --nproc: seconds a rank waits for the others before the round fails.",
    ),
    fsdp: bool = typer.Option(
        False,
        "--fsdp",
        help="With --nproc: shard the frozen base model across the processes (FSDP); each holds 1/N of it.",
    ),
) -> None:
    """Join a fedfm server with local data that never leaves this machine; train until the run ends."""
    import os

    from fedfm.deploy.auth import DeployError
    from fedfm.deploy.client import ClientError, ClientSecurity, Identity, run_identities
    from fedfm.systems.ranks import Layout

    if insecure:
        err_console.print(
            "[yellow]warning:[/yellow] insecure mode: traffic and the token travel in plaintext"
        )
    security = ClientSecurity(
        str(ca) if ca else None, str(cert) if cert else None, str(key) if key else None, server_name, insecure
    )
    stop_on_sigterm()
    say = Console(soft_wrap=True).print
    if log_json:
        from fedfm.reporting.logs import attach, logged

        attach(log_json, "client")
        say = logged(say)
    try:
        if token is not None and token_file is not None:
            raise ClientError("give at most one of --token and --token-file")
        if token_file is not None:
            from fedfm.deploy.auth import read_tokens

            identities = [Identity(t, partition, n) for n, t in read_tokens(token_file)]
        elif token or os.environ.get("FEDFM_TOKEN"):
            identities = [Identity(token or os.environ["FEDFM_TOKEN"], partition, name)]
        elif cert is not None:  # no token: the provisioned certificate is the identity
            identities = [Identity(None, partition, name)]
        else:
            raise ClientError(
                "give --token-file, the FEDFM_TOKEN environment variable, --token, or a client "
                "certificate (--cert/--key) provisioned without tokens"
            )
        run_identities(
            server_address,
            identities,
            data,
            security,
            retry_s=retry,
            give_up_s=give_up,
            note=say,
            delay_s=delay,
            ranks=Layout(nproc, rank_timeout, fsdp),
        )
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the server goes on without this site
        err_console.print("stopped")
        raise typer.Exit(143) from None
    except (ClientError, DeployError, OSError, *_user_errors()) as err:
        _fail(err)


@app.command()
def federate(
    config: Path = typer.Argument(..., help="TOML experiment file: the server's side (model, PEFT, rounds)."),
    command: list[str] = typer.Argument(
        ..., help="After --: your Trainer script and its arguments; {k} becomes each client's index."
    ),
    clients: int = typer.Option(2, "--clients", help="Client processes, each running the script.", min=1),
    round_timeout: float = typer.Option(600.0, "--round-timeout", help="Seconds a round waits for updates."),
    set_: list[str] = typer.Option([], "--set", help="Override a field (repeatable)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Run folder."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Federate your own Hugging Face Trainer script on this machine: a fedfm server and --clients
    processes of the script, each calling fedfm.hf.federate(trainer) (docs/trainer-scripts.md)."""
    from fedfm.deploy.client import ClientError
    from fedfm.deploy.server import DeployError
    from fedfm.hf import simulate
    from fedfm.server.driver import RunFailedError

    try:
        simulate(
            config,
            command,
            clients,
            output=output,
            overrides=set_,
            round_timeout_s=round_timeout,
            progress=not quiet,
        )
    except (ClientError, DeployError, OSError, *_user_errors()) as err:
        _fail(err)
    except RunFailedError as err:
        _fail(err, status=1)


@app.command()
def provision(
    output: Path = typer.Argument(..., help="A new folder for the CA and the startup kits."),
    site: list[str] = typer.Option(
        [], "--site", help="A site (client) name; repeat for each site (none: sites join by request/sign)."
    ),
    server_name: list[str] = typer.Option(
        ..., "--server-name", help="Host name or IP address clients dial (repeatable)."
    ),
    no_tokens: bool = typer.Option(False, "--no-tokens", help="Certificates alone identify the sites."),
    days: int = typer.Option(365, "--days", help="Validity of every certificate."),
    port: int = typer.Option(50051, "--port", help="Port written into the start scripts."),
) -> None:
    """Make a federation's CA, per-site certificates and tokens, and one startup kit per site."""
    from fedfm.deploy.provision import ProvisionError
    from fedfm.deploy.provision import provision as make

    try:
        kits = make(output, site, server_name, tokens=not no_tokens, days=days, port=port)
    except (ProvisionError, OSError) as err:
        _fail(err)
    console = Console(soft_wrap=True)
    console.print(f"wrote the CA to {kits['ca']} (keep ca.key offline), the server kit to {kits['server']}")
    for name in site:
        console.print(f"  {name}: {kits[name]}  (send it to the site over a channel you trust)")
    if not site:
        console.print("no sites yet: each site runs `fedfm request SITE DIR` and sends DIR/SITE.csr.pem; "
                      f"`fedfm sign {output} SITE.csr.pem --out KIT` answers it")  # fmt: skip


@app.command()
def request(
    site: str = typer.Argument(..., help="This site's name (as the coordinator will know it)."),
    folder: Path = typer.Argument(..., help="This site's kit folder (its key stays here)."),
) -> None:
    """At a site: make its private key and a certificate signing request (distributed provisioning)."""
    from fedfm.deploy.provision import ProvisionError
    from fedfm.deploy.provision import request as make

    try:
        key, csr = make(site, folder)
    except (ProvisionError, OSError) as err:
        _fail(err)
    Console(soft_wrap=True).print(
        f"wrote {key} (never send it) and {csr}: send {csr.name} to the coordinator, who answers with "
        f"{site}.pem, ca.pem, token and start.sh for {folder}"
    )


@app.command()
def sign(
    federation: Path = typer.Argument(..., help="The coordinator's federation folder (fedfm provision)."),
    csr: Path = typer.Argument(..., help="A site's SITE.csr.pem."),
    out: Path = typer.Option(..., "--out", help="Where to write the site's kit (no key: the site has it)."),
    renew: bool = typer.Option(False, "--renew", help="A new certificate for a member (rotation)."),
    days: int = typer.Option(365, "--days", help="Validity of the certificate."),
) -> None:
    """At the coordinator: sign a site's request; write its certificate, ca.pem, token and start.sh."""
    from fedfm.deploy.provision import ProvisionError
    from fedfm.deploy.provision import sign as make

    try:
        kit = make(federation, csr, out, days=days, renew=renew)
    except (ProvisionError, OSError) as err:
        _fail(err)
    Console(soft_wrap=True).print(f"wrote {kit}: send it to the site (its key is already there)")


@app.command()
def revoke(
    federation: Path = typer.Argument(..., help="The coordinator's federation folder."),
    site: str = typer.Argument(..., help="The site whose certificates to revoke."),
    reason: str = typer.Option("revoked by the coordinator", "--reason", help="Said to the site."),
) -> None:
    """Revoke a site's certificates: the server refuses the site at its next call, with the reason."""
    from fedfm.deploy.provision import ProvisionError
    from fedfm.deploy.provision import revoke as make

    try:
        serials = make(federation, site, reason)
    except (ProvisionError, OSError) as err:
        _fail(err)
    Console(soft_wrap=True).print(
        f"revoked {len(serials)} certificate(s) of {site} ({', '.join(serials)}) in "
        f"{federation / 'server' / 'revoked.txt'}; a running server reads it at each call"
    )


@app.command()
def config(
    config: Path | None = typer.Argument(None, help="TOML experiment file."),
    set_: list[str] = typer.Option([], "--set", help="Override a field (repeatable)."),
    json_: bool = typer.Option(False, "--json", help="Print the resolved config as JSON."),
) -> None:
    """Validate a config and print it fully resolved (every default filled in)."""
    from fedfm.config import ConfigError, load_config

    try:
        cfg = load_config(config, set_)
    except ConfigError as err:
        _fail(err)
    if json_:
        import json

        print(json.dumps(cfg.model_dump(mode="json"), indent=1))
    else:
        print(cfg.to_toml())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
