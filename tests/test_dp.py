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


def test_clients_that_clip_send_their_bit_and_nothing_else():
    delta = {"x": torch.tensor([3.0, 4.0])}
    clipped, bit = client_half(delta, DpRound(1.0, adaptive=True))
    assert bit == 0.0 and clipped["x"].tolist() == pytest.approx([0.6, 0.8])
    assert client_half(delta, DpRound(10.0))[1] == 1.0


def fixed(n, m):
    return accountant.Sampling("fixed", n, m, m / n)


def autodp_rdp(sigma: float, q: float, poisson: bool):
    """RDP of a subsampled Gaussian from autodp (Wang et al. 2019 / Zhu & Wang 2019): an
    implementation independent of dp-accounting. ``sigma`` is noise over sensitivity."""
    from autodp import rdp_acct, rdp_bank

    acct = rdp_acct.anaRDPacct()
    mech = lambda a: rdp_bank.RDP_gaussian({"sigma": sigma}, a)  # noqa: E731
    if q >= 1:
        acct.compose_mechanism(mech)
    elif poisson:
        acct.compose_poisson_subsampled_mechanisms(mech, q)
    else:
        acct.compose_subsampled_mechanism(mech, q, improved_bound_flag=True)
    acct.build_zeroth_oracle()
    return acct


FINE_ORDERS = [1 + x / 100 for x in range(2, 1500)] + list(range(16, 513))
INTEGER_ORDERS = list(range(2, 257))


def rdp_to_epsilon(rdp, delta: float, orders=INTEGER_ORDERS) -> float:
    """Hand-written RDP → (ε, δ) (Canonne, Kamath, Steinke 2020, Prop. 12; also dp-accounting's)."""
    return min(rdp(a) + math.log1p(-1 / a) - math.log(delta * a) / (a - 1) for a in orders)


def test_fixed_cohorts_are_charged_for_replacing_one_client_sensitivity_2c():
    """100 clients, 10 per round, z = σ/C = 1.2, 50 rounds, δ = 1e-5. Replacing one client's
    clipped update by another moves the sum by up to 2C, so the Gaussian relative to the
    sensitivity has σ / 2C = 0.6; autodp's sampled-without-replacement bound (Wang, Balle,
    Kasiviswanathan 2019) at σ = 0.6 gives ε ≈ 24, not the 7.7 that σ / C = 1.2 would."""
    ours = accountant.epsilon([{"noise_multiplier": 1.2}] * 50, 1e-5, "rdp", fixed(100, 10))
    independent = autodp_rdp(1.2 / 2, 0.1, poisson=False)
    expected = rdp_to_epsilon(lambda a: 50 * independent.evalRDP(a), 1e-5)
    assert ours == pytest.approx(expected, rel=0.01)
    assert 22 < ours < 26  # and not 7.7
    acc = rdp_privacy_accountant.RdpAccountant(neighboring_relation=REL.REPLACE_ONE)
    acc.compose(fixed(100, 10).event(1.2), 1)
    for order, rdp in zip(acc._orders, acc._rdp, strict=True):
        if order == int(order) and 2 <= order <= 128:
            assert rdp == pytest.approx(independent.evalRDP(order), rel=1e-6), order


def test_full_participation_is_a_plain_gaussian_on_sensitivity_2c():
    """Every client every round (m = N) under replace-one: RDP α (2C)² / (2σ²) = 2α / z² per round,
    derived by hand, converted by hand."""
    z, rounds = 3.0, 20
    ours = accountant.epsilon([{"noise_multiplier": z}] * rounds, 1e-5, "rdp", fixed(10, 10))
    by_hand = rdp_to_epsilon(lambda a: rounds * 2 * a / z**2, 1e-5, FINE_ORDERS)
    assert ours == pytest.approx(by_hand, rel=0.01)


def test_poisson_cohorts_match_an_independent_accountant():
    poisson = accountant.Sampling("poisson", 100, 10, 0.1)
    ours = accountant.epsilon([{"noise_multiplier": 1.1}] * 30, 1e-5, "rdp", poisson)
    # autodp's Poisson bound is Zhu & Wang's general one (any mechanism): an upper bound, a little loose
    upper = rdp_to_epsilon(lambda a: 30 * autodp_rdp(1.1, 0.1, poisson=True).evalRDP(a), 1e-5)
    assert ours <= upper <= 1.05 * ours
    pld = pld_privacy_accountant.PLDAccountant(REL.ADD_OR_REMOVE_ONE, 1e-3)
    pld.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.1)), 30)
    assert accountant.epsilon([{"noise_multiplier": 1.1}] * 30, 1e-5, "pld", poisson) == pytest.approx(
        pld.get_epsilon(1e-5)
    )
    assert accountant.epsilon([], 1e-5, "rdp", poisson) == 0.0


def test_calibrated_noise_meets_the_target_by_an_independent_accountant():
    z = accountant.calibrate_noise(8.0, 1e-5, 50, "rdp", fixed(100, 10))
    independent = autodp_rdp(z / 2, 0.1, poisson=False)
    eps = rdp_to_epsilon(lambda a: 50 * independent.evalRDP(a), 1e-5)
    assert 7.8 < eps < 8.05 and z > 2.0  # σ/C ≈ 1.16 was "enough" before the fix


def test_calibration_reaches_the_target_from_below():
    z = accountant.calibrate_noise(4.0, 1e-5, 10, "rdp", fixed(50, 10))
    eps = accountant.epsilon([{"noise_multiplier": z}] * 10, 1e-5, "rdp", fixed(50, 10))
    assert 3.99 <= eps <= 4.0


def test_run_epsilon_equals_an_independent_accountant_for_the_mechanism_that_ran(tiny_config, tmp_path):
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
    independent = autodp_rdp(0.9 / 2, 3 / 8, poisson=False)  # σ/(2C): replace-one, 3 of 8 per round
    for r in rounds[1:]:
        expected = rdp_to_epsilon(lambda a, t=r["round"]: t * independent.evalRDP(a), 1e-4)
        assert r["epsilon"] == pytest.approx(expected, rel=0.01)
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
        privacy={"dp": "example", "noise_multiplier": 1.2, "clip_norm": 1.0, "noise_seed": 5},
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
