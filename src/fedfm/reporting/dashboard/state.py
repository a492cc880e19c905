"""What the dashboard shows of one run folder, read from its files as they grow (pure reading).

A run's view is its config (rounds, privacy target), the round records so far, and the last
round's cohort with each client's status: trained, failed (with the stage and reason), rejected by
validation (with the reason), timed out, dropped (over-selected, late, offline). Per-client
metrics are left out where the server may not see them: under secure aggregation or DP.
"""

from __future__ import annotations

import json
import statistics
import tomllib
from pathlib import Path

from fedfm.reporting.logs import tail
from fedfm.reporting.problems import SITE_LISTS

ROUND_KEYS = (
    "round", "num_clients", "train_loss", "test_loss", "test_accuracy", "test_perplexity",
    "test_reward_accuracy", "epsilon", "bytes_up", "bytes_down", "bytes_up_total", "bytes_down_total",
    "virtual_time_s", "elapsed_s", "skipped",
)  # fmt: skip


ETA_WINDOW = 5


def round_seconds(rounds: list[dict]) -> list[float]:
    """Wall seconds between consecutive round records (``elapsed_s``), oldest first."""
    times = [r["elapsed_s"] for r in rounds if isinstance(r.get("elapsed_s"), int | float)]
    return [b - a for a, b in zip(times, times[1:], strict=False) if b >= a]


def eta(rounds: list[dict], total: int | None) -> tuple[float | None, str]:
    """(seconds left, basis) — None where nothing is left or no round has been timed."""
    done = rounds[-1]["round"] if rounds else 0
    spans = round_seconds(rounds)[-ETA_WINDOW:]
    if not total or done >= total or not spans:
        return None, "no round timed yet" if total and done < total else "nothing left"
    per = statistics.median(spans)
    basis = (
        f"{total - done} rounds left × {per:.1f} s, the median of the last {len(spans)} rounds' "
        "wall time (evaluation included)"
    )
    return (total - done) * per, basis


class RunView:
    """One run folder, read incrementally: ``poll()`` → the records that appeared since."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.offset = 0
        self.rounds: list[dict] = []
        self.clients: dict[int, list[dict]] = {}
        self.events: list[dict] = []
        self.names: dict[int, str] = {}  # sites by name ({"event": "sites"})
        self.config = self._config()

    def _config(self) -> dict:
        path = self.run_dir / "config.toml"
        try:
            return tomllib.loads(path.read_text()) if path.is_file() else {}
        except (tomllib.TOMLDecodeError, OSError):
            return {}

    @property
    def withholds_clients(self) -> bool:
        """Secure aggregation or DP: individual clients' metrics are not the server's to show."""
        privacy, secagg = self.config.get("privacy", {}), self.config.get("secagg", {})
        return bool(secagg.get("enabled")) or privacy.get("dp", "none") != "none"

    def poll(self) -> bool:
        """Read what was appended to metrics.jsonl; True if anything new arrived."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return False
        if not self.config:
            self.config = self._config()
        with path.open("rb") as fh:
            size = fh.seek(0, 2)
            if size < self.offset:  # truncated (a resume rewinds the log): read it again
                self.offset, self.rounds, self.clients, self.events, self.names = 0, [], {}, [], {}
            fh.seek(self.offset)
            data = fh.read()
        cut = data.rfind(b"\n") + 1  # only whole lines; a half-written one waits for the next poll
        self.offset += cut
        new = False
        for line in data[:cut].splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            new = True
            kind = record.get("event")
            if kind == "round":
                self.rounds = [r for r in self.rounds if r["round"] != record.get("round")] + [record]
            elif kind == "client":
                self.clients.setdefault(int(record.get("round", 0)), []).append(record)
            elif kind == "sites":
                self.names = {int(k): str(v) for k, v in (record.get("names") or {}).items()}
            elif kind in ("stopped", "personalization", "sharing", "warmup"):
                self.events.append(record)
        return new

    def cohort(self) -> list[dict]:
        """The last round's clients and what became of each."""
        if not self.rounds:
            return []
        last = self.rounds[-1]
        status: dict[int, dict] = {}
        for c in last.get("cohort") or []:
            status[int(c)] = {"client": int(c), "status": "sampled"}
        for rec in self.clients.get(int(last["round"]), []):
            entry = {"client": int(rec["client"]), "status": "trained"}
            if not self.withholds_clients:
                entry["train_loss"] = rec.get("train_loss")
                entry["num_examples"] = rec.get("num_examples")
            status[entry["client"]] = entry
        if self.withholds_clients:  # accepted clients are counted, not listed by their metrics
            for c in status.values():
                if c["status"] == "sampled" and last.get("num_clients"):
                    c["status"] = "in the sum"
        for f in last.get("failed") or []:
            stage = str(f.get("stage", ""))
            kind = "timed out" if stage == "timeout" else "failed"
            status[int(f["client"])] = {"client": int(f["client"]), "status": kind, "stage": stage,
                                        "reason": str(f.get("reason", ""))}  # fmt: skip
        for r in last.get("rejected") or []:
            status[int(r["client"])] = {
                "client": int(r["client"]),
                "status": "rejected",
                "reason": str(r.get("reason", "")),
            }
        for d in last.get("dropped") or []:
            status[int(d["client"])] = {
                "client": int(d["client"]),
                "status": "dropped",
                "reason": str(d.get("reason", "")),
            }
        for k, entry in status.items():
            if k in self.names:
                entry["name"] = self.names[k]
        return [status[k] for k in sorted(status)]

    def timeline(self, last: int = 20) -> dict:
        """Rounds × sites for the last ``last`` rounds: each site's status in each round it was
        sampled (trained, failed, timed out, rejected, dropped; under secure aggregation or DP
        only the failures are the server's to show), with the reason where there is one."""
        rounds = [r for r in self.rounds if r.get("round", 0) > 0][-last:]
        cells: dict[int, dict[int, dict]] = {}
        for r in rounds:
            t = int(r["round"])
            if not self.withholds_clients:
                for rec in self.clients.get(t, []):
                    cells.setdefault(int(rec["client"]), {})[t] = {"status": "trained"}
            for kind in SITE_LISTS:
                for e in r.get(kind) or []:
                    status = "timed out" if e.get("stage") == "timeout" else kind
                    cells.setdefault(int(e["client"]), {})[t] = {
                        "status": status,
                        "reason": str(e.get("reason", "")),
                    }
        sites = sorted(set(cells) | set(self.names))
        return {
            "rounds": [int(r["round"]) for r in rounds],
            "sites": [{"client": k, "name": self.names.get(k)} for k in sites],
            "cells": {str(k): {str(t): v for t, v in cells.get(k, {}).items()} for k in sites},
        }

    def now(self, log: list[dict]) -> str:
        """What the run is doing, in a line: waiting for sites, evaluating, a round, finished."""
        joined = [r for r in log if r.get("event") == "joined"]
        total = self.config.get("partition", {}).get("num_clients")
        if not self.rounds and joined:
            names = sorted({str(r.get("name") or r.get("client")) for r in joined})
            return f"waiting for clients: {len(names)} of {total} joined ({', '.join(names)})"
        said = next((r for r in reversed(log) if r.get("event") in ("status", "joined")), None)
        if said is not None and (not self.rounds or said.get("time", "") >= log[-1].get("time", "")):
            return str(said.get("message", ""))
        return str(log[-1].get("message", "")) if log else ""

    def snapshot(self) -> dict:
        run, privacy = self.config.get("run", {}), self.config.get("privacy", {})
        last = self.rounds[-1] if self.rounds else {}
        log = tail(self.run_dir / "log.jsonl", 30)
        finished = (self.run_dir / "report.html").is_file() and last.get("round") == run.get("rounds")
        left, basis = (None, "finished") if finished else eta(self.rounds, run.get("rounds"))
        return {
            "name": self.run_dir.name,
            "path": str(self.run_dir),
            "rounds_total": run.get("rounds"),
            "round": last.get("round", 0),
            "mode": run.get("mode", "sync"),
            "task": self.config.get("task", {}).get("kind", "classification"),
            "target_epsilon": privacy.get("target_epsilon"),
            "dp": privacy.get("dp", "none"),
            "eta_s": left,
            "eta_basis": basis,
            "now": "" if finished else self.now(log),
            "timeline": self.timeline(),
            "withholds_clients": self.withholds_clients,
            "names": {str(k): v for k, v in sorted(self.names.items())},
            "history": [{k: r.get(k) for k in ROUND_KEYS if k in r} for r in self.rounds],
            "cohort": self.cohort(),
            "generations": last.get("generations")
            or next((r["generations"] for r in reversed(self.rounds) if r.get("generations")), []),
            "events": self.events[-5:],
            "log": [{k: r.get(k) for k in ("time", "level", "message")} for r in log[-12:]],
            "finished": finished,
        }
