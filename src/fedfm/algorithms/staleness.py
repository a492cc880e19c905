"""Staleness weights for asynchronous aggregation: how much an update computed on a model
``τ`` server steps old counts (FedAsync, Xie et al. 2019; FedBuff, Nguyen et al. 2022).

- constant:   s(τ) = 1
- polynomial: s(τ) = (1 + τ)^(−a)                      (FedBuff's default, a = 0.5)
- hinge:      s(τ) = 1 if τ ≤ b, else 1 / (a (τ − b) + 1)

Every weight is in (0, 1], equals 1 at τ = 0 and does not increase with τ.
"""

from __future__ import annotations

STALENESS = ("constant", "polynomial", "hinge")


def staleness_weight(tau: int, kind: str = "polynomial", a: float = 0.5, b: int = 4) -> float:
    if tau < 0:
        raise ValueError(f"staleness must be ≥ 0, got {tau}")
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((1.0 + tau) ** (-a))
    if kind == "hinge":
        return 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)
    raise ValueError(f"unknown staleness function {kind!r}; known: {', '.join(STALENESS)}")
