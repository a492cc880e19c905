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
``name#idx``, ``name#val`` for sparsification. Each method is a ``Codec`` in the ``CODECS``
registry: a new one registered there is chosen by ``compression.method`` like the built-in ones.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from pydantic import BaseModel, Field

from fedfm.registry import Registry
from fedfm.seeding import torch_generator
from fedfm.transforms.base import Passthrough, transform
from fedfm.types import ClientResult, Encoded, Params, Update

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


# --- the two halves, one codec per registered method ---------------------------------------------


@dataclass(frozen=True)
class Codec:
    """A compression method: the client half (delta, settings, generator, residual) → (payload,
    new residual) and the server half (payload, settings, reference) → dense delta; ``identity``:
    the update travels as it is (``none``)."""

    encode: Callable[..., tuple[Params, Params | None]]
    decode: Callable[..., Params]
    identity: bool = False


CODECS: Registry[Codec] = Registry("compression method")


def compresses(cfg) -> bool:
    """Whether the configured compression method changes the update (``compression.method``)."""
    return not CODECS.get(cfg.compression.method).identity


def _same_encode(delta: Params, cfg, generator, residual) -> tuple[Params, None]:
    return delta, None


def _same_decode(payload: Params, cfg, like) -> Params:
    return dict(payload)


def _cast_encode(dtype, delta: Params, cfg, generator, residual) -> tuple[Params, None]:
    return {k: v.to(dtype) for k, v in delta.items()}, None


def _cast_decode(payload: Params, cfg, like) -> Params:
    return {k: payload[k].to(like[k].dtype) for k in like}


def _quantize_encode(bits: int, delta: Params, cfg, generator, residual) -> tuple[Params, None]:
    payload: Params = {}
    for k, v in delta.items():
        for part, t in quantize(v, bits, cfg.block_size, generator).items():
            payload[f"{k}#{part}"] = t
    return payload, None


def _quantize_decode(bits: int, payload: Params, cfg, like) -> Params:
    parts = ("q", "lo", "hi")
    return {
        k: dequantize({p: payload[f"{k}#{p}"] for p in parts}, bits, cfg.block_size, ref)
        for k, ref in like.items()
    }


def _sparse_encode(pick, feedback_allowed: bool, delta: Params, cfg, generator, residual):
    feedback = feedback_allowed and cfg.error_feedback
    payload: Params = {}
    new_residual: Params = {}
    for k, v in delta.items():
        # a residual of a tensor not sent before (IFCA: another cluster's names) starts at zero
        acc = v + residual[k] if feedback and residual is not None and k in residual else v
        idx, val = pick(acc, cfg, generator)
        payload[f"{k}#idx"], payload[f"{k}#val"] = idx, val
        if feedback:
            new_residual[k] = acc - densify(idx, val, acc)
    return payload, (new_residual if feedback else None)


def _sparse_decode(payload: Params, cfg, like) -> Params:
    return {k: densify(payload[f"{k}#idx"], payload[f"{k}#val"], ref) for k, ref in like.items()}


def _top(acc, cfg, generator):
    return top_k(acc, cfg.ratio)


def _random(acc, cfg, generator):
    return random_k(acc, cfg.ratio, generator)


CODECS.register("none")(Codec(_same_encode, _same_decode, identity=True))


class BlockOptions(BaseModel):
    block_size: int = Field(0, ge=0, description="Values per scale block; 0: one scale per tensor.")


class SparseOptions(BaseModel):
    ratio: float = Field(0.01, gt=0, le=1, description="Share of entries sent.")


class TopkOptions(SparseOptions):
    error_feedback: bool = Field(True, description="Carry the unsent rest into the next round.")


for _name, _dtype in _CASTS.items():
    CODECS.register(_name)(Codec(functools.partial(_cast_encode, _dtype), _cast_decode))
for _name, _bits in (("q8", 8), ("q4", 4)):
    CODECS.register(_name, options=BlockOptions)(
        Codec(functools.partial(_quantize_encode, _bits), functools.partial(_quantize_decode, _bits))
    )
CODECS.register("topk", options=TopkOptions)(
    Codec(functools.partial(_sparse_encode, _top, True), _sparse_decode)
)
CODECS.register("randk", options=SparseOptions)(
    Codec(functools.partial(_sparse_encode, _random, False), _sparse_decode)
)


def encode(
    delta: Params, cfg, generator: torch.Generator, residual: Params | None = None
) -> tuple[Params, Params | None]:
    """Client half: (payload, new residual). The residual is only kept for top-k with error feedback."""
    return CODECS.get(cfg.method).encode(delta, cfg, generator, residual)


def decode(payload: Params, cfg, like: Mapping[str, torch.Tensor]) -> Params:
    """Server half: the dense delta, shaped and typed like the global state."""
    codec = CODECS.get(cfg.method)
    try:
        return codec.decode(payload, cfg, like)
    except KeyError as err:
        raise DecodeError(f"payload lacks {err.args[0]!r} for compression.method = {cfg.method!r}") from None


def serialized_nbytes(params: Mapping[str, torch.Tensor]) -> int:
    """Bytes of ``params`` as a safetensors blob: what travels on the wire."""
    from safetensors.torch import save

    if not params:
        return 0
    return len(save({k: v.contiguous() for k, v in params.items()}))


class Compression(Passthrough):
    """Client half: encode the delta (``Update`` → ``Encoded``), keeping top-k's residual in the
    client's state. Server half: decode every ``Encoded`` against the global state as its sender
    holds it; an undecodable payload is rejected with the reason."""

    name = "compression"

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def client(self, payload, step):
        ctx, client = step.ctx, step.job.client_id
        generator = torch_generator(ctx.seed, ctx.round, client, "compress")
        encoded, residual = encode(payload.delta, self.cfg, generator, step.state.get("residual"))
        if residual is not None:
            step.state["residual"] = residual
        return Encoded(encoded, payload.num_examples, payload.metrics, payload.control_delta)

    def server(self, stream, rnd, reduce):
        return self._decoded(stream, rnd), reduce

    def _decoded(self, stream, rnd):
        for item in stream:
            payload = item.update
            try:
                if not isinstance(payload, Encoded):
                    raise DecodeError(f"expected an encoded update, got a {type(payload).__name__} payload")
                delta = decode(payload.payload, self.cfg, rnd.sent(item.client_id, payload.metrics))
            except Exception as err:  # a malformed payload is rejected, never raised
                rnd.tally.reject(item.client_id, f"undecodable payload ({type(err).__name__}: {err})")
                continue
            update = Update(delta, payload.num_examples, payload.metrics, payload.control_delta)
            yield ClientResult(item.client_id, update=update)


@transform("compression", 40)
def compression(cfg) -> Compression | None:
    return Compression(cfg.compression) if compresses(cfg) else None
