"""What a client's work costs in virtual seconds, and which clients a round keeps.

A client that starts at ``t`` downloads θ, runs its local steps and uploads its payload:

    duration = down_bytes / down_bandwidth + steps · step_s + up_bytes / up_bandwidth

It delivers at ``t + duration`` if it stays online until then, and drops out otherwise (its work
is spent all the same). Over-selection and deadlines decide which deliveries a synchronous round
keeps: the first ``m`` to arrive, none after ``start + deadline``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def work_seconds(profile, steps: float, down_bytes: float, up_bytes: float) -> float:
    return down_bytes / profile.down_bytes_s + steps * profile.step_s + up_bytes / profile.up_bytes_s


def finish_time(profile, start: float, seconds: float) -> float | None:
    """When a client that starts at ``start`` delivers, or None: it goes offline first (or is
    offline at ``start``)."""
    until = profile.availability.online_until(start)
    if until is None or start + seconds > until:
        return None
    return start + seconds


@dataclass(frozen=True)
class Arrival:
    client: int
    finish: float | None  # None: dropped out (went offline before delivering)
    seconds: float  # the work it did (compute and transfers), spent even when it is not kept
    compute_s: float  # of which local training


def keep_first(arrivals: list[Arrival], start: float, wanted: int, deadline_s: float | None):
    """(kept clients, {dropped client: reason}, the round's end time): the first ``wanted`` to
    deliver by ``start + deadline_s``. The round ends when the ``wanted``-th arrives, else at the
    deadline, else when the last delivery arrives (the start, when nobody delivers)."""
    cutoff = math.inf if deadline_s is None else start + deadline_s
    order = sorted((a for a in arrivals if a.finish is not None), key=lambda a: (a.finish, a.client))
    kept, dropped = [], {}
    for a in arrivals:
        if a.finish is None:
            dropped[a.client] = "went offline before delivering"
    for a in order:
        if a.finish > cutoff:
            dropped[a.client] = f"delivered at {a.finish - start:.1f} s, after the {deadline_s:g} s deadline"
        elif len(kept) >= wanted:
            dropped[a.client] = f"over-selected: the round already had its {wanted} updates"
        else:
            kept.append(a)
    if len(kept) == wanted:
        end = kept[-1].finish
    elif deadline_s is not None:
        end = cutoff
    else:
        end = kept[-1].finish if kept else start
    return [a.client for a in kept], dropped, end
