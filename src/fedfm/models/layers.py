"""A transformer's stack of layers: find it, keep some of its layers, adapt or train only some.

``model.layers`` keeps a subset of the foundation model's layers (the rest are dropped: an
offsite-tuning emulator is the FM with its middle thinned); ``peft.layers`` restricts LoRA (or,
with ``peft.method = "full"``, training) to some layers. Both name layers by their index in the
foundation model; in a model that keeps only some layers, a kept layer sits at another position,
and ``rename_layers`` maps a payload's keys from positions back to the FM's indices.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from torch import nn

from fedfm.models.resolve import ModelError


def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted path, module list) of the model's stack of transformer layers: the longest
    ``nn.ModuleList`` whose members are all of one class (BERT's ``encoder.layer``, Llama's
    ``model.layers``, GPT-2's ``transformer.h``)."""
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(x) for x in m}) == 1
    ]
    if not found:
        raise ModelError(f"{type(model).__name__} has no stack of identical layers (an nn.ModuleList)")
    return max(found, key=lambda item: len(item[1]))


def check_layers(indices: Sequence[int], num_layers: int, field: str) -> list[int]:
    """The indices as a list, or a ``ModelError`` naming ``field``: increasing, in range."""
    out = [int(i) for i in indices]
    if not out:
        raise ModelError(f"{field} is empty")
    if any(b <= a for a, b in zip(out, out[1:], strict=False)):
        raise ModelError(f"{field} = {out} must be strictly increasing")
    if out[0] < 0 or out[-1] >= num_layers:
        raise ModelError(f"{field} = {out}: the model has layers 0..{num_layers - 1}")
    return out


def keep_layers(model: nn.Module, kept: Sequence[int]) -> None:
    """Drop every layer not in ``kept`` (FM indices); the config and the layers' own indices
    (the key-value cache's ``layer_idx``) follow the new numbering."""
    path, layers = layer_list(model)
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, nn.ModuleList([layers[i] for i in kept]))
    for position, layer in enumerate(getattr(parent, leaf)):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    config = getattr(model, "config", None)
    if config is not None:
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = [config.layer_types[i] for i in kept]
        config.num_hidden_layers = len(kept)


def positions(kept: Sequence[int], wanted: Sequence[int], field: str) -> list[int]:
    """Where each FM layer in ``wanted`` sits among the ``kept`` layers."""
    missing = sorted(set(wanted) - set(kept))
    if missing:
        raise ModelError(f"{field} names layers {missing} that model.layers = {list(kept)} drops")
    return [list(kept).index(i) for i in wanted]


def rename_layers(state: Mapping, path: str, mapping: Mapping[int, int]) -> dict:
    """``state`` with the layer index after ``<path>.`` in every key replaced by ``mapping[index]``
    (keys of other layers' or no layer's tensors unchanged)."""
    pattern = re.compile(rf"(^|\.)({re.escape(path)})\.(\d+)\.")

    def rename(key: str) -> str:
        return pattern.sub(lambda m: f"{m[1]}{m[2]}.{mapping.get(int(m[3]), int(m[3]))}.", key, count=1)

    return {rename(k): v for k, v in state.items()}


def train_only_layers(model: nn.Module, trained: Sequence[int], head_modules: Sequence[str]) -> None:
    """``peft.method = "full"`` with ``peft.layers``: every weight of those layers (positions in the
    model) and of the head trains; embeddings and the other layers stay frozen."""
    path, _ = layer_list(model)
    prefixes = tuple(f"{path}.{i}." for i in trained)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes) or name.split(".")[0] in head_modules)
