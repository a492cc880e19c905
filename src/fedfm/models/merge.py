"""FLoRA-style rounds: merge the stacked LoRA product into the base weights, restart the adapters.

Used by ``strategy.lora_aggregation = "stack"``. The merged part lives in the shared base model
and in the server state (``ServerState.merged``), so a resumed run merges it again before going on.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fedfm.seeding import seed_torch


def lora_layer(model: nn.Module, prefix: str) -> nn.Module:
    """The PEFT LoRA layer a payload prefix (``...attention.self.query``) names."""
    layer = model.get_submodule(prefix)
    if not hasattr(layer, "base_layer") or not hasattr(layer, "scaling"):
        raise ValueError(f"{prefix!r} is not a LoRA layer")
    return layer


def scaling(model: nn.Module, prefix: str) -> float:
    return float(lora_layer(model, prefix).scaling["default"])


@torch.no_grad()
def merge_into_base(model: nn.Module, merged: Mapping[str, torch.Tensor]) -> None:
    """Add each dense ΔW (already scaled) to its layer's frozen base weight."""
    for prefix, delta_w in merged.items():
        weight = lora_layer(model, prefix).base_layer.weight
        weight += delta_w.to(weight.device, weight.dtype)


@torch.no_grad()
def restart_adapters(model: nn.Module, prefixes, seed: int, round_: int) -> None:
    """Fresh LoRA factors (PEFT's own initialisation: A random, B zero), seeded by the round."""
    seed_torch(seed, round_, "lora-restart")
    for prefix in prefixes:
        lora_layer(model, prefix).reset_lora_parameters("default", True)
