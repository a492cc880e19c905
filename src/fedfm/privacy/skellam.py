"""The distributed Skellam mechanism: integer noise that survives secure aggregation.

Agarwal, Kairouz, Liu (NeurIPS 2021), "The Skellam Mechanism for Differentially Private
Federated Learning", with the rotation and conditional rounding of Kairouz, Liu, Steinke
(ICML 2021), "The Distributed Discrete Gaussian Mechanism for Federated Learning with Secure
Aggregation". Each client, on its L2-clipped delta x (‖x‖₂ ≤ C):

1. **rotate**: pad to d = 2^k entries and apply the randomized Hadamard transform H·D (D random
   signs from a public per-round seed), which spreads the vector's mass evenly so that no entry is
   large — what keeps the modular sum from wrapping;
2. **quantise**: scale by s and round each entry up or down at random (unbiased), retrying until
   the rounded vector's norm is at most Δ₂ = min(sC + √d, √((sC)² + d/4 + √(2 ln 1/β)(sC + √d/2)))
   — so the sensitivity is a deterministic bound, whatever the rounding did;
3. **integer noise**: add Skellam noise Sk(μ/n) = Poisson(μ/2n) − Poisson(μ/2n) to every entry.
   A sum of independent Skellams is Skellam, so n clients' shares add up *exactly* to Sk(μ);
4. **mask** (secure aggregation, mod 2^bits). The server unmasks the sum, reads it centred,
   divides by s and rotates back.

Privacy (Agarwal et al., Corollary 3.6): for integer α > 1, with L2 / L1 sensitivities Δ₂, Δ₁ of
the summed integer vector and noise variance μ per entry, the mechanism is (α, ε(α))-RDP with

    ε(α) = α Δ₂² / (2μ) + min( ((2α − 1) Δ₂² + 6 Δ₁) / (4μ²),  3 Δ₁ / (2μ) ).

The first term is the Gaussian mechanism's; the second is the price of discreteness, negligible
when sC ≫ √d. Rounds compose by adding RDP; the conversion to (ε, δ) is dp-accounting's.
fedfm claims **no amplification by sampling** for this mechanism (the analysis treats who took
part in a round as public and each client as present in every round), so ε is conservative.

Adaptive clipping rides along as one extra entry, h·(b − ½) for the clipped bit b, outside the
rotation and noised like every other entry (its count-noise std is sμ^½/h in count units).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BETA = math.exp(-0.5)  # conditional rounding's failure probability per try (the papers' choice)
MAX_POISSON_MEAN = 2.0**52  # torch.poisson draws float64: exact integers below 2^53
ORDERS = tuple(range(2, 129)) + (160, 192, 256, 384, 512)


# ---------------------------------------------------------------- pure maths


def padded_dim(d: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(d, 1))))


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """The orthonormal Walsh–Hadamard transform of a 1-D float64 vector of length 2^k (self-inverse)."""
    n = x.numel()
    if n & (n - 1):
        raise ValueError(f"the Hadamard transform needs a power-of-two length, got {n}")
    y, h = x, 1
    while h < n:
        blocks = y.reshape(-1, 2, h)
        y = torch.stack((blocks[:, 0] + blocks[:, 1], blocks[:, 0] - blocks[:, 1]), dim=1)
        h *= 2
    return y.reshape(n) / math.sqrt(n)


def signs(n: int, seed: int) -> torch.Tensor:
    """The rotation's public random signs D (±1), from the round's public seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g, dtype=torch.int64).double() * 2 - 1


def rotate(x: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    return hadamard(x * sign)


def unrotate(y: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    return hadamard(y) * sign


def rounded_l2_bound(norm: float, d: int, beta: float = BETA) -> float:
    """Δ₂: the norm a conditionally rounded vector of norm ≤ ``norm`` in d entries never exceeds."""
    plain = norm + math.sqrt(d)
    if beta == 0:
        return plain
    tight = norm**2 + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (norm + math.sqrt(d) / 2)
    return min(plain, math.sqrt(tight))


def rounded_l1_bound(l2: float, d: int) -> float:
    """Δ₁ of an integer vector of L2 norm ≤ l2 in d entries: ‖v‖₁ ≤ min(√d‖v‖₂, ‖v‖₂²)."""
    return l2 * min(math.sqrt(d), l2)


def conditional_round(
    y: torch.Tensor, bound: float, generator: torch.Generator, tries: int = 1000
) -> torch.Tensor:
    """Unbiased randomized rounding to int64, repeated until the result's L2 norm is ≤ ``bound``."""
    low = torch.floor(y)
    frac = y - low
    for _ in range(tries):
        up = torch.rand(y.shape, generator=generator, dtype=torch.float64) < frac
        rounded = (low + up.double()).to(torch.int64)
        if math.sqrt(float(rounded.double().pow(2).sum())) <= bound:
            return rounded
    raise RuntimeError(f"conditional rounding found no vector within norm {bound:.6g} in {tries} tries")


def skellam_noise(n: int, variance: float, generator: torch.Generator) -> torch.Tensor:
    """n independent Sk(variance) draws: Poisson(variance / 2) − Poisson(variance / 2), int64."""
    if variance <= 0:
        return torch.zeros(n, dtype=torch.int64)
    rate = variance / 2
    if rate >= MAX_POISSON_MEAN:
        raise ValueError(f"Skellam variance {variance:.3g} is too large to sample exactly; use fewer bits")
    means = torch.full((n,), rate, dtype=torch.float64)
    a = torch.poisson(means, generator=generator)
    b = torch.poisson(means, generator=generator)
    return (a - b).to(torch.int64)


def skellam_rdp(order: int, l2: float, l1: float, variance: float) -> float:
    """ε(α) of the Skellam mechanism (Agarwal, Kairouz, Liu 2021, Corollary 3.6); integer α > 1."""
    if order <= 1 or int(order) != order:
        raise ValueError(f"the Skellam RDP bound holds for integer orders > 1, got {order}")
    a, mu = order, variance
    if mu <= 0:
        return math.inf
    return a * l2**2 / (2 * mu) + min(((2 * a - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))


# ---------------------------------------------------------------- one round's public settings


@dataclass(frozen=True)
class SkellamRound:
    """What every client of a round uses, and what the server charges. Public; no secrets."""

    dim: int  # true number of values
    padded: int  # 2^k ≥ dim
    scale: float  # s: integer units per unit of the update
    clip_norm: float  # C
    l2_bound: float  # Δ₂ of one client's rounded vector (integer units)
    share_variance: float  # each client's Skellam variance per entry (integer units)
    bit_scale: int  # h: the clipped bit travels as h·(b − ½); 0 without adaptive clipping
    bits: int  # modulus 2^bits of the secure sum
    wrap_stddevs: float  # the field holds this many standard deviations of a summed entry
    rotation_seed: int  # public

    @classmethod
    def plan(
        cls,
        dim: int,
        clip_norm: float,
        noise_std: float,
        cohort: int,
        bits: int,
        wrap_stddevs: float,
        rotation_seed: int,
        count_stddev: float | None = None,
    ) -> SkellamRound:
        """Choose the scale s so that the sum of ``cohort`` clients plus noise fits 2^bits with
        ``wrap_stddevs`` standard deviations to spare (Agarwal et al. §4):

            2^(bits−1) = k · √((C·n)²/d + n/(4s²) + σ²) · s   →   a closed form for 1/s,

        where σ = ``noise_std`` is the noise std on the sum in the update's units (at most half the
        scale at which each share's Poisson means would reach 2^52, where float64 stops being exact).
        Each of the n clients then adds Sk(s²σ²/n) per entry: the shares sum to variance s²σ².
        """
        if noise_std <= 0:
            raise ValueError("distributed Skellam noise needs a noise multiplier > 0")
        d, n, k = padded_dim(dim), max(1, cohort), wrap_stddevs
        room = 4.0 ** (bits - 1) - k**2 * n / 4
        if room <= 0:
            raise ValueError(f"privacy.distributed_bits = {bits} is too small for {n} clients")
        gamma = k * math.sqrt((clip_norm * n) ** 2 / d + noise_std**2) / math.sqrt(room)
        # a coarser grid where the field is wider than exact Poisson draws allow (means < 2^52)
        scale = min(1.0 / gamma, 0.5 * math.sqrt(2 * MAX_POISSON_MEAN * n) / noise_std)
        if count_stddev is not None:
            # the clipped-bit entry sums to up to n·h/2 = n·sσ/(2σ_b), plus k noise stds (sσ): it
            # must fit the half-range too, or a cohort of all-clipped clients would wrap around
            scale = min(scale, 2.0 ** (bits - 1) / (1.1 * noise_std * (n / (2 * count_stddev) + k)))
        share = (scale * noise_std) ** 2 / n
        bit_scale = 0
        if count_stddev is not None:  # h ≈ sσ / σ_b, even so that h·(b − ½) is an integer
            bit_scale = max(2, 2 * round(scale * noise_std / count_stddev / 2))
            if n * bit_scale / 2 + k * math.sqrt(n * share) >= 2.0 ** (bits - 1):
                raise ValueError(
                    f"privacy.distributed_bits = {bits} cannot hold the clipped-bit count of {n} clients; "
                    "use more bits or a larger privacy.clipped_count_stddev"
                )
        l2 = rounded_l2_bound(scale * clip_norm, d)
        return cls(dim, d, scale, clip_norm, l2, share, bit_scale, bits, wrap_stddevs, rotation_seed)

    @property
    def length(self) -> int:
        """Entries this mechanism contributes to the secure vector."""
        return self.padded + (1 if self.bit_scale else 0)

    def sensitivity(self) -> tuple[float, float]:
        """(Δ₂, Δ₁) of the summed integer vector when one client's data is replaced by any other:
        its rounded vector moves by at most 2·Δ₂ (two vectors of norm ≤ Δ₂), its bit entry by h."""
        l2_delta = 2 * self.l2_bound
        l1_delta = 2 * rounded_l1_bound(self.l2_bound, self.padded)
        h = float(self.bit_scale)
        return math.sqrt(l2_delta**2 + h**2), l1_delta + h

    def charge(self, contributors: int) -> dict:
        """The ledger entry of a round whose sum holds ``contributors`` clients' noise shares."""
        l2, l1 = self.sensitivity()
        return {"mechanism": "skellam", "l2": l2, "l1": l1, "variance": contributors * self.share_variance}

    def encode(self, flat: torch.Tensor, bit: float | None, generator: torch.Generator) -> torch.Tensor:
        """Client half: rotate → scale → conditional rounding → Skellam share (int64, not reduced)."""
        if flat.numel() != self.dim:
            raise ValueError(f"expected {self.dim} values, got {flat.numel()}")
        x = torch.zeros(self.padded, dtype=torch.float64)
        x[: self.dim] = flat.double()
        norm = math.sqrt(float(x.pow(2).sum()))
        if norm > self.clip_norm * (1 + 1e-4):
            raise ValueError(f"the update has norm {norm:.6g} > clip norm {self.clip_norm:.6g}: clip first")
        if norm > self.clip_norm:  # float32 clipping can land a hair above C; the bound below holds anyway
            x *= self.clip_norm / norm
        y = rotate(x, signs(self.padded, self.rotation_seed)) * self.scale
        v = conditional_round(y, self.l2_bound, generator)
        v = v + skellam_noise(self.padded, self.share_variance, generator)
        if self.bit_scale:
            if bit not in (0.0, 1.0):
                raise ValueError(f"the clipped bit must be 0 or 1, got {bit!r}")
            centred = self.bit_scale * (int(bit) * 2 - 1) // 2
            b = centred + skellam_noise(1, self.share_variance, generator)
            v = torch.cat([v, b])
        return v

    def decode(self, centred: torch.Tensor) -> tuple[torch.Tensor, float | None]:
        """Server half: the noisy summed update (float64, ``dim`` values) and the noisy centred
        count Σ (b − ½) in count units (None without adaptive clipping)."""
        y = centred[: self.padded].double() / self.scale
        x = unrotate(y, signs(self.padded, self.rotation_seed))[: self.dim]
        count = float(centred[self.padded]) / self.bit_scale if self.bit_scale else None
        return x, count

    def expected_wraps(self) -> float:
        """Entries expected to wrap per round, if a summed entry were Gaussian at the planned spread."""
        return self.length * math.erfc(self.wrap_stddevs / math.sqrt(2))


def epsilon(entries: list[dict], delta: float) -> float:
    """(ε, δ) after composing Skellam rounds: RDP adds over rounds; dp-accounting converts."""
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    if not entries:
        return 0.0
    rdp = [sum(skellam_rdp(a, e["l2"], e["l1"], e["variance"]) for e in entries) for a in ORDERS]
    if any(math.isinf(r) for r in rdp):
        return math.inf
    return float(compute_epsilon(ORDERS, rdp, delta)[0])
