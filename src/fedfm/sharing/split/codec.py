"""Split fine-tuning's cut tensors as they travel: float32, bfloat16, or int8 with a per-row
absmax scale (the simulation's ``roundtrip``, as real bytes), and the most bytes a cut message may
carry. Shared by the client half (``client.py``) and the server half (``server.py``)."""

from __future__ import annotations

import torch

from fedfm.sharing.split.mode import int8_absmax
from fedfm.types import Params
from fedfm.wire import WireError

IGNORE = -100  # label of a token that carries no loss
SLACK = 64 << 10  # bytes a message may carry beyond its tensors (safetensors header)


def encode(t: torch.Tensor, bits: int) -> Params:
    """``t`` as it travels at ``bits`` per value: float32, bfloat16, or int8 with one float32
    absmax scale per row of the last axis (the simulation's ``roundtrip``, as real bytes)."""
    t = t.detach().float().cpu()
    if bits == 32:
        return {"v": t}
    if bits == 16:
        return {"v": t.to(torch.bfloat16)}
    q, scale = int8_absmax(t)
    return {"q": q, "s": scale}


def decode(group: Params | None, bits: int, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """The float32 tensor a received group encodes; ``WireError`` unless it is exactly what
    ``encode`` makes for a tensor of ``shape`` at ``bits``, with finite values."""
    group = group or {}
    want = {32: {"v": torch.float32}, 16: {"v": torch.bfloat16}, 8: {"q": torch.int8, "s": torch.float32}}[
        bits
    ]
    if set(group) != set(want):
        raise WireError(f"{what}: expected tensors {sorted(want)}, got {sorted(group)[:4]}")
    for name, dtype in want.items():
        if group[name].dtype != dtype:
            raise WireError(f"{what}: {name} is {group[name].dtype}, expected {dtype} at {bits} bits")
    main = group.get("v", group.get("q"))
    if tuple(main.shape) != tuple(shape):
        raise WireError(f"{what}: shape {tuple(main.shape)}, expected {tuple(shape)}")
    if bits == 8:
        if tuple(group["s"].shape) != (*shape[:-1], 1):
            raise WireError(f"{what}: scale shape {tuple(group['s'].shape)}, expected {(*shape[:-1], 1)}")
        out = group["q"].float() * group["s"]
    else:
        out = main.float()
    if not torch.isfinite(out).all():
        raise WireError(f"{what} holds non-finite values")
    return out


def activation_limit(batch_size: int, max_length: int, width: int, bits: int = 32) -> int:
    """The most bytes a cut message may carry: activations (or a gradient) of a full batch at
    ``bits`` per value (int8: with a float32 scale per token), the mask and the labels as int64,
    and header slack."""
    tokens = batch_size * max_length
    values = tokens * width * bits // 8 + (4 * tokens if bits == 8 else 0)
    return values + 2 * tokens * 8 + SLACK


# ----------------------------------------------------------------------------------------------
