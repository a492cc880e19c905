"""A rerun's measurements against the committed ones: same, within, outside, reported.

- ``exact`` kinds (bytes, ε, counts): every seed both sides hold must give the same value (to
  1e-9 relative: JSON's floats); ``same`` or ``differs``.
- ``interval`` kinds (accuracy, loss, …): the rerun's mean must lie in the committed 95%
  interval (with one committed seed, equal to its value to 1e-6, or ``outside``): ``within``.
- ``machine`` kinds (seconds, memory, ratios): on a machine with the committed signature, judged
  as interval kinds; elsewhere ``reported`` (the fresh number beside the committed one).

A measurement the rerun lacks is ``missing``; ``passed`` says whether nothing differs, falls
outside or is missing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedfm.reproduce.results import Measurement
from fedfm.reproduce.stats import interval

FAILING = ("differs", "outside", "missing")


@dataclass(frozen=True)
class Verdict:
    name: str
    group: dict
    kind: str
    committed: str
    fresh: str
    verdict: str  # same | differs | within | outside | reported | missing

    @property
    def label(self) -> str:
        return self.name + (
            " [" + ", ".join(f"{k}={v}" for k, v in self.group.items()) + "]" if self.group else ""
        )


def judge_one(committed: Measurement, fresh: Measurement | None, same_machine: bool) -> Verdict:
    was = interval(committed.values)
    if fresh is None:
        return Verdict(committed.name, committed.group, committed.kind, was.format(4), "—", "missing")
    now = interval(fresh.values)
    how = committed.judged_by
    if how == "exact":
        a, b = committed.by_seed(), fresh.by_seed()
        shared = sorted(set(a) & set(b)) or None
        pairs = [(a[s], b[s]) for s in shared] if shared else [(was.mean, now.mean)]
        same = all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12) for x, y in pairs)
        verdict = "same" if same else "differs"
    elif how == "machine" and not same_machine:
        verdict = "reported"
    else:
        slack = 1e-6 if was.half is None else 1e-9
        verdict = "within" if was.contains(now.mean, slack) else "outside"
    return Verdict(committed.name, committed.group, committed.kind, was.format(4), now.format(4), verdict)


def judge(committed: list[Measurement], fresh: list[Measurement], same_machine: bool) -> list[Verdict]:
    """Each committed measurement against the rerun's (matched by name and group)."""
    now = {m.key: m for m in fresh}
    return [judge_one(m, now.get(m.key), same_machine) for m in committed]


def passed(verdicts: list[Verdict]) -> bool:
    return not any(v.verdict in FAILING for v in verdicts)


def table(verdicts: list[Verdict]) -> str:
    """The comparison as a markdown table."""
    lines = ["| measurement | kind | committed | rerun | verdict |", "| --- | --- | ---: | ---: | --- |"]
    lines += [f"| {v.label} | {v.kind} | {v.committed} | {v.fresh} | {v.verdict} |" for v in verdicts]
    return "\n".join(lines)
