"""Explicit randomness: every random draw comes from a seed derived from (seed, round, client, purpose).

No global RNG is relied upon. A derived seed depends only on its key, never on the order in
which clients run, so every engine, and a resumed run, draws the same numbers. Privacy noise is
the exception (``NoiseSource``): by default it comes from the operating system's CSPRNG.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import numpy as np
import torch


def derive_seed(seed: int, *key: object) -> int:
    """A 63-bit seed that is a pure function of ``seed`` and ``key`` (e.g. round, client, purpose)."""
    text = repr((int(seed), *key)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def numpy_rng(seed: int, *key: object) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *key))


def torch_generator(seed: int, *key: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *key))


def seed_torch(seed: int, *key: object) -> None:
    """Seed torch's default generator (dropout, weight init) from a derived seed."""
    torch.manual_seed(derive_seed(seed, *key))


@dataclass(frozen=True)
class NoiseSource:
    """Where privacy randomness comes from: DP noise, DP-SGD noise and batches, DP cohorts.

    By default (``seed`` None) every call returns a generator seeded with 63 fresh bits from the
    operating system's CSPRNG (``secrets``): nobody, the run's own operator included, can recompute
    the noise, and nothing about it is stored, logged or sent. With a ``seed`` (the explicit
    ``privacy.noise_seed`` setting) draws are derived from (seed, key) like every other draw, so runs
    repeat exactly; the privacy guarantee then does not hold against anyone who knows that seed.

    ``given`` carries per-purpose seeds handed to one deployed client for one round (reproducible
    mode only): that client can derive its own noise, and nobody else's.
    """

    seed: int | None = None
    given: tuple[tuple[str, int], ...] = ()

    @property
    def reproducible(self) -> bool:
        return self.seed is not None or bool(self.given)

    def generator(self, *key: object) -> torch.Generator:
        """A torch generator for the draw named by ``key`` (e.g. round, client, purpose)."""
        given = dict(self.given)
        if given:
            purpose = str(key[-1])
            if purpose not in given:
                raise ValueError(f"no reproducible noise seed was given for {purpose!r}")
            return torch.Generator().manual_seed(given[purpose])
        if self.seed is None:
            return torch.Generator().manual_seed(secrets.randbits(63))
        return torch_generator(self.seed, *key)

    def numpy(self, *key: object) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng(secrets.randbits(128))
        return numpy_rng(self.seed, *key)

    def for_client(self, round_: int, client_id: int, purposes: tuple[str, ...]) -> NoiseSource:
        """What one deployed client is told: fresh-secure (nothing), or its own per-purpose seeds."""
        if self.seed is None:
            return NoiseSource()
        return NoiseSource(given=tuple((p, derive_seed(self.seed, round_, client_id, p)) for p in purposes))
