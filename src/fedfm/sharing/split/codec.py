"""Split fine-tuning's cut tensors as they travel: float32, bfloat16, or int8 with a per-row
absmax scale (``roundtrip`` in a simulation; ``encode``/``decode`` as real bytes), the check of a
received gradient, and the most bytes a cut message may carry. Shared by the in-process cut
(``mode.py``), the client half (``client.py``) and the server half (``server.py``)."""

from __future__ import annotations

import torch

from fedfm.types import Params
from fedfm.wire import WireError

IGNORE = -100  # label of a token that carries no loss
SLACK = 64 << 10  # bytes a message may carry beyond its tensors (safetensors header)


class CutError(ValueError):
    """What arrived at the cut cannot be used (non-finite, too large)."""


def roundtrip(t: torch.Tensor, bits: int) -> tuple[torch.Tensor, int]:
    """``t`` as the other side receives it after encoding to ``bits`` per value, and the bytes sent.
    32: as is; 16: bfloat16; 8: int8 with one absmax scale (float32) per row of the last axis."""
    if bits == 32:
        return t, t.numel() * 4
    if bits == 16:
        return t.to(torch.bfloat16).to(t.dtype), t.numel() * 2
    q, scale = int8_absmax(t)
    rows = t.numel() // max(t.shape[-1], 1)
    return q.to(t.dtype) * scale, t.numel() + 4 * rows


def int8_absmax(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float scale per row of the last axis) with t ≈ values · scale."""
    scale = t.detach().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0
    return torch.clamp(torch.round(t.detach() / scale), -127, 127).to(torch.int8), scale


def check_cut_gradient(g: torch.Tensor, max_norm: float | None, what: str) -> None:
    if not torch.isfinite(g).all():
        raise CutError(f"{what} is not finite")
    if max_norm is not None:
        norm = float(g.norm())
        if norm > max_norm:
            raise CutError(f"{what} has norm {norm:.3g} > split.max_cut_grad_norm = {max_norm:g}")


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
