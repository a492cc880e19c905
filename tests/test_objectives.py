import pytest
import torch

from fedfm.algorithms.objectives import (
    make_objective,
    proximal_term,
    scaffold_client_control,
    scaffold_server_control,
)
from fedfm.config import StrategySection
from fedfm.types import RoundContext


def test_proximal_term_hand_computed():
    # mu/2 · ((3-1)² + (0-2)²) = 0.1/2 · 8 = 0.4
    value = proximal_term({"w": torch.tensor([3.0, 0.0])}, {"w": torch.tensor([1.0, 2.0])}, mu=0.1)
    assert value.item() == pytest.approx(0.4)


def test_scaffold_option_two_hand_computed():
    # c_k+ = c_k - c + (w_g - w_k)/(K·lr) = 1 - 0.5 + (2 - 1)/(4·0.5) = 1.0
    c_k, c = {"w": torch.tensor([1.0])}, {"w": torch.tensor([0.5])}
    new = scaffold_client_control(c_k, c, {"w": torch.tensor([2.0])}, {"w": torch.tensor([1.0])}, 4, 0.5)
    assert new["w"].item() == pytest.approx(1.0)
    # c ← c + |S|/N · mean Δc = 0.5 + 2/8 · 2 = 1.0
    assert scaffold_server_control(c, {"w": torch.tensor([2.0])}, 2, 8)["w"].item() == pytest.approx(1.0)


def test_scaffold_hook_corrects_gradients_and_reports_control_delta():
    obj = make_objective(StrategySection(objective="scaffold"))
    params = {"w": torch.tensor([2.0])}
    server_c = {"w": torch.tensor([0.3])}
    hook = obj.client_hook(params, RoundContext(1, 0, server_c), {"w": torch.tensor([0.1])})
    p = torch.nn.Parameter(torch.tensor([0.0]))
    p.grad = torch.tensor([1.0])
    hook.adjust_gradients({"w": p})
    assert p.grad.item() == pytest.approx(1.0 + 0.3 - 0.1)
    control_delta, state = hook.finish({"w": torch.tensor([1.0])}, 2, 0.5)
    # new c_k = 0.1 - 0.3 + (2 - 1)/(2·0.5) = 0.8 ; Δc = 0.7
    assert state["w"].item() == pytest.approx(0.8)
    assert control_delta["w"].item() == pytest.approx(0.7)


def test_plain_and_fedprox_hooks():
    params = {"w": torch.tensor([1.0])}
    assert make_objective(StrategySection()).client_hook(params, RoundContext(1, 0), None).penalty is None
    hook = make_objective(StrategySection(objective="fedprox", mu=2.0)).client_hook(
        params, RoundContext(1, 0), None
    )
    assert hook.penalty({"w": torch.tensor([3.0])}).item() == pytest.approx(4.0)


def test_server_control_only_for_scaffold():
    params = {"w": torch.ones(2)}
    assert make_objective(StrategySection()).server_init(params) is None
    assert torch.equal(
        make_objective(StrategySection(objective="scaffold")).server_init(params)["w"],
        torch.zeros(2),
    )
