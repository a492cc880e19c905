"""What every results file says about how and where it was measured."""

from __future__ import annotations

import os
import platform


def stamp(name: str, config: dict, seeds: list[int], **machine) -> dict:
    """The head of a results file: the benchmark, its config and seeds, fedfm's version and the
    machine (``machine`` adds or overrides fields, e.g. the torch threads)."""
    import torch

    import fedfm

    return {
        "benchmark": name,
        "config": config,
        "seeds": seeds,
        "fedfm_version": fedfm.__version__,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            **machine,
        },
    }
