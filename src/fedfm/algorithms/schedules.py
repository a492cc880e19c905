"""Learning-rate schedules across rounds: the local learning rate of round t of T, a pure function
of the round (so a resumed run continues the schedule exactly; the round is checkpointed).

Federated LLM fine-tuning recipes decay the clients' learning rate over rounds rather than over
local steps (each round's optimizer is fresh): FlowerTune's cosine annealing is

    lr(t) = lr_min + ½ (lr_max − lr_min) (1 + cos(π t / T)),   t = 1..T,

so the last round trains at lr_min. With ``w`` warm-up rounds, round t ≤ w trains at lr_max · t / w
and the decay runs over the remaining rounds (t − w of T − w). ``linear`` decays in a straight line
to lr_min on the same clock; ``constant`` is lr_max every round.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def lr_at(base: float, t: int, kind: str = "constant", total: int | None = None, warmup: int = 0,
          minimum: float = 0.0) -> float:  # fmt: skip
    """The learning rate of round ``t`` (1-based) of ``total`` for a schedule ``kind`` from ``base``
    down to ``minimum`` after ``warmup`` rounds of linear warm-up. ``total`` None: no decay."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {kind!r}; known: {', '.join(SCHEDULES)}")
    t = max(int(t), 1)
    if warmup and t <= warmup:
        return base * t / warmup
    if kind == "constant" or total is None:
        return base
    progress = min(1.0, (t - warmup) / max(1, total - warmup))
    if kind == "linear":
        return base - (base - minimum) * progress
    return minimum + 0.5 * (base - minimum) * (1 + math.cos(math.pi * progress))
