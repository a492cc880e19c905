"""What a party's training costs, counted while it runs (``training.count_costs``).

- **FLOPs**: torch's own counter (``torch.utils.flop_counter.FlopCounterMode``) over every forward
  and backward of the local training: the matrix products and convolutions, counted from their
  shapes as they run (element-wise operations are not counted; they are a small share here).
- **Memory** (bytes), counted from the live tensors: the model's weights and buffers, the
  trainable parameters' gradients, the optimizer's state, and the largest set of activations one
  micro-batch saves for its backward pass (autograd's saved tensors, each storage counted once).
  Their sum is the training's peak, short of the allocator's overhead and temporaries that are
  freed within an operation. On a CUDA device the allocator's own peak is recorded too.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr())


def model_bytes(model: nn.Module) -> int:
    """Weights and buffers, each storage once (tied embeddings count once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = _key(t)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def optimizer_bytes(optimizer: torch.optim.Optimizer, exclude=frozenset(), only=None) -> int:
    """The optimizer state's bytes, of the parameters not in ``exclude`` (or only of those in
    ``only``), parameters given by ``id``."""
    return tensor_bytes(
        v
        for p, state in optimizer.state.items()
        if id(p) not in exclude and (only is None or id(p) in only)
        for v in state.values()
        if torch.is_tensor(v)
    )


class CostMeter:
    """Counts one party's training: ``with meter.counting():`` around the steps, ``meter.step()``
    after each micro-batch's backward, then ``meter.record(optimizer)``."""

    def __init__(self, model: nn.Module, trainable, parts=None) -> None:
        """``parts`` (split fine-tuning): an object with ``side`` ("client" or "server": whose part
        the forward pass is in) and ``server_modules``; the record then gives the client's costs and
        the server's apart (``server_*``)."""
        self.model, self.trainable, self.parts = model, trainable, parts
        self.flops = 0
        self.server_flops = 0
        self.peak_activations = 0
        self.peak_server_activations = 0
        self._saved: dict = {}
        # weights autograd saves (a linear layer's, for the gradient of its input) are counted as weights
        self._weights = {_key(t) for t in [*model.parameters(), *model.buffers()]}
        self._device = next(iter(trainable.values())).device if trainable else torch.device("cpu")

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            key = _key(t)
            if key not in self._weights:
                side = self.parts.side if self.parts is not None else "client"
                self._saved[key] = (side, t.untyped_storage().nbytes())
        return t

    def step(self) -> None:
        """A micro-batch's backward is done: its saved activations are freed."""
        mine = sum(n for side, n in self._saved.values() if side == "client")
        theirs = sum(n for side, n in self._saved.values() if side == "server")
        self.peak_activations = max(self.peak_activations, mine)
        self.peak_server_activations = max(self.peak_server_activations, theirs)
        self._saved.clear()

    @contextlib.contextmanager
    def counting(self):
        from torch.utils.flop_counter import FlopCounterMode

        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)
        counter = FlopCounterMode(display=False)
        with counter, torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self
        total = counter.get_total_flops()
        server = 0
        if self.parts is not None:  # FLOPs per module, forward and backward, as torch attributes them
            counts = counter.get_flop_counts()
            root = type(self.model).__name__
            names = {id(m): f"{root}.{n}" for n, m in self.model.named_modules() if n}
            server = sum(sum(counts.get(names[id(m)], {}).values()) for m in self.parts.server_modules)
        self.flops += total - server
        self.server_flops += server
        self.step()

    def record(self, optimizer: torch.optim.Optimizer | None = None) -> dict:
        theirs = self.parts.server_parameters() if self.parts is not None else set()
        server_weights = tensor_bytes(p for p in self.model.parameters() if id(p) in theirs)
        weights = model_bytes(self.model) - server_weights
        trained = [p for p in self.trainable.values() if p.requires_grad]
        grads = tensor_bytes(p for p in trained if id(p) not in theirs)
        state = optimizer_bytes(optimizer, exclude=theirs) if optimizer is not None else 0
        record = {
            "flops": float(self.flops),
            "memory_weights_bytes": float(weights),
            "memory_activations_bytes": float(self.peak_activations),
            "memory_optimizer_bytes": float(grads + state),  # gradients and the optimizer's moments
            "peak_memory_bytes": float(weights + grads + state + self.peak_activations),
        }
        if self.parts is not None:  # what the server spends on this client's part
            server = server_weights + tensor_bytes(p for p in trained if id(p) in theirs)
            server += optimizer_bytes(optimizer, only=theirs) if optimizer is not None else 0
            record.update(
                server_flops=float(self.server_flops),
                server_memory_activations_bytes=float(self.peak_server_activations),
                server_peak_memory_bytes=float(server + self.peak_server_activations),
            )
        if self._device.type == "cuda":
            record["cuda_peak_memory_bytes"] = float(torch.cuda.max_memory_allocated(self._device))
        return record


def round_costs(client_records: list[dict]) -> dict:
    """The round record's summary of its clients' counted costs: mean FLOPs per client, the
    largest client peak memory and weights held, and under split learning the server's mean FLOPs
    for a client's part (none when costs were not counted)."""
    counted = [r for r in client_records if "flops" in r]
    if not counted:
        return {}
    summary = {
        "client_flops_mean": sum(r["flops"] for r in counted) / len(counted),
        "client_peak_memory_bytes": max(r["peak_memory_bytes"] for r in counted),
    }
    if all("memory_weights_bytes" in r for r in counted):
        summary["client_weights_bytes_max"] = max(r["memory_weights_bytes"] for r in counted)
    if all("server_flops" in r for r in counted):
        summary["server_flops_mean"] = sum(r["server_flops"] for r in counted) / len(counted)
    return summary
