"""fedfm: federated fine-tuning of foundation models.

import fedfm
result = fedfm.run()                                   # the embedded default experiment
cfg = fedfm.load_config("exp.toml", ["partition.alpha=0.1"])
result = fedfm.run(cfg, output="runs/alpha01")
rows = fedfm.run_sweep("examples/sweeps/init-vs-noniid.toml")            # a grid, one run per cell
fedfm.synthesize(fedfm.SynthSettings(labels=("sport", "tech")), "synth.jsonl")  # FM-made examples

The names below load on first use (PEP 562), so ``import fedfm`` and ``fedfm --help`` do not
import torch; ``fedfm.config`` registers every built-in component (their options join the config
sections) when it is first imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_WHERE = {
    "ClientResult": "fedfm.types",
    "ConfigError": "fedfm.config",
    "ModelError": "fedfm.models.resolve",
    "Params": "fedfm.types",
    "RoundContext": "fedfm.types",
    "RunConfig": "fedfm.config",
    "RunResult": "fedfm.server.driver",
    "SynthSettings": "fedfm.synthetic.generate",
    "Update": "fedfm.types",
    "load_config": "fedfm.config",
    "run": "fedfm.api",
    "run_sweep": "fedfm.api",
    "synthesize": "fedfm.synthetic.generate",
}

__all__ = [
    "ClientResult",
    "ConfigError",
    "ModelError",
    "Params",
    "RoundContext",
    "RunConfig",
    "RunResult",
    "SynthSettings",
    "Update",
    "load_config",
    "run",
    "run_sweep",
    "synthesize",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'fedfm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


if TYPE_CHECKING:  # for type checkers and editors
    from fedfm.api import run, run_sweep
    from fedfm.config import ConfigError, RunConfig, load_config
    from fedfm.models.resolve import ModelError
    from fedfm.server.driver import RunResult
    from fedfm.synthetic.generate import SynthSettings, synthesize
    from fedfm.types import ClientResult, Params, RoundContext, Update
