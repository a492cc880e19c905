"""The server's privacy bookkeeping for one run: noise calibration, clip norm, ledger, budget.

State is a plain dict inside the checkpoint (``{"ledger": [...], "clip_norm": C}``), so a
resumed run recomputes exactly the ε of an uninterrupted one. Every round the mechanism runs is
charged, including a round that is then skipped (conservative: its counts were still seen).

Three ways a round reaches its noisy aggregate (``privacy.noise`` × ``secagg.enabled``):

* central, no secure aggregation: the server clips each update, computes each clipped bit itself
  and adds Gaussian noise (no client-reported value enters the mechanism);
* central, secure aggregation: clients clip (to C minus the fixed-point rounding slack, so the
  encoded vector's norm stays ≤ C) and the server adds Gaussian noise to the unmasked sums;
* distributed: clients clip, rotate, quantise and add Skellam shares (``fedfm.privacy.skellam``);
  the unmasked sum is already noisy.
"""

from __future__ import annotations

import math

import torch

from fedfm.privacy import accountant, dp
from fedfm.privacy.skellam import SkellamRound
from fedfm.types import Params


class PrivacyPlan:
    """Client-level DP-FedAvg settings for a run of N clients and cohorts of (expected) size m."""

    def __init__(self, cfg, num_clients: int, cohort: int, dim: int, note=print) -> None:
        p = cfg.privacy
        self.cfg = p
        self.rounds = cfg.run.rounds
        self.sampling = accountant.Sampling(
            cfg.sampling.method, num_clients, cohort, min(1.0, cohort / num_clients)
        )
        self.cohort, self.dim = cohort, dim
        self.secure = cfg.secagg.enabled
        self.distributed = p.noise == "distributed"
        self.mechanism = "skellam" if self.distributed else "gaussian"
        if p.noise_multiplier is not None:
            self.z = float(p.noise_multiplier)
        else:
            self.z = self._calibrate(p.target_epsilon)
            what = "Skellam, no amplification claimed" if self.distributed else p.accountant.upper()
            note(
                f"privacy: noise multiplier z = {self.z:.4f} calibrated for ε = {p.target_epsilon} at "
                f"δ = {p.delta} over {self.rounds} rounds ({cfg.sampling.method} sampling, "
                f"q = {self.sampling.rate:.4g}, {what})"
            )
        self.count_std = self._count_std(self.z)
        self.z_delta = dp.split_noise(self.z, self.count_std) if self.z > 0 else 0.0

    def _count_std(self, z: float) -> float | None:
        if not self.cfg.adaptive_clipping:
            return None
        # Andrew et al. suggest σ_b = m / 20; at least z keeps z_Δ within 1.155·z when z is large
        return self.cfg.clipped_count_stddev or max(self.cohort / 20, z)

    def _calibrate(self, target: float) -> float:
        p = self.cfg
        if not self.distributed:
            return accountant.calibrate_noise(target, p.delta, self.rounds, p.accountant, self.sampling)

        def eps(z: float) -> float:
            entry = self.skellam_round({"clip_norm": 1.0}, self.cohort, 0, z).charge(self.cohort)
            return accountant.epsilon([entry] * self.rounds, p.delta, "rdp", self.sampling)

        low, high = 0.05, 1e3
        if eps(high) > target:
            raise ValueError(f"no noise multiplier up to {high:g} reaches ε = {target} at δ = {p.delta}")
        for _ in range(60):  # bisection; ε decreases with z
            mid = math.sqrt(low * high)
            low, high = (mid, high) if eps(mid) > target else (low, mid)
        return high

    def initial_state(self) -> dict:
        return {"ledger": [], "clip_norm": float(self.cfg.clip_norm)}

    def client_settings(self, state: dict) -> dp.DpRound | None:
        """What clients are told: the clip norm when they clip (secure aggregation), else nothing."""
        if not self.secure:
            return None
        return dp.DpRound(state["clip_norm"], self.cfg.adaptive_clipping)

    def skellam_round(self, state: dict, cohort_size: int, rotation_seed: int, z: float | None = None):
        """This round's distributed-noise settings for a cohort of ``cohort_size`` clients."""
        z = self.z if z is None else z
        count_std = self._count_std(z)
        z_delta = dp.split_noise(z, count_std)
        c = state["clip_norm"]
        return SkellamRound.plan(
            self.dim,
            c,
            z_delta * c,
            cohort_size,
            self.cfg.distributed_bits,
            self.cfg.wrap_stddevs,
            rotation_seed,
            count_std,
        )

    def epsilon(self, ledger: list[dict]) -> float:
        return accountant.epsilon(ledger, self.cfg.delta, self.cfg.accountant, self.sampling)

    def entry(self, state: dict, contributors: int, skellam: SkellamRound | None = None) -> dict:
        """The ledger entry of one round (without its round number)."""
        if self.distributed:
            return (skellam or self.skellam_round(state, self.cohort, 0)).charge(contributors)
        return {"mechanism": "gaussian", "noise_multiplier": self.z}

    def budget_problem(self, state: dict, round_: int) -> str | None:
        """Why round ``round_`` must not run (it would exceed target_epsilon), or None."""
        if self.cfg.target_epsilon is None:
            return None
        after = self.epsilon([*state["ledger"], self.entry(state, self.cohort)])
        if after <= self.cfg.target_epsilon * (1 + 1e-9):
            return None
        now = self.epsilon(state["ledger"])
        return (
            f"privacy budget: round {round_} would raise ε from {now:.3f} to {after:.3f}, over "
            f"privacy.target_epsilon = {self.cfg.target_epsilon} (δ = {self.cfg.delta}); the run stops "
            f"here with the state after round {round_ - 1} saved"
        )

    def charge(
        self, state: dict, round_: int, contributors: int | None = None, skellam: SkellamRound | None = None
    ) -> dict:
        """Add round ``round_`` to the ledger. Distributed noise is charged for the shares actually in
        the sum (``contributors`` clients of the round's ``skellam`` settings): fewer is weaker."""
        k = self.cohort if contributors is None else contributors
        entry = {"round": round_, **self.entry(state, max(k, 1), skellam)}
        state["ledger"].append(entry)
        return entry

    def server_half(
        self,
        state: dict,
        round_: int,
        delta_sum: Params,
        centred_count: float | None,
        contributors: int,
        generator: torch.Generator,
        skellam: SkellamRound | None = None,
    ) -> Params:
        """(Σ clip(Δ_k) + noise) / m; charge the round; adapt C. Returns the aggregate.

        Central mode adds N(0, (z_Δ·C)²) to the sum and N(0, σ_b²) to the centred count here;
        distributed mode's sums arrive noisy. ``contributors`` is how many clients' values are in
        the sums (the noise shares of distributed mode).
        """
        c = state["clip_norm"]
        central = not self.distributed
        aggregate = dp.noisy_mean(delta_sum, self.cohort, self.z_delta * c if central else 0.0, generator)
        self.charge(state, round_, contributors, skellam)
        if self.cfg.adaptive_clipping:
            if centred_count is None:
                raise ValueError("adaptive clipping needs the clipped-bit count")
            if central:
                noise = float(torch.randn((), generator=generator, dtype=torch.float64))
                centred_count += noise * self.count_std
            fraction = dp.unclipped_fraction(centred_count, self.cohort)
            if fraction is not None:  # a non-finite count leaves C as it was (never NaN)
                state["clip_norm"] = dp.adapt_clip(c, fraction, self.cfg.target_quantile, self.cfg.clip_lr)
        return aggregate

    def record(self, state: dict) -> dict:
        """The per-round metrics: ε so far, δ, z, and the clip norm the next round uses."""
        return {
            "dp": "client",
            "epsilon": self.epsilon(state["ledger"]),
            "delta": self.cfg.delta,
            "noise_multiplier": self.z,
            "clip_norm": state["clip_norm"],
            "mechanism": self.mechanism,
        }
