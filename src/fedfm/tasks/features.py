"""The frozen backbone's features: what a classifier's head reads (FedPFT fits them)."""

from __future__ import annotations

import torch
from torch import nn

from fedfm.models.build import HEAD_MODULES


def head_module(model: nn.Module) -> nn.Module:
    """The classification head (``classifier`` or ``score``; PEFT's wrapper of it included)."""
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in HEAD_MODULES:
            return module
    raise ValueError(f"the model has no classification head named {HEAD_MODULES}")


@torch.no_grad()
def backbone_features(model: nn.Module, **inputs) -> torch.Tensor:
    """``[B, d]``: the input of the head for one batch, in eval mode (no dropout), float32 on CPU."""
    captured: list[torch.Tensor] = []
    hook = head_module(model).register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    was_training = model.training
    model.eval()
    try:
        model(**inputs)
    finally:
        hook.remove()
        model.train(was_training)
    x = captured[0]
    if x.dim() > 2 and x[0, 0].numel() != 1:  # [B, C, 1, 1] is one vector; [B, T, d] is not
        raise ValueError(
            f"the head reads {tuple(x.shape[1:])} per example (token states, as RoBERTa's does); "
            "FedPFT fits one feature vector per example"
        )
    return x.reshape(len(x), -1).float().cpu()
