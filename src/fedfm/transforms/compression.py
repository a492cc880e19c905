"""Update compression: a client half (``encode``) and a server half (``decode``) per method.

The encoded payload is again named tensors (``Params``) so it serializes like any update and its
size on the wire is measured, not estimated. Methods (``compression.method``):

- ``fp16`` / ``bf16``: cast every tensor (2 bytes per value instead of 4).
- ``q8`` / ``q4``: unbiased stochastic quantization to 2^b − 1 levels between the minimum and
  maximum of each tensor (or of each block of ``block_size`` values): a value between two levels
  rounds up with probability equal to its distance from the lower one, so E[decode(encode(x))] = x
  (Alistarh et al., 2017, "QSGD"; Suresh et al., 2017). 4-bit codes are packed two per byte.
- ``topk``: keep the ``ratio`` share of entries with the largest magnitude per tensor; with
  ``error_feedback`` the unsent rest is added to the next round's delta (Stich et al., 2018;
  Karimireddy et al., 2019). The residual is client state, kept by the engine and checkpointed.
- ``randk``: keep a seeded random ``ratio`` share of entries, scaled by n/k so the decoded update
  is unbiased.

Keys of the payload: ``name`` for casts; ``name#q``, ``name#lo``, ``name#hi`` for quantization;
``name#idx``, ``name#val`` for sparsification.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedfm.types import Params

_CASTS = {"fp16": torch.float16, "bf16": torch.bfloat16}


class DecodeError(ValueError):
    """A payload that does not decode to the expected tensors."""


# --- stochastic quantization -------------------------------------------------------------------


def _blocks(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, int]:
    flat = x.reshape(-1).to(torch.float32)
    n = flat.numel()
    size = n if block_size <= 0 else block_size
    pad = (-n) % size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.reshape(-1, size), n


def quantize(
    x: torch.Tensor, bits: int, block_size: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Unbiased stochastic quantization of ``x`` to ``bits`` bits with per-block min/max scales."""
    blocks, _ = _blocks(x, block_size)
    lo = blocks.min(dim=1, keepdim=True).values
    hi = blocks.max(dim=1, keepdim=True).values
    levels = 2**bits - 1
    span = (hi - lo).clamp_min(1e-30)
    u = (blocks - lo) / span * levels
    floor = u.floor()
    q = floor + (torch.rand(u.shape, generator=generator) < (u - floor)).float()
    codes = q.clamp(0, levels).to(torch.uint8).reshape(-1)
    if bits == 4:
        codes = pack_nibbles(codes)
    return {"q": codes, "lo": lo.reshape(-1), "hi": hi.reshape(-1)}


def dequantize(
    parts: Mapping[str, torch.Tensor], bits: int, block_size: int, like: torch.Tensor
) -> torch.Tensor:
    n = like.numel()
    size = n if block_size <= 0 else block_size
    num_blocks = math.ceil(n / size) if n else 0
    codes = parts["q"]
    if bits == 4:
        codes = unpack_nibbles(codes, num_blocks * size)
    if codes.numel() != num_blocks * size or parts["lo"].numel() != num_blocks:
        raise DecodeError(f"quantized payload has {codes.numel()} codes for a tensor of {n} values")
    q = codes.to(torch.float32).reshape(num_blocks, size)
    lo, hi = parts["lo"].reshape(-1, 1).float(), parts["hi"].reshape(-1, 1).float()
    x = lo + q / (2**bits - 1) * (hi - lo)
    return x.reshape(-1)[:n].reshape(like.shape).to(like.dtype)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte (an odd count gets a zero nibble)."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.reshape(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles(packed: torch.Tensor, count: int) -> torch.Tensor:
    out = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)
    return out[:count]


# --- sparsification ------------------------------------------------------------------------------


def top_k(x: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (int32) and values of the ``ceil(ratio · n)`` largest-magnitude entries."""
    flat = x.reshape(-1)
    k = max(1, math.ceil(ratio * flat.numel()))
    idx = torch.topk(flat.abs(), k, sorted=False).indices
    idx, _ = torch.sort(idx)
    return idx.to(torch.int32), flat[idx]


def random_k(x: torch.Tensor, ratio: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random ``ceil(ratio · n)`` entries, scaled by n/k (unbiased)."""
    flat = x.reshape(-1)
    n = flat.numel()
    k = max(1, math.ceil(ratio * n))
    idx, _ = torch.sort(torch.randperm(n, generator=generator)[:k])
    return idx.to(torch.int32), flat[idx] * (n / k)


def densify(idx: torch.Tensor, val: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    n = like.numel()
    if idx.dtype not in (torch.int32, torch.int64) or idx.numel() != val.numel():
        raise DecodeError("sparse payload: indices and values do not match")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise DecodeError(f"sparse payload: an index is outside a tensor of {n} values")
    out = torch.zeros(n, dtype=like.dtype)
    out[idx.long()] = val.to(like.dtype)
    return out.reshape(like.shape)


# --- the two halves -------------------------------------------------------------------------------


def encode(
    delta: Params, cfg, generator: torch.Generator, residual: Params | None = None
) -> tuple[Params, Params | None]:
    """Client half: (payload, new residual). The residual is only kept for top-k with error feedback."""
    method = cfg.method
    if method == "none":
        return delta, None
    if method in _CASTS:
        return {k: v.to(_CASTS[method]) for k, v in delta.items()}, None
    payload: Params = {}
    if method in ("q8", "q4"):
        bits = 8 if method == "q8" else 4
        for k, v in delta.items():
            for part, t in quantize(v, bits, cfg.block_size, generator).items():
                payload[f"{k}#{part}"] = t
        return payload, None
    feedback = method == "topk" and cfg.error_feedback
    new_residual: Params = {}
    for k, v in delta.items():
        acc = v + residual[k] if feedback and residual is not None else v
        if method == "topk":
            idx, val = top_k(acc, cfg.ratio)
        else:
            idx, val = random_k(acc, cfg.ratio, generator)
        payload[f"{k}#idx"], payload[f"{k}#val"] = idx, val
        if feedback:
            new_residual[k] = acc - densify(idx, val, acc)
    return payload, (new_residual if feedback else None)


def decode(payload: Params, cfg, like: Mapping[str, torch.Tensor]) -> Params:
    """Server half: the dense delta, shaped and typed like the global state."""
    method = cfg.method
    try:
        if method == "none":
            return dict(payload)
        if method in _CASTS:
            return {k: payload[k].to(like[k].dtype) for k in like}
        if method in ("q8", "q4"):
            bits = 8 if method == "q8" else 4
            return {
                k: dequantize({p: payload[f"{k}#{p}"] for p in ("q", "lo", "hi")}, bits, cfg.block_size, ref)
                for k, ref in like.items()
            }
        return {k: densify(payload[f"{k}#idx"], payload[f"{k}#val"], ref) for k, ref in like.items()}
    except KeyError as err:
        raise DecodeError(f"payload lacks {err.args[0]!r} for compression.method = {method!r}") from None


def serialized_nbytes(params: Mapping[str, torch.Tensor]) -> int:
    """Bytes of ``params`` as a safetensors blob: what travels on the wire."""
    from safetensors.torch import save

    if not params:
        return 0
    return len(save({k: v.contiguous() for k, v in params.items()}))
