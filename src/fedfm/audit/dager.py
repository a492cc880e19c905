"""Token recovery from a weight update by the span test (DAGER, Petrov et al. 2024), on a real model.

Stage 1: the first linear layer the input meets (layer 0's query projection, or its LoRA A
factor) has an update whose row space holds the inputs that produced it. Every vocabulary token v
is run through the model as far as that layer — at every position p up to the run's length, so
that models with learned absolute positions (BERT, MiniLM) give one candidate input x(v, p) per
(token, position) — and (v, p) is recovered when x(v, p) lies within ``tau`` of the span. With
absolute positions this orders the text too (at each position the closest token). With rotary
positions (Llama, SmolLM2) layer 0's input carries no position, so stage 1 gives the set of tokens
only, and stage 2 orders them: DAGER's greedy extension through the next layer, whose inputs do
depend on the prefix (causal models only) — a sequence grows by the candidate whose next-layer
input at the new position is closest to that layer's update span.

What the attacker is assumed to know, as a curious server does: the model it sent, the update it
received, and the configuration (batch size, length), which bounds the number of inputs
(``max_rank``, so that under noise only the strongest directions count).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from fedfm.audit.span import row_space, span_distance


class _Stop(Exception):
    """Raised by a forward hook once it holds what it came for: the rest of the forward is skipped."""


def owner(model: nn.Module, parameter: torch.Tensor) -> nn.Linear | None:
    """The linear module whose ``weight`` is ``parameter`` (None when it is no linear weight)."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight is parameter:
            return module
    return None


def linears_in_call_order(model: nn.Module, trainable: dict, inputs: dict) -> list[tuple[str, nn.Linear]]:
    """The trainable linear weights (payload key, module), in the order one forward calls them."""
    modules = {}
    for key, parameter in trainable.items():
        module = owner(model, parameter)
        if module is not None and parameter.ndim == 2:
            modules[id(module)] = (key, module)
    order: list[tuple[str, nn.Linear]] = []

    def hook(entry):
        return lambda module, args: None if entry in order else order.append(entry)

    handles = [entry[1].register_forward_pre_hook(hook(entry)) for entry in modules.values()]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return order


def inputs_at(model: nn.Module, module: nn.Module, inputs: dict) -> torch.Tensor:
    """What ``module`` receives when ``model`` runs on ``inputs`` (batch, length, width); the
    forward stops there."""
    held = {}

    def grab(mod, args):
        held["x"] = args[0].detach()
        raise _Stop

    handle = module.register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            model(**inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return held["x"]


@dataclass
class Recovery:
    """What stage 1 found: per position, the closest token and its distance; the tokens within
    ``tau`` anywhere; whether inputs depended on position (then ``ordered`` is the text)."""

    tokens: set[int]
    ordered: list[int]
    positional: bool
    rank: int
    width: int
    best_distance: list[float] = field(default_factory=list)


def _model_inputs(ids: torch.Tensor, encoder: bool) -> dict:
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if encoder:
        inputs["token_type_ids"] = torch.zeros_like(ids)
    return inputs


def recover_tokens(
    model: nn.Module,
    module: nn.Module,
    update: torch.Tensor,
    vocab_size: int,
    length: int,
    max_rank: int,
    tau: float = 0.05,
    skip: frozenset[int] = frozenset(),
    encoder: bool = True,
    chunk: int = 256,
) -> Recovery:
    """Stage 1 over every token id below ``vocab_size`` (less ``skip``, e.g. padding) at positions
    0 … ``length`` − 1, against ``update`` (the module's weight update, out × in)."""
    basis = row_space(update, max_rank=max_rank)
    device = next(model.parameters()).device
    best = torch.full((length,), float("inf"), dtype=torch.float64)
    best_token = torch.full((length,), -1, dtype=torch.long)
    found: set[int] = set()
    positional = False
    was_training = model.training
    model.eval()
    try:
        width = length  # positions swept: all of them while inputs depend on position, else one
        for start in range(0, vocab_size, chunk):
            ids = torch.arange(start, min(start + chunk, vocab_size))
            seq = ids[:, None].expand(-1, width).to(device)
            x = inputs_at(model, module, _model_inputs(seq, encoder)).cpu()
            if start == 0 and length > 1:
                positional = not torch.allclose(x[:, 0], x[:, 1], rtol=1e-5, atol=1e-6)
                width = length if positional else 1
                x = x[:, :width]
            dist = span_distance(x.reshape(-1, x.shape[-1]), basis).reshape(len(ids), width)
            dist = dist.expand(-1, length)  # rotary positions: one distance holds at every position
            dist = dist.clone()
            for t in skip:
                if start <= t < start + len(ids):
                    dist[t - start] = float("inf")
            low, arg = dist.min(dim=0)
            better = low < best
            best = torch.where(better, low, best)
            best_token = torch.where(better, ids[arg], best_token)
            hits = (dist < tau).any(dim=1)
            found.update(int(i) for i in ids[hits])
    finally:
        model.train(was_training)
    ordered = [int(t) for t, d in zip(best_token, best, strict=True) if d < tau] if positional else []
    return Recovery(found, ordered, positional, len(basis), update.shape[1], [float(d) for d in best])


def extend_causal(
    model: nn.Module,
    module: nn.Module,
    update: torch.Tensor,
    tokens: set[int],
    length: int,
    max_rank: int,
    tau: float = 0.05,
    start: list[int] | None = None,
) -> list[int]:
    """Stage 2 (causal models): grow one sequence from ``start`` (e.g. the BOS token) by the
    candidate of ``tokens`` whose input to ``module`` (a layer past the first) at the new position
    lies closest to ``update``'s span, while that distance stays under ``tau``."""
    basis = row_space(update, max_rank=max_rank)
    device = next(model.parameters()).device
    sequence = list(start or [])
    candidates = torch.tensor(sorted(tokens), dtype=torch.long)
    if not len(candidates):
        return sequence
    was_training = model.training
    model.eval()
    try:
        while len(sequence) < length:
            prefix = torch.tensor(sequence, dtype=torch.long)[None].expand(len(candidates), -1)
            ids = torch.cat([prefix, candidates[:, None]], dim=1).to(device)
            x = inputs_at(model, module, _model_inputs(ids, encoder=False))[:, -1].cpu()
            dist = span_distance(x, basis)
            low, arg = dist.min(dim=0)
            if float(low) >= tau:
                break
            sequence.append(int(candidates[arg]))
    finally:
        model.train(was_training)
    return sequence
