"""The distributed Skellam mechanism: rotation, conditional rounding, integer noise, its RDP bound."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from scipy.special import logsumexp

from fedfm.privacy import accountant, packing, skellam
from fedfm.privacy.skellam import SkellamRound, hadamard, rounded_l2_bound, skellam_rdp


def test_rdp_bound_hand_computed():
    # α = 2, Δ₂ = Δ₁ = 1, μ = 1: 2·1/2 + min((3·1 + 6)/4, 3/2) = 1 + 1.5
    assert skellam_rdp(2, 1.0, 1.0, 1.0) == pytest.approx(2.5)
    # α = 3, Δ₂ = 2, Δ₁ = 4, μ = 100: 3·4/200 + min((5·4 + 24)/40000, 12/200) = 0.06 + 0.0011
    assert skellam_rdp(3, 2.0, 4.0, 100.0) == pytest.approx(0.06 + 44 / 40000)
    with pytest.raises(ValueError, match="integer orders"):
        skellam_rdp(2.5, 1.0, 1.0, 1.0)


@pytest.mark.parametrize("mu", [2.0, 10.0, 100.0])
@pytest.mark.parametrize("order", [2, 3, 5, 10])
def test_rdp_bound_holds_against_the_exact_divergence_in_one_dimension(mu, order):
    """D_α(Sk(μ) + 1 ‖ Sk(μ)) summed exactly from scipy's Skellam pmf must not exceed the bound
    (shift 1: Δ₂ = Δ₁ = 1); at large μ the bound must also be nearly tight."""
    half = mu / 2
    k = np.arange(-int(60 + 20 * math.sqrt(mu)), int(60 + 20 * math.sqrt(mu)))
    log_p = stats.skellam.logpmf(k - 1, half, half)
    log_q = stats.skellam.logpmf(k, half, half)
    exact = logsumexp(order * log_p + (1 - order) * log_q) / (order - 1)
    bound = skellam_rdp(order, 1.0, 1.0, mu)
    assert exact <= bound
    if mu >= 100:  # far above the grid the bound is nearly the exact divergence
        assert bound <= 1.1 * exact


def test_hadamard_is_orthonormal_and_self_inverse():
    x = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = hadamard(x)
    assert y.norm().item() == pytest.approx(x.norm().item())
    assert torch.allclose(hadamard(y), x, atol=1e-12)
    # H_2 = [[1, 1], [1, −1]] / √2
    assert hadamard(torch.tensor([1.0, 0.0], dtype=torch.float64)).tolist() == pytest.approx(
        [2**-0.5, 2**-0.5]
    )
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(torch.zeros(3, dtype=torch.float64))


@settings(max_examples=25, deadline=None)
@given(
    values=st.lists(st.floats(-5, 5), min_size=1, max_size=40),
    scale=st.floats(0.5, 50),
    seed=st.integers(0, 1000),
)
def test_conditional_rounding_never_exceeds_its_bound(values, scale, seed):
    x = torch.tensor(values, dtype=torch.float64) * scale
    d = x.numel()
    bound = rounded_l2_bound(x.norm().item(), d)
    rounded = skellam.conditional_round(x, bound, torch.Generator().manual_seed(seed))
    assert rounded.dtype == torch.int64
    assert rounded.double().norm().item() <= bound + 1e-9
    assert ((rounded.double() - x).abs() < 1).all()


def test_shares_of_n_clients_sum_to_the_planned_variance():
    plan = SkellamRound.plan(1000, 1.0, 2.0, cohort=8, bits=30, wrap_stddevs=8, rotation_seed=3)
    g = torch.Generator().manual_seed(0)
    total = sum(skellam.skellam_noise(20_000, plan.share_variance, g) for _ in range(8))
    assert total.dtype == torch.int64
    assert total.double().var().item() == pytest.approx(8 * plan.share_variance, rel=0.03)
    assert (8 * plan.share_variance) == pytest.approx((plan.scale * 2.0) ** 2)  # σ = 2 on the sum


def test_encode_sum_decode_recovers_the_sum_of_updates_plus_noise():
    """Four clients' clipped updates through rotate → round → Skellam → (modular sum) → decode:
    the error is the noise (std σ = z·C per entry), unbiased, and nothing wraps."""
    dim, c, sigma = 300, 1.0, 0.05
    plan = SkellamRound.plan(
        dim, c, sigma, cohort=4, bits=30, wrap_stddevs=8, rotation_seed=11, count_stddev=0.5
    )
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(dim, generator=g, dtype=torch.float64) for _ in range(4)]
    xs = [x * min(1.0, c / x.norm().item()) for x in xs]
    bits = [1.0, 0.0, 1.0, 1.0]
    modulus = 1 << plan.bits
    total = torch.zeros(plan.length, dtype=torch.int64)
    for x, b in zip(xs, bits, strict=True):
        total = (total + plan.encode(x, b, g)) % modulus
    centred = torch.where(total >= modulus // 2, total - modulus, total)
    summed, count = plan.decode(centred)
    error = summed - sum(xs)
    assert error.abs().mean().item() == pytest.approx(sigma * math.sqrt(2 / math.pi), rel=0.2)
    assert abs(error.mean().item()) < 4 * sigma / math.sqrt(dim)
    assert count == pytest.approx(sum(bits) - 2, abs=5 * plan.scale * sigma / plan.bit_scale)


def test_sensitivity_covers_replacing_one_client():
    plan = SkellamRound.plan(
        100, 1.0, 1.0, cohort=4, bits=30, wrap_stddevs=8, rotation_seed=0, count_stddev=1.0
    )
    l2, l1 = plan.sensitivity()
    assert l2 == pytest.approx(math.hypot(2 * plan.l2_bound, plan.bit_scale))
    assert l1 == pytest.approx(
        2 * plan.l2_bound * min(math.sqrt(plan.padded), plan.l2_bound) + plan.bit_scale
    )
    # far above the grid, the mechanism is the Gaussian one: per-round RDP ≈ α·(2C)²/(2σ²) + count
    entry = plan.charge(4)
    gaussian = 2 * (4 / (2 * 1.0) + (plan.bit_scale / (plan.scale * 1.0)) ** 2 / 2)
    assert skellam_rdp(2, entry["l2"], entry["l1"], entry["variance"]) == pytest.approx(gaussian, rel=1e-3)


def test_epsilon_composes_rounds_and_fewer_shares_cost_more():
    plan = SkellamRound.plan(100, 1.0, 3.0, cohort=10, bits=30, wrap_stddevs=8, rotation_seed=0)
    full, half = plan.charge(10), plan.charge(5)
    one = skellam.epsilon([full], 1e-5)
    assert skellam.epsilon([full] * 4, 1e-5) > one > 0
    assert skellam.epsilon([half], 1e-5) > one
    sampling = accountant.Sampling("fixed", 10, 10, 1.0)
    assert accountant.epsilon([full] * 4, 1e-5, "rdp", sampling) == skellam.epsilon([full] * 4, 1e-5)


def test_layout_carries_the_skellam_vector_and_no_loss():
    ref = {"a": torch.zeros(5, 4), "b": torch.zeros(7)}
    plan = SkellamRound.plan(27, 1.0, 0.5, cohort=2, bits=30, wrap_stddevs=8, rotation_seed=0)
    layout = packing.Layout.for_params(
        ref, False, clip_range=1.0, quantization_bits=16, max_weight=1, max_clients=2, skellam=plan
    )
    assert layout.bits == 30 and layout.length == 32 + 1
    g = torch.Generator().manual_seed(0)
    delta = {"a": torch.full((5, 4), 0.1), "b": torch.full((7,), -0.1)}
    v = packing.pack(layout, delta, 1, 0.7, g, unclipped=1.0, noise=g)
    sums = packing.unpack(layout, v & ((1 << layout.bits) - 1))
    assert math.isnan(sums.scalars["loss"]) and sums.scalars["count"] == 1
    assert torch.allclose(sums.delta["a"], delta["a"], atol=0.5 * 6)
    with pytest.raises(ValueError, match="noise generator"):
        packing.pack(layout, delta, 1, 0.7, g, unclipped=1.0)
