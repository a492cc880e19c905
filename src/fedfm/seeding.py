"""Explicit randomness: every random draw comes from a seed derived from (seed, round, client, purpose).

No global RNG is relied upon. A derived seed depends only on its key, never on the order in
which clients run, so every engine, and a resumed run, draws the same numbers.
"""

from __future__ import annotations

import hashlib

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
