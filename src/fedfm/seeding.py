"""Explicit randomness: every random draw comes from a seed derived from (seed, round, client, purpose).

No global RNG is relied upon. A derived seed depends only on its key, never on the order in
which clients run, so every engine, and a resumed run, draws the same numbers. Privacy noise is
the exception (``NoiseSource``): by default it comes from the operating system's CSPRNG.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


def _seed_of(digest: bytes) -> int:
    return int.from_bytes(digest[:8], "little") >> 1


def derive_seed(seed: int, *key: object) -> int:
    """A 63-bit seed that is a pure function of ``seed`` and ``key`` (e.g. round, client, purpose)."""
    return _seed_of(hashlib.sha256(repr((int(seed), *key)).encode()).digest())


def keyed_seed(secret: bytes, *key: object) -> int:
    """A 63-bit seed as HMAC-SHA256 under a 256-bit ``secret``: without the secret, seeds for other
    keys (rounds, clients, purposes) cannot be computed, and the secret cannot be searched for."""
    return _seed_of(hmac.new(secret, repr(tuple(key)).encode(), hashlib.sha256).digest())


NOISE_KEY = "noise.key"
NOISE_KEY_BYTES = 32


def noise_key(run_dir: Path, create: bool) -> bytes | None:
    """The run's 256-bit noise key (``RUN/noise.key``, mode 0600, server only): read when the file
    is there (a resumed run, or a rerun that copied it in), else drawn from the OS CSPRNG and
    written when ``create`` (a deployment with a noise seed); else None."""
    path = Path(run_dir) / NOISE_KEY
    if path.is_file():
        key = path.read_bytes()
        if len(key) != NOISE_KEY_BYTES:
            raise ValueError(f"{path} holds {len(key)} bytes; a noise key is {NOISE_KEY_BYTES}")
        return key
    if not create:
        return None
    key = os.urandom(NOISE_KEY_BYTES)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return key


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

    ``key`` (256 bits, ``noise_key``): reproducible draws are HMAC-SHA256 outputs under it instead
    of plain hashes of the seed. A deployment always has one, because it hands seeds to clients:
    a plain hash of a small seed can be searched for (2^32 seeds fall in hours), an HMAC under a
    key drawn from the OS cannot. A simulation has one only when its run folder holds a key file.

    ``given`` carries per-purpose seeds handed to one deployed client for one round (reproducible
    mode only): that client can derive its own noise, and nobody else's.
    """

    seed: int | None = None
    given: tuple[tuple[str, int], ...] = ()
    key: bytes | None = None

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
        return torch.Generator().manual_seed(self._seed(*key))

    def numpy(self, *key: object) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng(secrets.randbits(128))
        return np.random.default_rng(self._seed(*key))

    def _seed(self, *key: object) -> int:
        if self.key is None:
            return derive_seed(self.seed, *key)
        return keyed_seed(self.key, int(self.seed), *key)

    def for_client(self, round_: int, client_id: int, purposes: tuple[str, ...]) -> NoiseSource:
        """What one deployed client is told: fresh-secure (nothing), or its own per-purpose seeds,
        each an HMAC-SHA256 output under the run's noise key (never a function of the seed alone)."""
        if self.seed is None:
            return NoiseSource()
        if self.key is None:
            raise ValueError("reproducible noise handed to clients needs the run's noise key (noise.key)")
        return NoiseSource(given=tuple((p, self._seed(round_, client_id, p)) for p in purposes))
