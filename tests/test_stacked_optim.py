"""Stacked optimizers and per-row adapters against torch's own, client by client."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfm.algorithms.stacked_optim import StackedAdamW, StackedSGD, clip_grad_norm
from fedfm.models.multilora import Segments, collate, segment_dropout, segment_linear

SETTINGS = settings(max_examples=25, deadline=None)


def _torch_optimizer(kind, params, lr, wd, momentum):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


@SETTINGS
@given(
    kind=st.sampled_from(["adamw", "sgd"]),
    k=st.integers(1, 4),
    steps=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    wd=st.sampled_from([0.0, 0.1]),
    momentum=st.sampled_from([0.0, 0.9]),
)
def test_each_slice_moves_as_its_own_torch_optimizer_and_masked_slices_not_at_all(
    kind, k, steps, seed, wd, momentum
):
    gen = torch.Generator().manual_seed(seed)
    start = {"w": torch.randn(k, 3, 2, generator=gen), "b": torch.randn(k, 2, generator=gen)}
    grads = [{key: torch.randn(v.shape, generator=gen) for key, v in start.items()} for _ in range(steps)]
    active = torch.rand(steps, k, generator=gen) < 0.7  # a client skipped in a step is masked out
    stacks = {key: v.clone().requires_grad_(True) for key, v in start.items()}
    opt = StackedSGD(stacks, 0.1, momentum, wd) if kind == "sgd" else StackedAdamW(stacks, 0.1, wd)
    for t in range(steps):
        for key, s in stacks.items():
            s.grad = grads[t][key].clone()
        opt.step(active[t])
    for j in range(k):
        alone = {key: v[j].clone().requires_grad_(True) for key, v in start.items()}
        ref = _torch_optimizer(kind, list(alone.values()), 0.1, wd, momentum)
        for t in range(steps):
            if not active[t, j]:
                continue  # the client did not step: torch's optimizer is not called either
            for key, p in alone.items():
                p.grad = grads[t][key][j].clone()
            ref.step()
        for key, p in alone.items():
            torch.testing.assert_close(stacks[key][j].detach(), p.detach(), rtol=1e-6, atol=1e-7)


def test_clipping_is_per_client_like_clip_grad_norm():
    gen = torch.Generator().manual_seed(0)
    stacks = {"a": torch.zeros(3, 4, requires_grad=True), "b": torch.zeros(3, 2, 2, requires_grad=True)}
    for s in stacks.values():
        s.grad = 3 * torch.randn(s.shape, generator=gen)
    expected = []
    for j in range(3):
        own = [torch.zeros_like(s[j], requires_grad=True) for s in stacks.values()]
        for p, s in zip(own, stacks.values(), strict=True):
            p.grad = s.grad[j].clone()
        torch.nn.utils.clip_grad_norm_(own, 1.0)
        expected.append([p.grad for p in own])
    clip_grad_norm(stacks, 1.0)
    for j in range(3):
        for got, want in zip([s.grad[j] for s in stacks.values()], expected[j], strict=True):
            torch.testing.assert_close(got, want)


@SETTINGS
@given(
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=4), seed=st.integers(0, 2**16), bias=st.booleans()
)
def test_segment_linear_is_each_rows_own_linear_layer(sizes, seed, bias):
    gen = torch.Generator().manual_seed(seed)
    m, n = len(sizes), sum(sizes)
    x = torch.randn(n, 5, 3, generator=gen)
    w = torch.randn(m, 2, 3, generator=gen)
    b = torch.randn(m, 2, generator=gen) if bias else None
    seg = Segments(torch.arange(m), tuple(sizes), (5,) * m, every_slot=True)
    out = segment_linear(x, w, b, seg)
    rows = torch.cat([torch.full((s,), j) for j, s in enumerate(sizes)])
    for i in range(n):
        j = int(rows[i])
        want = torch.nn.functional.linear(x[i], w[j], None if b is None else b[j])
        torch.testing.assert_close(out[i], want, rtol=1e-5, atol=1e-6)


def test_segment_dropout_draws_each_clients_masks_as_f_dropout_does_alone():
    x = torch.ones(5, 4, 3)  # two clients: 2 rows of width 3 (padded to 4) and 3 rows of width 4
    gens = (torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
    seg = Segments(torch.arange(2), (2, 3), (3, 4), gens)
    out = segment_dropout(x, 0.5, seg)
    torch.manual_seed(1)
    first = torch.nn.functional.dropout(torch.ones(2, 3, 3), 0.5, training=True)
    torch.manual_seed(2)
    second = torch.nn.functional.dropout(torch.ones(3, 4, 3), 0.5, training=True)
    assert torch.equal(out[:2, :3], first) and torch.equal(out[2:], second)
    assert torch.equal(out[:2, 3:], x[:2, 3:])  # padding positions pass through


def test_collate_pads_to_the_widest_with_each_keys_pad_value():
    a = {"input_ids": torch.tensor([[5, 6]]), "labels": torch.tensor([[1, 2]])}
    b = {"input_ids": torch.tensor([[7, 8, 9]]), "labels": torch.tensor([[3, 4, 5]])}
    out = collate([a, b], {"input_ids": 0, "labels": -100})
    assert out["input_ids"].tolist() == [[5, 6, 0], [7, 8, 9]]
    assert out["labels"].tolist() == [[1, 2, -100], [3, 4, 5]]
    with pytest.raises(KeyError):
        collate([a, b], {"input_ids": 0})
