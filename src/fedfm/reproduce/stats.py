"""Seeds into claims: the mean with a 95% interval, and a paired test over shared seeds.

The interval is Student's t over the per-seed values (n − 1 degrees of freedom): mean ±
t(0.975, n − 1) · s / √n, with s the sample standard deviation. One seed has no interval (its
half-width is None: nothing to judge a rerun against but the value itself). The paired test is
the paired t-test on the per-seed differences a − b over the seeds both sides share (two-sided, α
= 0.05 by default): "better" or "worse" only when p < α, otherwise "no clear difference". Pure
maths; no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95
ALPHA = 0.05


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` seeds and its two-sided ``confidence`` interval (``half`` None when n = 1)."""

    mean: float
    half: float | None
    n: int

    @property
    def low(self) -> float:
        return self.mean - (self.half or 0.0)

    @property
    def high(self) -> float:
        return self.mean + (self.half or 0.0)

    def contains(self, x: float, slack: float = 1e-9) -> bool:
        """Whether ``x`` lies in the interval (with one seed: equals the value, to ``slack``)."""
        return self.low - slack <= x <= self.high + slack

    def format(self, digits: int = 3) -> str:
        if self.half is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.half:.{digits}f}"


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile (scipy)."""
    from scipy.stats import t

    return float(t.ppf(p, df))


def interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean ± Student-t half-width over the per-seed ``values``."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("no values to summarise")
    n, mean = len(xs), math.fsum(xs) / len(xs)
    if n == 1:
        return Interval(mean, None, 1)
    s = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    return Interval(mean, t_quantile(0.5 + confidence / 2, n - 1) * s / math.sqrt(n), n)


@dataclass(frozen=True)
class Paired:
    """a − b over shared seeds: the mean difference with its interval, the p-value, the verdict."""

    difference: Interval
    p: float | None
    verdict: (
        str  # "better", "worse" (a against b, for a metric where higher is better) or "no clear difference"
    )

    def format(self, digits: int = 3) -> str:
        p = "n/a" if self.p is None else (f"{self.p:.2g}" if self.p >= 1e-4 else "< 1e-4")
        sign = "+" if self.difference.mean >= 0 else ""
        d = self.difference
        return f"{self.verdict} ({sign}{d.format(digits)}, paired t-test p = {p}, n = {d.n})"


def paired(
    a: dict[int, float], b: dict[int, float], higher_is_better: bool = True, alpha: float = ALPHA
) -> Paired:
    """The paired t-test of ``a`` against ``b`` (seed → value) over the seeds both hold."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        raise ValueError(f"a paired test needs at least 2 shared seeds (got {len(seeds)})")
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    d = interval(diffs)
    n, mean = len(diffs), d.mean
    s = math.sqrt(math.fsum((x - mean) ** 2 for x in diffs) / (n - 1))
    if s == 0.0:
        p = 0.0 if mean != 0.0 else 1.0
    else:
        from scipy.stats import t

        p = float(2 * t.sf(abs(mean) / (s / math.sqrt(n)), n - 1))
    verdict = "better" if (mean > 0) == higher_is_better else "worse"
    if p >= alpha:
        verdict = "no clear difference"
    return Paired(d, p, verdict)
