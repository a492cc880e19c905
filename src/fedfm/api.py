"""The Python entry points: ``run`` an experiment, ``load_config`` from TOML plus overrides."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from fedfm.config import ConfigError, RunConfig, load_config, make_config
from fedfm.server.driver import RunResult


def _coerce(config: RunConfig | str | Path | Mapping[str, Any] | None, overrides: Iterable[str]) -> RunConfig:
    overrides = list(overrides)
    if config is None or isinstance(config, (str, Path)):
        return load_config(config, overrides)
    if isinstance(config, RunConfig):
        return make_config(config.model_dump(), overrides) if overrides else config
    return make_config(config, overrides)


def run(
    config: RunConfig | str | Path | Mapping[str, Any] | None = None,
    *,
    output: str | Path | None = None,
    resume: str | Path | None = None,
    overrides: Iterable[str] = (),
    progress: bool = True,
    callbacks: Iterable[Callable[[dict], None]] = (),
) -> RunResult:
    """Run an experiment (default: the embedded BBC News + MiniLM + LoRA FedAvg experiment).

    ``config`` is a ``RunConfig``, a TOML path, a nested dict, or ``None``. ``output`` picks the run
    folder (default ``<run.output_root>/<run.name>-<timestamp>``). ``resume`` continues the run in
    that folder from its last finished round, with the config saved there. ``callbacks`` are called
    with each round's metrics record.
    """
    from fedfm.protocols import PROTOCOLS

    new_folder = resume is None and (output is None or not Path(output).exists())
    cfg, run_dir = prepare_run(config, output=output, resume=resume, overrides=overrides)
    from fedfm.sharing import SHARING_MODES

    # a sharing mode with its own loop (knowledge transfer) runs as that protocol
    protocol = PROTOCOLS.get(SHARING_MODES.get(cfg.sharing.mode).protocol or cfg.run.protocol)
    try:
        return protocol.run(cfg, run_dir, progress=progress, callbacks=callbacks, resume=resume is not None)
    except KeyboardInterrupt:
        raise RunInterrupted(run_dir) from None
    except Exception:
        if new_folder and not (run_dir / "checkpoint").exists():  # it failed before training: no trace
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
        raise


class RunFinished(ConfigError):
    """``resume`` of a run whose last round is done: nothing to do (the message says how to go on)."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; ``run_dir`` resumes from its last checkpoint."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(f"interrupted; resume with: fedfm run --resume {run_dir}")
        self.run_dir = run_dir


def check_not_finished(run_dir: str | Path, overrides: Iterable[str] = ()) -> None:
    """Raise ``RunFinished`` when ``run_dir``'s checkpoint is at ``run.rounds`` (after
    ``overrides``) and its outputs are written (a run killed while writing them is resumed to write
    them again). ``fedfm run --resume`` asks this first; ``run(resume=...)`` of a finished run
    writes its outputs again and returns its result (what a sweep resuming a cell needs)."""
    from fedfm.server.checkpoint import load_checkpoint

    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        return  # prepare_run says what is wrong with the folder
    cfg = load_config(run_dir / "config.toml", overrides)
    saved = load_checkpoint(run_dir / "checkpoint")
    if saved is None or saved.round < cfg.run.rounds:
        return
    if (run_dir / "report.html").is_file() and (run_dir / "adapter").is_dir():
        raise RunFinished(
            f"{run_dir} is finished: its {saved.round} rounds (run.rounds = {cfg.run.rounds}) are done and "
            f"its report is {run_dir / 'report.html'}; to train further, resume with --set "
            f"run.rounds={saved.round + 5} (any number above {saved.round})"
        )


def prepare_run(
    config=None, *, output=None, resume=None, overrides: Iterable[str] = ()
) -> tuple[RunConfig, Path]:
    """The validated config and the run folder (created, with config.toml written) of a new or resumed run."""
    if resume is not None:
        if config is not None:
            raise ConfigError("resume continues with the run folder's own config; pass no config")
        run_dir = Path(resume)
        if not (run_dir / "config.toml").is_file():
            raise ConfigError(f"{run_dir} is not a fedfm run folder (no config.toml)")
        cfg = load_config(run_dir / "config.toml", overrides)
    else:
        cfg = _coerce(config, overrides)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(output) if output else Path(cfg.run.output_root) / f"{cfg.run.name}-{stamp}"
        if (run_dir / "checkpoint").exists():
            raise ConfigError(
                f"{run_dir} already holds a run; resume it with --resume or pick another --output"
            )
    if resume is None:
        cfg = natural_clients(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(cfg.to_toml())
    return cfg, run_dir


def natural_clients(cfg: RunConfig) -> RunConfig:
    """``partition.method = "natural"`` without ``num_clients``: one client per distinct value of
    ``partition.column`` in the training rows (the number is then written into config.toml)."""
    p = cfg.partition
    from fedfm.data.partition import by_column

    if not by_column(p) or not p.column or "num_clients" in p.model_fields_set:
        return cfg
    import warnings

    from fedfm.data.sources import DataWarning
    from fedfm.tasks.setup import load_splits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # the run says them once, when it loads the data
        train, _ = load_splits(cfg)
    values = train.columns.get(p.column)
    if values is None:
        return cfg  # prepare_data names the missing column
    data = cfg.model_dump()
    n = data["partition"]["num_clients"] = len({str(v) for v in values})
    try:
        return make_config(data)
    except ConfigError as err:
        raise ConfigError(
            f"{err} (partition.num_clients = {n}: the distinct values of partition.column {p.column!r} "
            "in the training data)"
        ) from None


def run_sweep(
    path: str | Path,
    output: str | Path | None = None,
    *,
    progress: bool = True,
    note: Callable[[str], None] = print,
    overrides: list[str] = (),
) -> list[dict]:
    """Run every unfinished cell of the sweep in ``path``; write summary.csv, summary.md and plots.

    ``overrides`` (``--set``) apply to every cell after the sweep's own fields (e.g. ``run.threads=1``).
    A cell is finished when its folder holds ``cell.json``. A cell interrupted mid-run resumes from
    its last checkpoint. Returns the summary rows in cell order.
    """
    from fedfm.reporting.sweep import (
        Cell,
        bytes_moved,
        cell_summary,
        check_cells,
        counted_costs,
        expand,
        final_values,
        load_sweep,
        wall_time,
        write_summary,
    )
    from fedfm.server.driver import RunFailedError

    spec = load_sweep(path)
    grouped = [
        f"run.tracker_group={json.dumps(spec.name)}"
    ]  # trackers: one run per cell, grouped by the sweep
    cells = [Cell(c.name, c.values, [*c.overrides, *overrides, *grouped]) for c in expand(spec)]
    configs = check_cells(spec, cells)
    out = Path(output) if output else Path(next(iter(configs.values())).run.output_root) / spec.name
    out.mkdir(parents=True, exist_ok=True)
    from fedfm.reporting.console import Eta

    rows, eta = [], None
    for i, cell in enumerate(cells, 1):
        folder, done = out / cell.name, out / cell.name / "cell.json"
        if done.is_file():
            note(f"[{i}/{len(cells)}] {cell.name}: finished earlier, kept")
            rows.append(json.loads(done.read_text()))
            continue
        eta = eta or Eta(len(cells), i - 1)  # from the cells this process runs
        eta.step(i - 1)
        note(
            f"[{i}/{len(cells)}] {cell.name}" + (f" (sweep ETA {eta.left()})" if eta.done > eta.first else "")
        )
        try:
            if (folder / "checkpoint").exists():
                result = run(resume=folder, progress=progress)
            else:
                result = run(configs[cell.name], output=folder, progress=progress)
        except RunFailedError as err:  # recorded like any cell; the sweep goes on
            note(f"[{i}/{len(cells)}] {cell.name}: {err}")
            result = err.result
        extra = {
            "trainable": result.num_trainable,
            "wall_s": round(wall_time(result.history), 1),
            "bytes": bytes_moved(result.history),
            **counted_costs(result.history),
            "last": final_values(result.history, result.run_dir),
        }
        row = cell_summary(cell, result.config, result.history, spec, extra)
        done.write_text(json.dumps(row, indent=1))
        rows.append(row)
    write_summary(out, spec, rows)
    note(f"summary: {out / 'summary.md'}")
    return rows
