"""fedfm: federated fine-tuning of foundation models.

import fedfm
result = fedfm.run()                                   # the embedded default experiment
cfg = fedfm.load_config("exp.toml", ["partition.alpha=0.1"])
result = fedfm.run(cfg, output="runs/alpha01")
rows = fedfm.run_sweep("examples/sweeps/init-vs-noniid.toml")            # a grid, one run per cell
fedfm.synthesize(fedfm.SynthSettings(labels=("sport", "tech")), "synth.jsonl")  # FM-made examples
"""

from fedfm.api import run, run_sweep
from fedfm.config import ConfigError, RunConfig, load_config
from fedfm.models.resolve import ModelError
from fedfm.registry import load_components
from fedfm.server.driver import RunResult
from fedfm.synthetic.generate import SynthSettings, synthesize
from fedfm.types import ClientResult, Params, RoundContext, Update

__version__ = "0.1.0"

load_components()  # every built-in component registered, its options in the config sections

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
