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


def fold_stacked(bundle, params, merged: Mapping, aggregate, r: int, seed: int, t: int, senders: int):
    """FLoRA round end: merge s·mean(B·A) into the base weights, restart the adapters.

    Returns the delta that takes θ to (fresh LoRA, averaged other tensors), the new record of what
    was merged per layer, and the bytes of the stacked factors each client downloads to merge the
    same (senders × r × (in + out) float32 values per module), counted in this round."""
    from fedfm.algorithms.lora import PRODUCT, lora_pairs
    from fedfm.models.state import get_trainable_state

    model = bundle.model
    products = {k.removesuffix(PRODUCT): v for k, v in aggregate.items() if k.endswith(PRODUCT)}
    increments = {p: scaling(model, p) * m for p, m in products.items()}
    merge_into_base(model, increments)
    merged = dict(merged)
    for p, inc in increments.items():
        merged[p] = merged.get(p, 0) + inc
    restart_adapters(model, products, seed, t)
    fresh = get_trainable_state(bundle.trainable)
    delta = {k: v for k, v in aggregate.items() if not k.endswith(PRODUCT)}
    for a_key, b_key in lora_pairs(params).values():
        for key in (a_key, b_key):
            delta[key] = fresh[key] - params[key]
    stacked_values = sum(senders * r * sum(m.shape) for m in products.values())
    return delta, merged, 4 * stacked_values
