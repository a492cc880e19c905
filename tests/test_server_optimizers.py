import math
from dataclasses import dataclass

import pytest
import torch

from fedfm.algorithms.server_optimizers import ServerOptimizer, adam_moment, make_server_optimizer
from fedfm.config import StrategySection

P = {"w": torch.tensor([1.0, -2.0])}
D = {"w": torch.tensor([0.5, 0.1])}


def step(opt, params=P, delta=D, state=None):
    state = opt.init(params) if state is None else state
    return opt.step(params, delta, state)


def test_fedavg_is_theta_plus_delta():
    new, _ = step(make_server_optimizer(StrategySection()))
    torch.testing.assert_close(new["w"], torch.tensor([1.5, -1.9]))


def test_fedavgm_momentum_two_steps():
    opt = make_server_optimizer(StrategySection(server_lr=0.5, server_momentum=0.9))
    p1, s1 = step(opt)  # m = Δ; θ = θ + 0.5Δ
    p2, _ = step(opt, p1, D, s1)  # m = 0.9Δ + Δ = 1.9Δ; θ += 0.95Δ
    torch.testing.assert_close(p2["w"], P["w"] + (0.5 + 0.95) * D["w"])


@pytest.mark.parametrize("name", ["adam", "yogi", "adagrad"])
def test_adaptive_first_step_hand_computed(name):
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    opt = make_server_optimizer(
        StrategySection(server_optimizer=name, server_lr=lr, beta1=b1, beta2=b2, tau=tau)
    )
    new, state = step(opt)
    for i, (p, d) in enumerate(zip([1.0, -2.0], [0.5, 0.1], strict=True)):
        m = (1 - b1) * d
        v0, d2 = tau**2, d * d
        v = {
            "adam": b2 * v0 + (1 - b2) * d2,
            "yogi": v0 - (1 - b2) * d2 * math.copysign(1, v0 - d2),
            "adagrad": v0 + d2,
        }[name]
        assert state["v"]["w"][i].item() == pytest.approx(v, rel=1e-5)
        assert new["w"][i].item() == pytest.approx(p + lr * m / (math.sqrt(v) + tau), rel=1e-5)


def test_state_is_a_value_not_mutated():
    opt = ServerOptimizer("adam", lr=0.1, beta1=0.9, beta2=0.99, second_moment=adam_moment)
    state = opt.init(P)
    before = {k: {n: t.clone() for n, t in v.items()} for k, v in state.items()}
    step(opt, state=state)
    for k in state:
        torch.testing.assert_close(state[k]["w"], before[k]["w"])


def test_a_registered_server_optimizer_decides_the_step():
    """A new rule registered with the public decorator is used as itself (no fall-through to
    another rule): here, a sign-SGD step of fixed size."""
    from fedfm.algorithms.server_optimizers import SERVER_OPTIMIZERS

    @dataclass(frozen=True)
    class SignStep:
        lr: float

        def init(self, params):
            return {}

        def step(self, params, delta, state):
            return {k: p + self.lr * torch.sign(delta[k]) for k, p in params.items()}, state

    if "test-sign" not in SERVER_OPTIMIZERS:
        SERVER_OPTIMIZERS.register("test-sign")(lambda *, lr, **_: SignStep(lr))
    opt = make_server_optimizer(StrategySection(server_optimizer="test-sign", server_lr=0.5))
    new, _ = opt.step({"w": torch.zeros(3)}, {"w": torch.tensor([2.0, -0.1, 0.0])}, opt.init({}))
    assert new["w"].tolist() == [0.5, -0.5, 0.0]


@pytest.mark.parametrize("name", ["sgd", "adam", "yogi", "adagrad"])
def test_statistics_keys_take_the_aggregate_as_it_is(name):
    """BatchNorm statistics (model.batch_norm = "aggregated") are the clients' mean: θ + Δ, never
    an optimizer step; weights beside them still step."""
    from fedfm.algorithms.server_optimizers import SERVER_OPTIMIZERS

    opt = SERVER_OPTIMIZERS.get(name)(lr=0.1, momentum=0.9)
    params = {
        "bn.running_mean": torch.tensor([1.0, 2.0]),
        "bn.running_var": torch.ones(2),
        "w": torch.zeros(2),
    }
    delta = {"bn.running_mean": torch.tensor([0.5, -1.0]), "bn.running_var": torch.tensor([2.0, 0.0]),
             "w": torch.ones(2)}  # fmt: skip
    state = opt.init(params)
    for _ in range(2):
        new, state = opt.step(params, delta, state)
        assert torch.equal(new["bn.running_mean"], params["bn.running_mean"] + delta["bn.running_mean"])
        assert torch.equal(new["bn.running_var"], params["bn.running_var"] + delta["bn.running_var"])
        assert not torch.equal(new["w"], params["w"])
