"""The server's privacy bookkeeping for one run: noise calibration, clip norm, ledger, budget.

State is a plain dict inside the checkpoint (``{"ledger": [...], "clip_norm": C}``), so a
resumed run recomputes exactly the ε of an uninterrupted one. Every round the mechanism runs is
charged, including a round that is then skipped (conservative: its counts were still seen).
"""

from __future__ import annotations

import math

import torch

from fedfm.privacy import accountant, dp
from fedfm.types import Params


class PrivacyPlan:
    """Client-level DP-FedAvg settings for a run of N clients and cohorts of (expected) size m."""

    def __init__(self, cfg, num_clients: int, cohort: int, note=print) -> None:
        p = cfg.privacy
        self.cfg = p
        self.rounds = cfg.run.rounds
        self.sampling = accountant.Sampling(
            cfg.sampling.method, num_clients, cohort, min(1.0, cohort / num_clients)
        )
        self.cohort = cohort
        if p.noise_multiplier is not None:
            self.z = float(p.noise_multiplier)
        else:
            self.z = accountant.calibrate_noise(
                p.target_epsilon, p.delta, self.rounds, p.accountant, self.sampling
            )
            note(
                f"privacy: noise multiplier z = {self.z:.4f} calibrated for ε = {p.target_epsilon} at "
                f"δ = {p.delta} over {self.rounds} rounds ({cfg.sampling.method} sampling, "
                f"q = {self.sampling.rate:.4g}, {p.accountant.upper()})"
            )
        self.count_std = None
        if p.adaptive_clipping:
            # Andrew et al. suggest σ_b = m / 20; at least z keeps z_Δ within 1.155·z when z is large
            self.count_std = p.clipped_count_stddev or max(cohort / 20, self.z)
        self.z_delta = dp.split_noise(self.z, self.count_std) if self.z > 0 else 0.0

    def initial_state(self) -> dict:
        return {"ledger": [], "clip_norm": float(self.cfg.clip_norm)}

    def client_settings(self, state: dict) -> dp.DpRound:
        c = state["clip_norm"]
        if self.cfg.noise != "distributed":
            return dp.DpRound(c, adaptive=self.cfg.adaptive_clipping)
        shares = math.sqrt(self.cohort)
        count_share = self.count_std / shares if self.count_std else 0.0
        return dp.DpRound(c, self.z_delta * c / shares, count_share, self.cfg.adaptive_clipping)

    def epsilon(self, ledger: list[dict]) -> float:
        return accountant.epsilon(ledger, self.cfg.delta, self.cfg.accountant, self.sampling)

    def budget_problem(self, state: dict, round_: int) -> str | None:
        """Why round ``round_`` must not run (it would exceed target_epsilon), or None."""
        if self.cfg.target_epsilon is None:
            return None
        after = self.epsilon([*state["ledger"], {"noise_multiplier": self.z}])
        if after <= self.cfg.target_epsilon * (1 + 1e-9):
            return None
        now = self.epsilon(state["ledger"])
        return (
            f"privacy budget: round {round_} would raise ε from {now:.3f} to {after:.3f}, over "
            f"privacy.target_epsilon = {self.cfg.target_epsilon} (δ = {self.cfg.delta}); the run stops "
            f"here with the state after round {round_ - 1} saved"
        )

    def charge(self, state: dict, round_: int, noise_shares: int | None = None) -> None:
        """Add round ``round_`` to the ledger. Distributed noise from fewer than m clients is weaker:
        z·√(k/m) for k shares."""
        z = self.z
        if self.cfg.noise == "distributed" and noise_shares is not None:
            z *= math.sqrt(min(noise_shares, self.cohort) / self.cohort)
        state["ledger"].append({"round": round_, "noise_multiplier": z})

    def server_half(
        self,
        state: dict,
        round_: int,
        delta_sum: Params,
        unclipped_sum: float,
        contributors: int,
        generator: torch.Generator,
    ) -> Params:
        """(Σ clip(Δ_k) + central noise) / m; charge the round; adapt C. Returns the aggregate."""
        c = state["clip_norm"]
        central = self.cfg.noise == "central"
        aggregate = dp.noisy_mean(delta_sum, self.cohort, self.z_delta * c if central else 0.0, generator)
        self.charge(state, round_, contributors)
        if self.cfg.adaptive_clipping:
            if central:
                unclipped_sum += float(torch.randn((), generator=generator, dtype=torch.float64)) * (
                    self.count_std
                )
            fraction = unclipped_sum / self.cohort
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
        }
