"""Secure aggregation: Shamir sharing, masking, dropouts, and the fixed-point packing."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedfm.privacy import packing
from fedfm.privacy.secagg import (
    SecAggClient,
    SecAggError,
    SecAggParams,
    neighbours,
    shamir_reconstruct,
    shamir_share,
)
from fedfm.privacy.secagg_server import SecAggServer


def protocol(inputs, bits=40, threshold=0.67, k=None, drop_before=(), drop_after=()):
    """Run one round; ``drop_before``: shared keys, never sent a masked input; ``drop_after``:
    sent it, then never answered the unmasking request."""
    n, length = len(inputs), len(inputs[0])
    params = SecAggParams(bits, length, threshold, k, graph_seed=7)
    clients = {u: SecAggClient(u, params) for u in range(n)}
    server = SecAggServer(params)
    roster = server.collect_keys([c.advertise() for c in clients.values()])
    inbox = server.route_shares({u: c.share_keys(roster) for u, c in clients.items()})
    for u, c in clients.items():
        c.receive_shares(inbox[u])
    masked = {}
    for u, c in clients.items():
        if u not in drop_before:
            masked[u] = c.mask(inputs[u])
            assert server.input_problem(masked[u]) is None
            server.collect_input(masked[u])
    request = server.unmask_request()
    responses = [clients[u].unmask(request) for u in request.survivors if u not in drop_after]
    return server.finish(responses, request), masked


def ints(n, length, seed=0, high=1000):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, high, (length,), generator=g) for _ in range(n)]


@settings(max_examples=25, deadline=None)
@given(
    secret=st.integers(min_value=0, max_value=2**256 - 1),
    n=st.integers(min_value=1, max_value=8),
    data=st.data(),
)
def test_any_t_shares_reconstruct_the_secret_and_fewer_do_not(secret, n, data):
    t = data.draw(st.integers(min_value=1, max_value=n))
    shares = shamir_share(secret, t, list(range(n)))
    subset = data.draw(st.lists(st.sampled_from(range(n)), min_size=t, max_size=t, unique=True))
    assert shamir_reconstruct({h: shares[h] for h in subset}, t) == secret
    if t > 1:  # t − 1 shares: interpolating a lower-degree polynomial misses (w.p. ≈ 1 − 2⁻⁵²¹)
        assert shamir_reconstruct({h: shares[h] for h in subset[:-1]}, t - 1) != secret
        with pytest.raises(SecAggError, match="needed"):
            shamir_reconstruct({h: shares[h] for h in subset[:-1]}, t)


def test_hand_computed_shamir_with_threshold_two():
    # f(x) = s + a·x, shares at x = 1, 2: s = 2·f(1) − f(2)
    shares = shamir_share(42, 2, [0, 1])
    assert (2 * shares[0] - shares[1]) % (2**521 - 1) == 42


def test_unmasked_sum_equals_the_plain_sum():
    xs = ints(6, 500)
    total, _ = protocol(xs)
    assert torch.equal(total, sum(xs))


def test_a_single_masked_vector_is_indistinguishable_from_uniform():
    xs = [torch.zeros(40_000, dtype=torch.int64)] + ints(3, 40_000)[1:]
    _, masked = protocol(xs, bits=16)
    y = masked[0].vector.numpy()  # client 0 sent all zeros: only the masks are left
    counts = np.bincount(y >> 10, minlength=64)  # 64 equal bins over [0, 2^16)
    assert stats.chisquare(counts).pvalue > 1e-3
    assert abs(np.corrcoef(y[:-1], y[1:])[0, 1]) < 0.03  # no linear trace of neighbouring entries
    assert not torch.equal(masked[1].vector, xs[1])


@pytest.mark.parametrize("n", [5, 7])
def test_up_to_n_minus_t_dropouts_after_masking_still_recover_the_sum(n):
    t = int(np.ceil(0.67 * n))
    xs = ints(n, 64, seed=n)
    for dropped in itertools.combinations(range(n), n - t):
        total, _ = protocol(xs, drop_after=dropped)
        assert torch.equal(total, sum(xs))


def test_more_dropouts_than_n_minus_t_fail_with_a_reason():
    xs = ints(6, 16)
    with pytest.raises(SecAggError, match="only 3 responded"):
        protocol(xs, drop_after=(0, 1, 2))  # t = ⌈0.67 · 6⌉ = 5 of 6 needed


def test_clients_dropping_before_masking_have_their_pairwise_masks_removed():
    xs = ints(7, 32)
    total, _ = protocol(xs, drop_before=(2, 5), drop_after=())
    assert torch.equal(total, sum(x for i, x in enumerate(xs) if i not in (2, 5)))


def test_secagg_plus_sparse_graph_recovers_the_sum_with_dropouts():
    xs = ints(12, 32)
    graph = neighbours(list(range(12)), 4, graph_seed=7)
    assert all(len(v) == 4 for v in graph.values())
    assert all(u in graph[v] for u in graph for v in graph[u])  # symmetric
    total, _ = protocol(xs, k=4, threshold=0.6, drop_before=(3,))
    assert torch.equal(total, sum(x for i, x in enumerate(xs) if i != 3))


def test_a_client_refuses_to_reveal_both_secrets_of_one_client():
    params = SecAggParams(32, 4, 0.6, None, 1)
    clients = {u: SecAggClient(u, params) for u in range(3)}
    server = SecAggServer(params)
    roster = server.collect_keys([c.advertise() for c in clients.values()])
    inbox = server.route_shares({u: c.share_keys(roster) for u, c in clients.items()})
    for u, c in clients.items():
        c.receive_shares(inbox[u])
    from fedfm.privacy.secagg import UnmaskRequest

    with pytest.raises(SecAggError, match="both surviving and dropped"):
        clients[0].unmask(UnmaskRequest((0, 1, 2), (1,)))


def test_a_malformed_masked_input_is_refused_by_the_server():
    from fedfm.privacy.secagg import MaskedInput

    params = SecAggParams(16, 4, 0.6, None, 1)
    server = SecAggServer(params)
    server.shared = {0}
    assert "length 4" in server.input_problem(MaskedInput(0, torch.zeros(3, dtype=torch.int64)))
    assert "outside" in server.input_problem(MaskedInput(0, torch.full((4,), 1 << 16)))
    assert "without having shared" in server.input_problem(MaskedInput(9, torch.zeros(4, dtype=torch.int64)))


LAYOUT = dict(clip_range=1.0, quantization_bits=16, max_weight=50, max_clients=8)


@settings(max_examples=20, deadline=None)
@given(
    weights=st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=8),
    seed=st.integers(min_value=0, max_value=10_000),
)
def test_packed_sums_unpack_to_the_weighted_sums_within_quantization_error(weights, seed):
    g = torch.Generator().manual_seed(seed)
    ref = {"a": torch.zeros(3, 2), "b": torch.zeros(5)}
    layout = packing.Layout.for_params(ref, control=False, **LAYOUT)
    deltas = [{k: torch.rand(v.shape, generator=g) * 2 - 1 for k, v in ref.items()} for _ in weights]
    losses = [float(i) + 0.5 for i in range(len(weights))]
    total = torch.zeros(layout.length, dtype=torch.int64)
    for d, w, loss in zip(deltas, weights, losses, strict=True):
        total = (total + packing.pack(layout, d, w, loss, g, unclipped=1.0)) & ((1 << layout.bits) - 1)
    sums = packing.unpack(layout, total)
    for k in ref:
        exact = sum(w * d[k] for d, w in zip(deltas, weights, strict=True))
        assert torch.allclose(sums.delta[k], exact, atol=layout.step * sum(weights) + 1e-6)
    assert sums.scalars["weight"] == sum(weights) and sums.scalars["count"] == len(weights)
    assert sums.scalars["loss"] == pytest.approx(sum(w * x for w, x in zip(weights, losses, strict=True)))
    assert sums.scalars["unclipped"] == pytest.approx(0.5 * len(weights))  # Σ (b − ½) with b = 1


def test_stochastic_rounding_is_unbiased():
    layout = packing.Layout.for_params({"x": torch.zeros(20_000)}, control=False, **LAYOUT)
    g = torch.Generator().manual_seed(0)
    value = 0.3 * layout.step  # between two grid points
    v = packing.pack(layout, {"x": torch.full((20_000,), value)}, 1, 0.0, g)
    decoded = packing.unpack(layout, v).delta["x"]
    assert len(decoded.unique()) == 2 and decoded.min() == 0
    assert decoded.max().item() == pytest.approx(layout.step)
    assert decoded.mean().item() == pytest.approx(value, rel=0.05)
