"""What a client feeds to secure aggregation: its update as one vector of field elements.

Secure aggregation sums integers mod 2^bits, so a client's contribution is fixed-point encoded:
each delta entry clipped to [−c, c] and stochastically rounded (unbiased) to a multiple of
step = c / 2^(q − 1), then multiplied by the client's integer weight w (exact in the ring). The
vector also carries the scalars the server needs and may only learn in sum: the weight w, a
count of 1, the training loss × w, and DP's centred clipped bit b_k − ½. Signed values wrap mod
2^bits and are read back centred, so the modulus is sized for the largest possible |sum|.

    vector = [ w·q(Δ) | q(control) | w | 1 | w·loss | b − ½ ]

Rounding moves each entry by less than one step, so the encoded vector's norm can exceed the
delta's by up to step·√d (``rounding_slack``); a DP client clips to C minus that slack, so what
enters the sum still has norm ≤ C.

Under distributed DP the vector is the Skellam mechanism's instead (``fedfm.privacy.skellam``):

    vector = [ Sk-noised rotated q(Δ) | Sk-noised h·(b − ½) (adaptive clipping) | 1 ]

with no loss entry (it would be released to the server without noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedfm.privacy.skellam import SkellamRound
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
    skellam: SkellamRound | None = None  # distributed DP: the Skellam mechanism's encoding

    @classmethod
    def for_params(cls, reference: Params, control: bool, **settings) -> Layout:
        shapes = tuple((k, tuple(v.shape)) for k, v in reference.items())
        return cls(shapes, control, **settings)

    @property
    def tensor_length(self) -> int:
        return sum(math.prod(s) for _, s in self.shapes)

    @property
    def length(self) -> int:
        if self.skellam is not None:
            return self.skellam.length + 1
        return self.tensor_length * (2 if self.control else 1) + len(SCALARS)

    @property
    def rounding_slack(self) -> float:
        """How much fixed-point rounding can add to an update's L2 norm: step · √d."""
        return self.step * math.sqrt(self.tensor_length)

    @property
    def step(self) -> float:
        return self.clip_range / 2 ** (self.quantization_bits - 1)

    @property
    def bits(self) -> int:
        """Modulus bits: room for the largest |sum| of any entry, twice (sign), plus a margin."""
        if self.skellam is not None:
            return self.skellam.bits
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
    unclipped: float | None = None,
    noise: torch.Generator | None = None,
) -> torch.Tensor:
    """The client's signed integer vector (weight clamped to [1, max_weight]); masking reduces it
    mod 2^bits. ``unclipped`` is DP's clipped bit b (None without DP); ``noise`` draws distributed
    DP's Skellam share."""
    if layout.skellam is not None:
        if noise is None:
            raise ValueError("distributed DP needs a noise generator")
        bit = unclipped if layout.skellam.bit_scale else None
        noisy = layout.skellam.encode(_flat(delta, layout), bit, noise)
        return torch.cat([noisy, torch.ones(1, dtype=torch.int64)])
    weight = max(1, min(int(weight), layout.max_weight))
    c = layout.clip_range
    parts = [weight * _fixed(_flat(delta, layout).clamp(-c, c), layout.step, generator)]
    if layout.control:
        if control is None:
            raise ValueError("this round's layout carries control variates; none given")
        parts.append(_fixed(_flat(control, layout).clamp(-c, c), layout.step, generator))
    loss = min(max(float(loss), 0.0), _MAX_LOSS) if math.isfinite(loss) else _MAX_LOSS
    centred = 0.0 if unclipped is None else unclipped - 0.5
    scalars = [weight, 1, weight * round(loss / _SCALAR_STEP), round(centred / _SCALAR_STEP)]
    parts.append(torch.tensor(scalars, dtype=torch.int64))
    return torch.cat(parts)


@dataclass(frozen=True)
class Sums:
    """What the server learns: Σ w·Δ, Σ control, the scalar sums (weight, count, loss, centred b),
    and how close the summed entries came to wrapping around the modulus."""

    delta: Params
    control: Params | None
    scalars: dict[str, float]
    near_wrap: int = 0  # summed entries beyond 3/4 of the half-range: a wrap is likely close by


def unpack(layout: Layout, total: torch.Tensor) -> Sums:
    """Read a summed vector back: centre mod 2^bits, then undo the fixed point (or the Skellam
    encoding: unscale and rotate back). Loss is absent (NaN) under distributed DP."""
    modulus = 1 << layout.bits
    centred = torch.where(total >= modulus // 2, total - modulus, total)
    near_wrap = int((centred.abs() > 3 * (modulus // 8)).sum())
    n = layout.tensor_length

    def tensors(flat: torch.Tensor, step: float) -> Params:
        out, offset = {}, 0
        for k, shape in layout.shapes:
            size = math.prod(shape)
            out[k] = (flat[offset : offset + size].double() * step).reshape(shape).float()
            offset += size
        return out

    if layout.skellam is not None:
        flat, count = layout.skellam.decode(centred)
        scalars = {"weight": float(centred[-1]), "count": float(centred[-1]), "loss": math.nan}
        scalars["unclipped"] = 0.0 if count is None else count
        return Sums(tensors(flat, 1.0), None, scalars, near_wrap)
    delta = tensors(centred[:n], layout.step)
    control = tensors(centred[n : 2 * n], layout.step) if layout.control else None
    raw = centred[-len(SCALARS) :].tolist()
    scalars = dict(zip(SCALARS, raw, strict=True))
    scalars["loss"] *= _SCALAR_STEP
    scalars["unclipped"] *= _SCALAR_STEP
    return Sums(delta, control, {k: float(v) for k, v in scalars.items()}, near_wrap)
