"""DPO / IPO losses and their metrics against hand computations (fedfm.algorithms.preference)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedfm.algorithms.preference import (
    IGNORE,
    dpo_loss,
    ipo_loss,
    reward_metrics,
    sequence_logprobs,
)


def test_the_dpo_loss_by_hand():
    # h = (−1 − (−2)) − (−3 − (−2.5)) = 1 + 0.5 = 1.5; β·h = 0.15; −log σ(0.15) = log(1 + e^−0.15)
    t = lambda x: torch.tensor([x])  # noqa: E731
    loss = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.5), beta=0.1)
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-0.15)), rel=1e-6)
    assert float(loss) == pytest.approx(0.620957, rel=1e-5)
    # IPO: (h − 1/(2β))² = (1.5 − 5)² = 12.25
    assert float(ipo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.5), beta=0.1)) == pytest.approx(12.25)
    m = reward_metrics(torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -2.0]),
                       torch.tensor([-2.5, -2.0]), beta=0.1)  # fmt: skip
    # pair 1: r_w = 0.1, r_l = −0.05 (right); pair 2: r_w = −0.2, r_l = 0.1 (wrong)
    assert m["reward_accuracy"] == 0.5 and m["reward_margin"] == pytest.approx((0.15 - 0.3) / 2)


def test_a_policy_equal_to_its_reference_has_loss_log_2():
    x = torch.tensor([-5.0, -1.0, -7.5])
    assert float(dpo_loss(x, x - 1, x, x - 1, beta=0.5)) == pytest.approx(math.log(2))


@given(st.floats(-20, 20), st.floats(0.01, 2.0))
def test_dpo_falls_as_the_policy_prefers_the_chosen_reply_more(shift, beta):
    base = dict(policy_rejected=torch.tensor([-3.0]), ref_chosen=torch.tensor([-2.0]),
                ref_rejected=torch.tensor([-3.0]), beta=beta)  # fmt: skip
    low = dpo_loss(torch.tensor([-2.0 + shift]), **base)
    high = dpo_loss(torch.tensor([-2.0 + shift + 0.5]), **base)
    assert float(high) <= float(low) + 1e-7


def test_sequence_logprobs_sum_only_the_reply_tokens_by_hand():
    # vocabulary of 2; logits at t predict the token at t+1
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[IGNORE, 0, 1]])  # the prompt's token carries no loss; replies 0 then 1
    # p(token 0 | t=0) = 1/2; p(token 1 | t=1) = 1/(3+1) = 1/4
    assert float(sequence_logprobs(logits, labels)) == pytest.approx(math.log(0.5) + math.log(0.25))
    masked = torch.tensor([[IGNORE, IGNORE, 1]])
    assert float(sequence_logprobs(logits, masked)) == pytest.approx(math.log(0.25))
