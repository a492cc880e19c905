"""Client-level DP: clipping, noise, adaptive clipping and accounting against dp-accounting itself."""

import json
import math

import dp_accounting
import pytest
import torch
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from hypothesis import given, settings
from hypothesis import strategies as st

import fedfm
from fedfm.privacy import accountant, dp
from fedfm.privacy.dp import DpRound, adapt_clip, client_half, clip, split_noise

REL = dp_accounting.NeighboringRelation


def test_clip_hand_computed():
    delta = {"a": torch.tensor([3.0]), "b": torch.tensor([[4.0]])}  # ‖Δ‖ = 5
    clipped, norm = clip(delta, 1.0)
    assert norm == 5.0
    assert clipped["a"].item() == pytest.approx(0.6) and clipped["b"].item() == pytest.approx(0.8)
    same, _ = clip(delta, 10.0)
    assert torch.equal(same["a"], delta["a"])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=20), st.floats(1e-3, 1e3))
def test_clipped_norm_never_exceeds_c(values, c):
    clipped, _ = clip({"x": torch.tensor(values, dtype=torch.float64)}, c)
    assert dp.global_norm(clipped) <= c * (1 + 1e-9)


def test_adaptive_clipping_moves_towards_the_quantile():
    # Andrew et al.: C · exp(−η (b̄ − γ)); all unclipped (b̄ = 1) with γ = 0.5, η = 0.2 → C · e^(−0.1)
    assert adapt_clip(2.0, 1.0, 0.5, 0.2) == pytest.approx(2.0 * math.exp(-0.1))
    assert adapt_clip(2.0, 0.0, 0.5, 0.2) == pytest.approx(2.0 * math.exp(0.1))
    assert adapt_clip(2.0, 0.5, 0.5, 0.2) == 2.0


def test_noise_split_between_update_and_count():
    # z = 1, σ_b = 1: z_Δ = (1 − 1/4)^(−1/2)
    assert split_noise(1.0, 1.0) == pytest.approx((1 - 0.25) ** -0.5)
    assert split_noise(1.0, None) == 1.0
    with pytest.raises(ValueError, match="2·σ_b > z"):
        split_noise(4.0, 1.0)


def test_distributed_noise_shares_have_the_configured_spread():
    g = torch.Generator().manual_seed(0)
    delta = {"x": torch.zeros(50_000)}
    noisy, unclipped = client_half(delta, DpRound(1.0, delta_noise_share=0.5), g)
    assert unclipped == 1.0
    assert noisy["x"].std().item() == pytest.approx(0.5, rel=0.02)


def fixed(n, m):
    return accountant.Sampling("fixed", n, m, m / n)


def test_epsilon_matches_dp_accounting_for_fixed_and_poisson_sampling():
    ledger = [{"noise_multiplier": 1.1}] * 30
    ours = accountant.epsilon(ledger, 1e-5, "rdp", fixed(100, 10))
    rdp = rdp_privacy_accountant.RdpAccountant(neighboring_relation=REL.REPLACE_ONE)
    gauss = dp_accounting.GaussianDpEvent(1.1)
    rdp.compose(dp_accounting.SampledWithoutReplacementDpEvent(100, 10, gauss), 30)
    assert ours == rdp.get_epsilon(1e-5)
    poisson = accountant.Sampling("poisson", 100, 10, 0.1)
    pld = pld_privacy_accountant.PLDAccountant(REL.ADD_OR_REMOVE_ONE, 1e-3)
    pld.compose(dp_accounting.PoissonSampledDpEvent(0.1, gauss), 30)
    assert accountant.epsilon(ledger, 1e-5, "pld", poisson) == pytest.approx(pld.get_epsilon(1e-5))
    assert accountant.epsilon([], 1e-5, "rdp", poisson) == 0.0


def test_calibration_reaches_the_target_from_below():
    z = accountant.calibrate_noise(4.0, 1e-5, 10, "rdp", fixed(50, 10))
    eps = accountant.epsilon([{"noise_multiplier": z}] * 10, 1e-5, "rdp", fixed(50, 10))
    assert 3.99 <= eps <= 4.0


def test_run_epsilon_equals_dp_accounting_for_the_same_mechanism(tiny_config, tmp_path):
    cfg = tiny_config(
        run={"rounds": 3},
        partition={"num_clients": 8},
        sampling={"clients_per_round": 3},
        strategy={"weighting": "uniform"},
        privacy={"dp": "client", "noise_multiplier": 0.9, "delta": 1e-4},
    )
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    rounds = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rounds if r["event"] == "round"]
    for r in rounds[1:]:
        acc = rdp_privacy_accountant.RdpAccountant(neighboring_relation=REL.REPLACE_ONE)
        event = dp_accounting.SampledWithoutReplacementDpEvent(8, 3, dp_accounting.GaussianDpEvent(0.9))
        acc.compose(event, r["round"])
        assert r["epsilon"] == pytest.approx(acc.get_epsilon(1e-4), rel=1e-12)
    assert rounds[-1]["num_clients"] == 3


def test_poisson_sampling_runs_with_the_pld_accountant(tiny_config, tmp_path):
    cfg = tiny_config(
        run={"rounds": 2},
        partition={"num_clients": 8},
        sampling={"method": "poisson", "fraction": 0.5},
        strategy={"weighting": "uniform"},
        privacy={"dp": "client", "noise_multiplier": 1.0, "accountant": "pld"},
    )
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    pld = pld_privacy_accountant.PLDAccountant(REL.ADD_OR_REMOVE_ONE, 1e-3)
    pld.compose(dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(1.0)), 2)
    assert result.final_metrics["epsilon"] == pytest.approx(pld.get_epsilon(1e-5))


def test_example_level_dp_sgd_runs_through_opacus_and_resumes(tiny_config, tmp_path):
    from opacus.accountants import RDPAccountant

    cfg = tiny_config(
        run={"rounds": 3},
        privacy={"dp": "example", "noise_multiplier": 1.2, "clip_norm": 1.0},
    )
    full = fedfm.run(cfg, output=tmp_path / "full", progress=False)
    lines = [json.loads(x) for x in (full.run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in lines if r["event"] == "round"]
    clients = [r for r in lines if r["event"] == "client"]
    assert all(r["dp"] == "example" for r in rounds) and rounds[1]["epsilon"] < rounds[3]["epsilon"]
    # every client is in every round: 3 rounds of 3 steps at q = B / n_k, as Opacus' own accountant says
    c0 = [c for c in clients if c["client"] == 0]
    acc = RDPAccountant()
    acc.history = [(1.2, 8 / 17, 3)] * 3  # client 0 holds 17 rows (iid split of 68)
    assert c0[-1]["dp_epsilon"] == pytest.approx(acc.get_epsilon(1e-5))
    assert "example-level" in (full.run_dir / "report.html").read_text()
    short = fedfm.run({**cfg, "run": {**cfg["run"], "rounds": 1}}, output=tmp_path / "p", progress=False)
    resumed = fedfm.run(resume=short.run_dir, overrides=["run.rounds=3"], progress=False)
    assert resumed.final_metrics["epsilon"] == full.final_metrics["epsilon"]
    assert resumed.final_metrics["test_loss"] == full.final_metrics["test_loss"]


def test_example_level_budget_makes_clients_refuse(tiny_config, tmp_path):
    cfg = tiny_config(run={"rounds": 2}, privacy={"dp": "example", "target_epsilon": 3.0})
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    assert 0 < result.final_metrics["epsilon"] <= 3.0 * 1.001
    more = fedfm.run(resume=result.run_dir, overrides=["run.rounds=3"], progress=False)
    last = [json.loads(x) for x in (more.run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["round"] == 3 and last["num_clients"] == 0
    assert all("PrivacyBudgetExhausted" in f["reason"] for f in last["failed"])


def test_example_level_dp_with_secure_aggregation_still_reports_client_epsilon(tiny_config, tmp_path):
    cfg = tiny_config(
        run={"rounds": 1},
        privacy={"dp": "example", "noise_multiplier": 1.0},
        secagg={"enabled": True},
    )
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    assert result.final_metrics["num_clients"] == 4 and result.final_metrics["epsilon"] > 0
