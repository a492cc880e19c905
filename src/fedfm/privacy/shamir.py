"""Shamir secret sharing over GF(2⁵²¹ − 1), with hash commitments and a consistency check.

Pure functions. ``commit`` binds a share to its dealer, holder and purpose with a 32-byte salt
known only to dealer and holder (SHA-256, hiding and binding): the dealer gives the server the
commitments, the holder later reveals (share, salt), and the server can tell a holder that
returns a wrong share. ``consistent`` checks that more than t shares lie on one polynomial of
degree t − 1, which catches a dealer who handed out shares of no single secret.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
import struct
from collections.abc import Mapping, Sequence

PRIME = 2**521 - 1  # a Mersenne prime: larger than any 32-byte secret
SHARE_BYTES = 66  # an element of GF(2^521 − 1)


class ShareError(ValueError):
    """Shares that cannot give the secret; the message says why."""


def share(secret: int, threshold: int, holders: Sequence[int]) -> dict[int, int]:
    """Shares f(h + 1) of a random degree-(t − 1) polynomial with f(0) = secret, one per holder."""
    if not 1 <= threshold <= len(holders):
        raise ValueError(f"threshold {threshold} must be between 1 and {len(holders)} holders")
    coefficients = [secret % PRIME] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = {}
    for h in holders:
        x, y = h + 1, 0
        for c in reversed(coefficients):
            y = (y * x + c) % PRIME
        out[h] = y
    return out


@functools.lru_cache(maxsize=4096)
def _coefficients(xs: tuple[int, ...], at: int) -> tuple[int, ...]:
    """Lagrange basis values ℓ_j(at) for the points ``xs`` (cached: the holders of every client
    are the same points in a complete graph, so a round computes each set once)."""
    out = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * (at - xm) % PRIME
                den = den * (xj - xm) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


def _interpolate(points: list[tuple[int, int]], at: int) -> int:
    """The value at ``at`` of the polynomial through ``points`` (Lagrange, mod PRIME)."""
    coefficients = _coefficients(tuple(x for x, _ in points), at)
    return sum(y * c for (_, y), c in zip(points, coefficients, strict=True)) % PRIME


def reconstruct(shares: Mapping[int, int], threshold: int) -> int:
    """f(0) from any ``threshold`` shares {holder: f(holder + 1)}."""
    if len(shares) < threshold:
        raise ShareError(f"{len(shares)} shares, {threshold} needed")
    points = [(h + 1, y) for h, y in sorted(shares.items())[:threshold]]
    return _interpolate(points, 0)


def consistent(shares: Mapping[int, int], threshold: int) -> bool:
    """Whether every share lies on the polynomial through the first ``threshold`` of them."""
    items = sorted(shares.items())
    points = [(h + 1, y) for h, y in items[:threshold]]
    return all(_interpolate(points, h + 1) == y % PRIME for h, y in items[threshold:])


def valid_share(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < PRIME


def commit(kind: bytes, dealer: int, holder: int, value: int, salt: bytes) -> bytes:
    """SHA-256 commitment to one share: what the dealer shows the server, opened by the holder."""
    body = struct.pack("<II", dealer, holder) + value.to_bytes(SHARE_BYTES, "little") + salt
    return hashlib.sha256(b"fedfm-secagg-commit/" + kind + b"/" + body).digest()
