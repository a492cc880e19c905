"""The Python entry points: ``run`` an experiment, ``load_config`` from TOML plus overrides."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from fedfm.config import ConfigError, RunConfig, load_config, make_config
from fedfm.loop import RunResult


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

    cfg, run_dir = prepare_run(config, output=output, resume=resume, overrides=overrides)
    from fedfm.sharing import SHARING_MODES

    # a sharing mode with its own loop (knowledge transfer) runs as that protocol
    protocol = PROTOCOLS.get(SHARING_MODES.get(cfg.sharing.mode).protocol or cfg.run.protocol)
    return protocol.run(cfg, run_dir, progress=progress, callbacks=callbacks, resume=resume is not None)


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
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(cfg.to_toml())
    return cfg, run_dir
