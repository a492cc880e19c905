"""What a client feeds to secure aggregation: its update as one vector of field elements.

Secure aggregation sums integers mod 2^bits, so a client's contribution is fixed-point encoded:
each delta entry clipped to [−c, c] and stochastically rounded (unbiased) to a multiple of
step = c / 2^(q − 1), then multiplied by the client's integer weight w (exact in the ring). The
vector also carries the scalars the server needs and may only learn in sum: the weight w, a
count of 1, the training loss × w, and DP's clipped-count indicator b_k. Signed values wrap mod
2^bits and are read back centred, so the modulus is sized for the largest possible |sum|.

    vector = [ w·q(Δ) | q(control) | w | 1 | w·loss | b ]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedfm.types import Params

SCALARS = ("weight", "count", "loss", "unclipped")
_SCALAR_STEP = 2.0**-16  # fixed point of the loss and indicator entries
_MAX_LOSS = 64.0


@dataclass(frozen=True)
class Layout:
    """Where each tensor sits in the vector, and the fixed-point settings; public to all parties."""

    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    control: bool
    clip_range: float
    quantization_bits: int
    max_weight: int
    max_clients: int

    @classmethod
    def for_params(cls, reference: Params, control: bool, **settings) -> Layout:
        shapes = tuple((k, tuple(v.shape)) for k, v in reference.items())
        return cls(shapes, control, **settings)

    @property
    def tensor_length(self) -> int:
        return sum(math.prod(s) for _, s in self.shapes)

    @property
    def length(self) -> int:
        return self.tensor_length * (2 if self.control else 1) + len(SCALARS)

    @property
    def step(self) -> float:
        return self.clip_range / 2 ** (self.quantization_bits - 1)

    @property
    def bits(self) -> int:
        """Modulus bits: room for the largest |sum| of any entry, twice (sign), plus a margin."""
        delta_max = self.max_clients * self.max_weight * 2 ** (self.quantization_bits - 1)
        loss_max = self.max_clients * self.max_weight * _MAX_LOSS / _SCALAR_STEP
        largest = max(delta_max, loss_max, 2 ** (self.quantization_bits - 1) * self.max_clients)
        bits = math.ceil(math.log2(largest)) + 2
        if bits > 62:
            raise ValueError(
                f"secure aggregation would need a {bits}-bit field (max weight {self.max_weight} × "
                f"{self.max_clients} clients); lower secagg.quantization_bits or use uniform weighting"
            )
        return max(bits, 8)


def _fixed(x: torch.Tensor, step: float, generator: torch.Generator) -> torch.Tensor:
    """Unbiased stochastic rounding of x / step to int64."""
    scaled = x.double() / step
    low = torch.floor(scaled)
    up = torch.rand(scaled.shape, generator=generator, dtype=torch.float64) < (scaled - low)
    return (low + up.double()).to(torch.int64)


def _flat(params: Params, layout: Layout) -> torch.Tensor:
    return torch.cat([params[k].reshape(-1).double() for k, _ in layout.shapes])


def pack(
    layout: Layout,
    delta: Params,
    weight: int,
    loss: float,
    generator: torch.Generator,
    control: Params | None = None,
    unclipped: float = 0.0,
) -> torch.Tensor:
    """The client's integer vector mod 2^bits (weight clamped to [1, max_weight])."""
    weight = max(1, min(int(weight), layout.max_weight))
    c = layout.clip_range
    parts = [weight * _fixed(_flat(delta, layout).clamp(-c, c), layout.step, generator)]
    if layout.control:
        if control is None:
            raise ValueError("this round's layout carries control variates; none given")
        parts.append(_fixed(_flat(control, layout).clamp(-c, c), layout.step, generator))
    loss = min(max(float(loss), 0.0), _MAX_LOSS) if math.isfinite(loss) else _MAX_LOSS
    scalars = [weight, 1, weight * round(loss / _SCALAR_STEP), round(unclipped / _SCALAR_STEP)]
    parts.append(torch.tensor(scalars, dtype=torch.int64))
    return torch.cat(parts) & ((1 << layout.bits) - 1)


@dataclass(frozen=True)
class Sums:
    """What the server learns: Σ w·Δ, Σ control, and the scalar sums (weight, count, loss, b)."""

    delta: Params
    control: Params | None
    scalars: dict[str, float]


def unpack(layout: Layout, total: torch.Tensor) -> Sums:
    """Read a summed vector back: centre mod 2^bits, then undo the fixed point."""
    modulus = 1 << layout.bits
    centred = torch.where(total >= modulus // 2, total - modulus, total)
    n = layout.tensor_length

    def tensors(flat: torch.Tensor) -> Params:
        out, offset = {}, 0
        for k, shape in layout.shapes:
            size = math.prod(shape)
            out[k] = (flat[offset : offset + size].double() * layout.step).reshape(shape).float()
            offset += size
        return out

    delta = tensors(centred[:n])
    control = tensors(centred[n : 2 * n]) if layout.control else None
    raw = centred[-len(SCALARS) :].tolist()
    scalars = dict(zip(SCALARS, raw, strict=True))
    scalars["loss"] *= _SCALAR_STEP
    scalars["unclipped"] *= _SCALAR_STEP
    return Sums(delta, control, {k: float(v) for k, v in scalars.items()})
