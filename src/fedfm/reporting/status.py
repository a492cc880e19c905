"""``fedfm status RUN``: where a run stands, from its folder alone (pure reading).

The state is ``finished`` (the last round recorded and the report written), ``stopped`` (the
privacy budget ended it early; the reason is given), ``not started`` (no round recorded yet),
``running`` (a record arrived within the last ``max(3 × typical round, 60 s)``) or ``idle`` (no
record for longer: interrupted, or waiting for clients; resume with ``fedfm run --resume``). The
ETA is the rounds left times the median wall time of the last 5 rounds (evaluation included), and
says so.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from fedfm.reporting.dashboard.state import ETA_WINDOW, RunView, round_seconds
from fedfm.reporting.problems import SITE_LISTS, client_label

METRICS = (
    "test_accuracy", "test_loss", "test_perplexity", "test_reward_accuracy", "train_loss",
    "num_clients", "bytes_up_total", "bytes_down_total",
)  # fmt: skip


def run_status(run_dir: str | Path, now: float | None = None) -> dict:
    view = RunView(run_dir)
    view.poll()
    snap = view.snapshot()
    rounds = view.rounds
    last = rounds[-1] if rounds else {}
    metrics = view.run_dir / "metrics.jsonl"
    age = (now or time.time()) - metrics.stat().st_mtime if metrics.is_file() else None
    spans = round_seconds(rounds)
    quiet_after = max(60.0, 3 * statistics.median(spans[-ETA_WINDOW:])) if spans else 60.0
    stopped = next((e for e in reversed(view.events) if e.get("event") == "stopped"), None)
    if snap["finished"]:
        state = "finished"
    elif stopped is not None:
        state = "stopped"
    elif not rounds:
        state = "not started"
    else:
        state = "running" if age is not None and age <= quiet_after else "idle"
    # the dashboard's snapshot has computed the ETA already (the same rounds, not finished)
    left, basis = (snap["eta_s"], snap["eta_basis"]) if state == "running" else (None, state)
    privacy = view.config.get("privacy", {})
    eps = next((r["epsilon"] for r in reversed(rounds) if r.get("epsilon") is not None), None)
    problems = [
        {"round": last.get("round"), "kind": kind, **entry}
        for kind in SITE_LISTS
        for entry in last.get(kind) or []
    ]
    for p in problems:
        if "name" not in p and int(p["client"]) in view.names:
            p["name"] = view.names[int(p["client"])]
    return {
        "run": str(view.run_dir),
        "state": state,
        "reason": stopped.get("reason") if stopped else None,
        "round": snap["round"],
        "rounds_total": snap["rounds_total"],
        "eta_s": None if left is None else round(left, 1),
        "eta_basis": basis,
        "last_record_s_ago": None if age is None else round(age, 1),
        "metrics": {k: last[k] for k in METRICS if last.get(k) is not None},
        "dp": privacy.get("dp", "none"),
        "epsilon": eps,
        "target_epsilon": privacy.get("target_epsilon"),
        "sites": snap["names"],
        "problems": problems,
    }


def describe(status: dict) -> str:
    """The status as a few lines for a person."""
    lines = [f"{status['run']}: {status['state']}" + (f" ({status['reason']})" if status["reason"] else "")]
    lines.append(f"round {status['round']} of {status['rounds_total']}")
    if status["eta_s"] is not None:
        lines.append(f"ETA {status['eta_s'] / 60:.1f} min ({status['eta_basis']})")
    if status["metrics"]:
        lines.append(
            ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in status["metrics"].items()
            )
        )
    if status["dp"] == "none":
        lines.append("no DP (privacy.dp = 'none')")
    else:
        target = status["target_epsilon"]
        lines.append(f"DP {status['dp']}: ε spent {status['epsilon']}" + (f" of {target}" if target else ""))
    for p in status["problems"]:
        lines.append(f"round {p['round']}: {client_label(p)} {p['kind']}: {p.get('reason', '')}")
    return "\n".join(lines)
