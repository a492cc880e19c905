"""When a client is online, as a function of virtual time (seconds since the run began).

Every pattern answers two questions, the only two the clock asks:

- ``online_until(t)``: if the client is online at ``t``, when it next goes offline (``inf``:
  never); if it is offline, ``None``;
- ``next_online(t)``: the earliest time ≥ ``t`` at which it is online (``inf``: never again).

``Always`` is online for ever. ``Diurnal`` is online for ``fraction`` of every ``period_s`` (a day),
starting at its own ``phase`` (clients live in different time zones and habits). ``OnOff``
alternates exponentially distributed online and offline spells drawn from its own seeded stream
(random churn: a long-run share ``mean_on / (mean_on + mean_off)`` online). ``Intervals`` is a
trace: online in ``[active[i], inactive[i])``, repeating every ``period_s`` (FedScale's
``client_behave_trace``: ``active``, ``inactive``, ``finish_time``).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import numpy as np

INF = math.inf


@dataclass(frozen=True)
class Always:
    def online_until(self, t: float) -> float | None:
        return INF

    def next_online(self, t: float) -> float:
        return t


@dataclass(frozen=True)
class Intervals:
    """Online in each ``[start, end)`` of ``spans`` (sorted, disjoint, within one period), the
    pattern repeating every ``period_s`` (``inf``: not repeating)."""

    spans: tuple[tuple[float, float], ...]
    period_s: float = INF

    def __post_init__(self) -> None:
        last = -INF
        for start, end in self.spans:
            if not (last <= start < end) or end > self.period_s:
                raise ValueError(
                    f"availability spans must be sorted, disjoint and within the period "
                    f"({self.period_s} s): got {list(self.spans)[:6]}"
                )
            last = end

    def _split(self, t: float) -> tuple[float, float]:
        if math.isinf(self.period_s):
            return 0.0, t
        base = math.floor(t / self.period_s) * self.period_s
        return base, t - base

    def online_until(self, t: float) -> float | None:
        base, r = self._split(t)
        eps = 1e-9 * max(1.0, abs(t))  # base + start, split again, can land a rounding error short
        i = bisect.bisect_right([s for s, _ in self.spans], r + eps) - 1
        if i < 0 or r >= self.spans[i][1]:
            return None
        end = base + self.spans[i][1]
        # a span that ends where the period's first span begins (midnight) runs on into it
        if self.spans[i][1] == self.period_s and self.spans[0][0] == 0:
            return INF if len(self.spans) == 1 else base + self.period_s + self.spans[0][1]
        return end

    def next_online(self, t: float) -> float:
        if not self.spans:
            return INF
        if self.online_until(t) is not None:
            return t
        base, r = self._split(t)
        for start, _ in self.spans:
            if start > r:
                return base + start
        if math.isinf(self.period_s):
            return INF
        return base + self.period_s + self.spans[0][0]


def diurnal(fraction: float, period_s: float, phase: float) -> Intervals:
    """Online for ``fraction`` of every period, from ``phase`` (a share of the period) on."""
    if not 0 < fraction <= 1:
        raise ValueError(f"online fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return Intervals(((0.0, period_s),), period_s)
    start, length = (phase % 1.0) * period_s, fraction * period_s
    end = start + length
    if end <= period_s:
        return Intervals(((start, end),), period_s)
    return Intervals(((0.0, end - period_s), (start, period_s)), period_s)


@dataclass(frozen=True)
class OnOff:
    """Exponential online / offline spells from the client's own seeded stream; online at t = 0
    with probability ``mean_on / (mean_on + mean_off)`` (the stationary share)."""

    mean_on_s: float
    mean_off_s: float
    seed: tuple[int, ...]
    horizon_s: float = 1e9  # spells are drawn lazily up to this time; beyond it the client stays offline
    _spans: list = field(default_factory=list, compare=False, repr=False)

    def _ensure(self, t: float) -> None:
        spans = self._spans
        if not spans:
            rng = np.random.default_rng(list(self.seed))
            object.__setattr__(self, "_rng", rng)
            share = self.mean_on_s / (self.mean_on_s + self.mean_off_s)
            start = 0.0 if rng.random() < share else float(rng.exponential(self.mean_off_s))
            spans.append((start, start + float(rng.exponential(self.mean_on_s))))
        rng = self._rng
        while spans[-1][1] <= t and spans[-1][1] < self.horizon_s:
            start = spans[-1][1] + float(rng.exponential(self.mean_off_s))
            spans.append((start, start + float(rng.exponential(self.mean_on_s))))

    def online_until(self, t: float) -> float | None:
        self._ensure(t)
        for start, end in self._spans:
            if start <= t < end:
                return end
        return None

    def next_online(self, t: float) -> float:
        self._ensure(t)
        for start, end in self._spans:
            if t < end:
                return max(start, t)
        return INF
