"""Where each kind of pluggable component is registered, looked up by kind name.

Each component module owns its registry and registers its members with a decorator; this
index only says which module holds which kind, so adding a component edits no list here.
"""

from __future__ import annotations

import importlib

from fedfm.registry import Registry

_KINDS = {
    "aggregator": ("fedfm.algorithms.aggregators", "AGGREGATORS"),
    "server optimizer": ("fedfm.algorithms.server_optimizers", "SERVER_OPTIMIZERS"),
    "objective": ("fedfm.algorithms.objectives", "OBJECTIVES"),
    "partitioner": ("fedfm.data.partition", "PARTITIONERS"),
    "engine": ("fedfm.engines", "ENGINES"),
    "dataset": ("fedfm.data.sources", "DATASETS"),
    "model": ("fedfm.models.resolve", "MODELS"),
    "compression method": ("fedfm.transforms.compression", "CODECS"),
    "attack": ("fedfm.attacks", "ATTACKS"),
    "task": ("fedfm.tasks", "TASKS"),
    "DP mode": ("fedfm.privacy.guarantees", "DP_MODES"),
    "LoRA aggregation mode": ("fedfm.algorithms.lora", "LORA_AGGREGATION"),
    "synthetic mode": ("fedfm.synthetic.modes", "SYNTHETIC_MODES"),
    "transform": ("fedfm.transforms", "TRANSFORMS"),
    "protocol": ("fedfm.protocols", "PROTOCOLS"),
    "sharing mode": ("fedfm.sharing", "SHARING_MODES"),
    "personalization method": ("fedfm.algorithms.personal", "PERSONAL_PARTS"),
}


def registry_for(kind: str) -> Registry:
    module, attr = _KINDS[kind]
    return getattr(importlib.import_module(module), attr)
