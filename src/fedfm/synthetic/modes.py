"""Synthetic-data modes (``synthetic.mode``): what each does, looked up by name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedfm.registry import Registry


@dataclass(frozen=True)
class SyntheticMode:
    """``loads``: reads ``synthetic.path``; ``augment``: clients get synthetic rows beside their
    own; ``warmup``: the server trains on them before round 1; ``replaces``: synthetic data alone
    (the synthetic-only baseline)."""

    loads: bool = True
    augment: bool = False
    warmup: bool = False
    replaces: bool = False


SYNTHETIC_MODES: Registry[SyntheticMode] = Registry("synthetic mode")
SYNTHETIC_MODES.register("none")(SyntheticMode(loads=False))
SYNTHETIC_MODES.register("warmup")(SyntheticMode(warmup=True))
SYNTHETIC_MODES.register("augment")(SyntheticMode(augment=True))
SYNTHETIC_MODES.register("both")(SyntheticMode(augment=True, warmup=True))
SYNTHETIC_MODES.register("only")(SyntheticMode(replaces=True))


def synthetic_mode(cfg) -> SyntheticMode:
    return SYNTHETIC_MODES.get(cfg.synthetic.mode)


def check_synthetic(cfg) -> None:
    sy = cfg.synthetic
    if not synthetic_mode(cfg).loads:
        return
    if not sy.path:
        raise ValueError(
            f"synthetic.mode = {sy.mode!r} needs synthetic.path (a JSONL file from `fedfm synth`)"
        )
    if not Path(sy.path).expanduser().is_file():
        raise ValueError(f"synthetic.path {sy.path!r} is not a file")
