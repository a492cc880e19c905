"""What the server of a DP run does for privacy, in one object the round loop calls.

* **Noise and cohorts** come from the run's ``NoiseSource``: the OS CSPRNG unless
  ``privacy.noise_seed`` is set (then the console, the metrics and the report say that the
  guarantee does not hold against anyone who knows the seed). A deployment with a seed also keys
  every draw with a 256-bit secret in ``RUN/noise.key`` (``fedfm.seeding.noise_key``), so the
  per-client seeds it hands out reveal neither the seed nor anyone else's noise.
* **Client-level DP** (``PrivacyPlan``): central Gaussian noise on server-clipped updates or on
  unmasked sums, or distributed Skellam noise; adaptive clipping; the ledger and the budget.
* **Example-level DP** (DP-SGD): every client states the z, q and steps it ran; the server
  checks them against the mechanism it configured and keeps its own accountant per client.
* **Releases are charged before they happen.** Just before a noisy value is formed (the noised
  aggregate, the unmasking of a distributed-noise sum, a DP-SGD update received) the charge is
  appended to a write-ahead file beside the checkpoint and fsynced. A run that crashes after a
  release but before its checkpoint finds the charge there when it resumes and keeps it: the
  resumed round's fresh noise is a second release, and ε counts both. With a noise seed the
  resumed round repeats the first release exactly, so nothing extra is charged.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from fedfm.privacy import dp, dpsgd
from fedfm.privacy.guarantees import SEEDED, dp_mode
from fedfm.privacy.plan import PrivacyPlan
from fedfm.privacy.secagg import SecAggError
from fedfm.seeding import NoiseSource
from fedfm.types import Params

WAL = "privacy-wal.jsonl"
SEEDED_WARNING = f"privacy.noise_seed is set: the noise and the DP cohorts are reproducible; {SEEDED}"


class ReleaseRefused(SecAggError):
    """Unmasking this round's sum would pass the privacy budget (fewer noise shares than planned):
    the server refuses to unmask, so nothing is released and nothing charged."""


class RunPrivacy:
    """The DP side of one run: noise source, client- or example-level mechanism, write-ahead charges."""

    def __init__(
        self, cfg, num_clients: int, cohort: int, dim: int, checkpoint: Path, note=print, key=None
    ) -> None:
        """``key``: the run's noise key (``fedfm.seeding.noise_key``) when the noise is seeded."""
        p = cfg.privacy
        self.cfg = cfg
        self.noise = NoiseSource(p.noise_seed, key=key if p.noise_seed is not None else None)
        self.wal = Path(checkpoint) / WAL
        self.attempt = uuid.uuid4().hex[:12]  # this process: its releases are distinct from a crashed one's
        mode = dp_mode(cfg)
        self.plan = PrivacyPlan(cfg, num_clients, cohort, dim, note=note) if mode.client_level else None
        self.example = None
        if mode.example_level:
            self.example = dpsgd.ExampleDp(
                p.clip_norm, p.delta, cfg.run.rounds, p.noise_multiplier, p.target_epsilon
            )

    # ------------------------------------------------------------ state and resume

    def initial_state(self) -> dict:
        if self.plan is not None:
            return self.plan.initial_state()
        return {"clients": {}, "epsilon": {}}

    def resume(self, state: dict, saved_round: int, repeatable: bool = True) -> list[dict]:
        """Charges of releases made after the checkpoint (a crash mid-round); they stay charged
        unless the noise is seeded and the round ``repeatable`` (a simulation reruns it exactly;
        remote clients' updates differ, so the same noise on another sum is a new release).
        Every crashed attempt's releases count; within one attempt a release is charged once."""
        by_release = {}  # (attempt, round, client or None) → the last charge written for it
        for c in self._read_wal():
            if c.get("round", 0) > saved_round:
                by_release[(c.get("attempt"), c["round"], c.get("client"))] = c
        lost = list(by_release.values())
        if (self.noise.reproducible and repeatable) or not lost:
            return []
        for charge in lost:
            charge = {**charge, "lost": True}
            if "client" in charge:
                self._charge_example(state, str(charge["client"]), charge["dpsgd"])
            else:
                state["ledger"].append(charge)
        return lost

    def checkpointed(self) -> None:
        """The checkpoint now holds every charge: empty the write-ahead file."""
        self.wal.unlink(missing_ok=True)

    def _write_ahead(self, charge: dict) -> None:
        self.wal.parent.mkdir(parents=True, exist_ok=True)
        with self.wal.open("a") as fh:
            fh.write(json.dumps({**charge, "attempt": self.attempt}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _read_wal(self) -> list[dict]:
        if not self.wal.is_file():
            return []
        out = []
        for line in self.wal.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by the crash: its release had not happened yet
        return out

    # ------------------------------------------------------------ what the round loop asks

    def cohort_rng(self, t: int):
        return self.noise.numpy(t, "cohort")

    def client_settings(self, state: dict):
        if self.plan is not None:
            return self.plan.client_settings(state)
        return self.example

    def budget_problem(self, state: dict, t: int) -> str | None:
        return self.plan.budget_problem(state, t) if self.plan is not None else None

    def skellam_round(self, state: dict, cohort_size: int, rotation_seed: int):
        if self.plan is None or not self.plan.distributed:
            return None
        return self.plan.skellam_round(state, cohort_size, rotation_seed)

    def before_release(self, state: dict, t: int, contributors: int, skellam=None) -> None:
        """Write the charge of round t's release ahead of forming it (client-level DP). A
        distributed round with fewer noise shares than planned may cost more than the budget
        allows: then nothing is released (``ReleaseRefused``)."""
        entry = {"round": t, **self.plan.entry(state, max(contributors, 1), skellam)}
        target = self.cfg.privacy.target_epsilon
        if self.plan.distributed and target is not None:
            after = self.plan.epsilon([*state["ledger"], entry])
            if after > target * (1 + 1e-9):
                raise ReleaseRefused(
                    f"unmasking would raise ε to {after:.3f} (only {contributors} noise shares), over "
                    f"privacy.target_epsilon = {target}; nothing was unmasked"
                )
        self._write_ahead(entry)

    def aggregate_updates(self, state: dict, t: int, deltas) -> tuple[Params | None, dict]:
        """Central DP without secure aggregation: the server clips each update and counts its bits."""
        total, centred_count, n = dp.server_sums(deltas, state["clip_norm"])
        if total is None:
            return None, state
        return self.aggregate_sums(state, t, total, centred_count, n)

    def aggregate_sums(
        self, state: dict, t: int, total: Params, centred_count: float, contributors: int, skellam=None
    ) -> tuple[Params, dict]:
        """The noised fixed-denominator mean from sums; a new privacy state (ledger, C)."""
        new = {"ledger": list(state["ledger"]), "clip_norm": state["clip_norm"]}
        self.before_release(state, t, contributors, skellam)
        generator = self.noise.generator(t, "dp-server")
        aggregate = self.plan.server_half(new, t, total, centred_count, contributors, generator, skellam)
        return aggregate, new

    def charge_skipped(self, state: dict, t: int, contributors: int, skellam=None) -> None:
        """A round whose noisy values were formed and then not used is charged all the same."""
        if self.plan is not None:
            self.plan.charge(state, t, max(contributors, 1), skellam)

    # ------------------------------------------------------------ example level (DP-SGD)

    def example_problem(self, metrics, num_examples: int | None, training) -> str | None:
        return dpsgd.report_problem(
            self.example, metrics, num_examples, training.batch_size, training.steps_for
        )

    def vet_and_charge(self, state: dict, t: int, client_id: int, metrics, num_examples=None) -> str | None:
        """DP-SGD: the mechanism a client states it ran must be the configured one; a matching
        statement is charged to that client in the server's own accountant (a release happened)."""
        if num_examples is not None and (not isinstance(num_examples, int) or num_examples <= 0):
            return None  # validation names that
        problem = self.example_problem(metrics, num_examples, self.cfg.training)
        if problem is None:
            self.charge_example(state, t, client_id, metrics)
        return problem

    def charge_example(self, state: dict, t: int, client_id: int, metrics) -> None:
        """Record one accepted DP-SGD update in the server's own accountant for that client."""
        run = [
            float(metrics["dp_noise_multiplier"]),
            float(metrics["dp_sample_rate"]),
            int(metrics["dp_steps"]),
        ]
        self._write_ahead({"round": t, "client": client_id, "dpsgd": run})
        self._charge_example(state, str(client_id), run)

    def _charge_example(self, state: dict, key: str, run: list) -> None:
        history = state["clients"].setdefault(key, [])
        history.append(run)
        state["epsilon"][key] = dpsgd.server_epsilon(history, self.cfg.privacy.delta)

    # ------------------------------------------------------------ reporting

    def record(self, state: dict) -> dict:
        out = {"noise": "seeded" if self.noise.reproducible else "secure"}
        if self.plan is not None:
            return {**self.plan.record(state), **out}
        p = self.cfg.privacy
        zs = [run[0] for runs in state["clients"].values() for run in runs]
        return {
            "dp": "example",
            "epsilon": max(state["epsilon"].values(), default=0.0),
            "delta": p.delta,
            "noise_multiplier": min(zs) if zs else (p.noise_multiplier or 0.0),
            "clip_norm": p.clip_norm,
            **out,
        }
