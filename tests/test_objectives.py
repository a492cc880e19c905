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


def test_a_registered_objective_decides_how_clients_train(tiny_config, tmp_path):
    """An objective registered with the public decorator trains as itself, not as plain:
    this one zeroes every gradient, so with SGD the global model cannot move."""
    import fedfm
    from fedfm.algorithms.objectives import OBJECTIVES, LocalHook, Objective
    from fedfm.config import make_config
    from fedfm.models.state import get_trainable_state
    from fedfm.server.checkpoint import load_checkpoint
    from fedfm.tasks.setup import build_task, prepare_data

    def frozen_hook(global_params, ctx, client_state, device):
        def zero(trainable):
            for p in trainable.values():
                if p.grad is not None:
                    p.grad.zero_()

        return LocalHook(adjust_gradients=zero)

    if "test-frozen" not in OBJECTIVES:
        OBJECTIVES.register("test-frozen")(lambda **_: Objective("test-frozen", frozen_hook))
    training = {"optimizer": "sgd", "max_grad_norm": None}
    cfg = tiny_config(run={"rounds": 1}, strategy={"objective": "test-frozen"}, training=training)
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    initial = get_trainable_state(build_task(make_config(cfg), prepare_data(make_config(cfg)))[0].trainable)
    after = load_checkpoint(result.run_dir / "checkpoint").params
    assert result.history[-1]["num_clients"] == 4
    assert all(torch.equal(after[k], initial[k]) for k in initial)
    plain = fedfm.run(
        tiny_config(run={"rounds": 1}, training=training), output=tmp_path / "p", progress=False
    )
    moved = load_checkpoint(plain.run_dir / "checkpoint").params
    assert any(not torch.equal(moved[k], initial[k]) for k in initial)  # the plain objective does train
