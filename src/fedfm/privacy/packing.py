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
enters the sum still has norm ≤ C (and likewise to ``validation.max_update_norm``, ``max_norm``).

**The field holds exactly the range honest inputs can produce**, and a recovered sum outside that
range is refused (``Sums.out_of_range``): the server cannot check one masked input, but it can
check what they add up to. Honest sums satisfy |Σ w·q(Δ)ᵢ| ≤ (Σ w)·2^(q−1) in every entry (with
Σ w the unmasked weight), so every coordinate of an accepted mean lies in [−c, c] and one client,
whatever it sends, moves any coordinate of the mean by at most 2c per round; with a norm bound b
the sum's L2 norm is checked against (Σ w)·b too, which bounds the mean's move by 2b in L2.

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
_MAX_LOSS_UNITS = round(_MAX_LOSS / _SCALAR_STEP)
RANGE_CONFIDENCE = 40.0  # Skellam's norm check: an honest sum fails it with probability ≈ e^-40


MAX_VALUES = 1 << 26  # 64M values: 256 MiB of float32 per update (an int64 masked vector of 512 MiB)


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
    max_norm: float | None = None  # validation.max_update_norm: clients clip to it, the sum is checked

    @classmethod
    def for_params(cls, reference: Params, control: bool, **settings) -> Layout:
        shapes = tuple((k, tuple(v.shape)) for k, v in reference.items())
        values = sum(math.prod(s) for _, s in shapes) * (2 if control else 1)
        if values > MAX_VALUES:
            raise ValueError(
                f"secure aggregation is refused above {MAX_VALUES:,} values (256 MiB of float32 per "
                f"update); this run's update has {values:,}: every masked input is an int64 vector "
                "(8 bytes a value) that the server holds for each survivor until unmasking, and each "
                "client expands one mask per neighbour (measured in docs/privacy.md). Train an adapter "
                "(peft.method = 'lora') or use client-level DP without secure aggregation"
            )
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
        """Modulus bits: exactly room for the largest |sum| honest inputs can produce, both signs
        (2^bits ≥ 2R + 1): no room for one client's excess to hide in."""
        if self.skellam is not None:
            return self.skellam.bits
        delta_max = self.max_clients * self.max_weight * 2 ** (self.quantization_bits - 1)
        loss_max = self.max_clients * self.max_weight * _MAX_LOSS_UNITS
        largest = max(delta_max, loss_max, 2 ** (self.quantization_bits - 1) * self.max_clients)
        bits = math.ceil(math.log2(2 * largest + 1))
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
    flat = _flat(delta, layout).clamp(-c, c)
    if layout.max_norm is not None:  # what enters the sum has norm ≤ max_norm, rounding included
        room = max(layout.max_norm - layout.rounding_slack, 0.0)
        norm = float(flat.norm())
        if norm > room:
            flat = flat * (room / norm)
    parts = [weight * _fixed(flat, layout.step, generator)]
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
    how many summed entries lie outside the range honest inputs can produce (a wrap-around, or
    one client's excess: the round must not be used), and that range (``bound``: the largest
    |entry| of Σ w·Δ in the update's units, or under distributed noise the largest L2 norm)."""

    delta: Params
    control: Params | None
    scalars: dict[str, float]
    out_of_range: int = 0
    bound: float = math.inf


def noise_norm_bound(variance: float, dim: int, x: float = RANGE_CONFIDENCE) -> float:
    """‖z‖₂ of ``dim`` independent noise entries of ``variance`` stays below this except with
    probability about e^−x (Laurent and Massart's χ² tail, 2000: d + 2√(dx) + 2x, times the
    variance; Skellam noise of the variances used here is close to Gaussian)."""
    return math.sqrt(variance * (dim + 2 * math.sqrt(dim * x) + 2 * x))


def _fixed_point_range(layout: Layout, centred: torch.Tensor) -> tuple[int, float]:
    """Entries of a summed fixed-point vector outside what honest inputs can produce, given the
    unmasked weight and count; and the bound on |Σ w·Δᵢ| in the update's units."""
    n, half = layout.tensor_length, 2 ** (layout.quantization_bits - 1)
    weight, count, loss = (int(v) for v in centred[-len(SCALARS) : -1])
    weight, count = max(weight, 0), max(count, 0)
    bad = int((centred[:n].abs() > weight * half).sum())
    if layout.control:
        bad += int((centred[n : 2 * n].abs() > count * half).sum())
    bad += int(not 0 <= loss <= weight * _MAX_LOSS_UNITS)
    if layout.max_norm is not None:  # Σ of vectors of norm ≤ b, weighted: norm ≤ (Σ w)·b
        norm = float(centred[:n].double().norm()) * layout.step
        bad += int(norm > weight * layout.max_norm * (1 + 1e-9))
    return bad, weight * half * layout.step


def _skellam_range(skellam: SkellamRound, centred: torch.Tensor) -> tuple[int, float]:
    """Under distributed noise: the summed rotated vector's L2 norm (integer units) is at most
    count·Δ₂ plus the norm the count's noise shares reach (``noise_norm_bound``), and the
    clipped-bit entry at most count·h/2 plus its noise; the bound is returned in update units."""
    count = max(int(centred[-1]), 0)
    variance = count * skellam.share_variance
    limit = count * skellam.l2_bound + noise_norm_bound(variance, skellam.padded)
    bad = int(float(centred[: skellam.padded].double().norm()) > limit)
    if skellam.bit_scale:
        bit_limit = count * skellam.bit_scale / 2 + noise_norm_bound(variance, 1)
        bad += int(abs(int(centred[skellam.padded])) > bit_limit)
    return bad, limit / skellam.scale


def unpack(layout: Layout, total: torch.Tensor) -> Sums:
    """Read a summed vector back: centre mod 2^bits, check it against the honest range, then undo
    the fixed point (or the Skellam encoding: unscale and rotate back). Loss is absent (NaN)
    under distributed DP."""
    modulus = 1 << layout.bits
    centred = torch.where(total >= modulus // 2, total - modulus, total)
    n = layout.tensor_length

    def tensors(flat: torch.Tensor, step: float) -> Params:
        out, offset = {}, 0
        for k, shape in layout.shapes:
            size = math.prod(shape)
            out[k] = (flat[offset : offset + size].double() * step).reshape(shape).float()
            offset += size
        return out

    if layout.skellam is not None:
        bad, bound = _skellam_range(layout.skellam, centred)
        flat, count = layout.skellam.decode(centred)
        scalars = {"weight": float(centred[-1]), "count": float(centred[-1]), "loss": math.nan}
        scalars["unclipped"] = 0.0 if count is None else count
        return Sums(tensors(flat, 1.0), None, scalars, bad, bound)
    bad, bound = _fixed_point_range(layout, centred)
    delta = tensors(centred[:n], layout.step)
    control = tensors(centred[n : 2 * n], layout.step) if layout.control else None
    raw = centred[-len(SCALARS) :].tolist()
    scalars = dict(zip(SCALARS, raw, strict=True))
    scalars["loss"] *= _SCALAR_STEP
    scalars["unclipped"] *= _SCALAR_STEP
    return Sums(delta, control, {k: float(v) for k, v in scalars.items()}, bad, bound)
