"""Get and set the trainable state: the named tensors that travel between server and clients.

Keys are those of PEFT's ``get_peft_model_state_dict`` (adapter name removed), so a payload is
exactly what a PEFT adapter file holds; models without PEFT (``head``, ``full``) use parameter names.
The payload lives on the CPU in float32 whatever the training device.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fedfm.types import Params


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Payload key → the live parameter it reads from and writes to."""
    live = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not hasattr(model, "peft_config"):
        return live
    from peft import get_peft_model_state_dict

    by_ptr = {p.data_ptr(): n for n, p in live.items()}
    keyed: dict[str, nn.Parameter] = {}
    unmatched_keys: list[tuple[str, torch.Tensor]] = []
    for key, tensor in get_peft_model_state_dict(model).items():
        name = by_ptr.get(tensor.data_ptr())
        if name is None:
            unmatched_keys.append((key, tensor))
        elif name not in keyed.values():
            keyed[key] = live[name]
    # Tensors PEFT computes on save (prompt tuning's "prompt_embeddings") match by shape.
    left = {n: p for n, p in live.items() if all(p is not q for q in keyed.values())}
    for key, tensor in unmatched_keys:
        same = [n for n, p in left.items() if p.shape == tensor.shape]
        if len(same) == 1:
            keyed[key] = left.pop(same[0])
    for n, p in left.items():  # anything else trainable still travels, under its own name
        keyed[n] = p
    return keyed


def get_trainable_state(trainable: Mapping[str, nn.Parameter]) -> Params:
    return {k: p.detach().to("cpu", torch.float32, copy=True) for k, p in trainable.items()}


@torch.no_grad()
def set_trainable_state(trainable: Mapping[str, nn.Parameter], params: Mapping[str, torch.Tensor]) -> None:
    missing = set(trainable) - set(params)
    if missing:
        raise KeyError(f"state lacks trainable tensors: {sorted(missing)[:5]}")
    for k, p in trainable.items():
        p.copy_(params[k])
