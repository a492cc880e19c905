"""Learning-rate schedules across rounds: hand-computed values, properties, the refusals, and a
run whose clients train at the scheduled rate (the same model as a constant run at that rate)."""

from __future__ import annotations

import math

import pytest
import torch

import fedfm
from fedfm.algorithms.schedules import lr_at
from fedfm.config import ConfigError, make_config
from fedfm.server.checkpoint import load_checkpoint


def test_hand_computed_rates():
    # FlowerTune's cosine annealing over T = 4 rounds from 0.1 to 0: ½·0.1·(1 + cos(π t / 4))
    want = [0.05 * (1 + math.cos(math.pi * t / 4)) for t in (1, 2, 3, 4)]
    assert [lr_at(0.1, t, "cosine", 4) for t in (1, 2, 3, 4)] == pytest.approx(want, abs=1e-15)
    assert lr_at(0.1, 2, "cosine", 4) == pytest.approx(0.05) and lr_at(0.1, 4, "cosine", 4) == pytest.approx(
        0.0
    )
    # linear from 0.1 to 0.02 over 4 rounds: 0.1 − 0.08 · t/4
    assert [lr_at(0.1, t, "linear", 4, minimum=0.02) for t in (1, 2, 3, 4)] == pytest.approx(
        [0.08, 0.06, 0.04, 0.02]
    )
    # 2 warm-up rounds (0.05, 0.1), then cosine over the other 2: 0.05, 0
    got = [lr_at(0.1, t, "cosine", 4, warmup=2) for t in (1, 2, 3, 4)]
    assert got == pytest.approx([0.05, 0.1, 0.05, 0.0], abs=1e-15)
    assert lr_at(0.1, 7, "constant", 4) == 0.1 and lr_at(0.1, 9, "linear", 4) == pytest.approx(
        0.0
    )  # past the span
    assert lr_at(0.1, 3, "cosine", None) == 0.1  # no span given: no decay


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_after_the_warm_up_the_rate_never_rises_and_stays_between_the_ends(kind, warmup):
    rates = [lr_at(0.3, t, kind, 20, warmup, 0.01) for t in range(1, 26)]
    decay = rates[warmup:]
    assert all(a >= b - 1e-15 for a, b in zip(decay, decay[1:], strict=False))
    assert all(0.01 - 1e-15 <= r <= 0.3 + 1e-15 for r in rates)
    assert rates[19] == pytest.approx(0.01) and rates[:warmup] == pytest.approx(
        [0.3 * (t + 1) / warmup for t in range(warmup)]
    )


def test_schedules_that_cannot_run_are_refused_naming_the_field(tiny_config):
    with pytest.raises(ConfigError, match="lr_warmup_rounds"):
        make_config(tiny_config(training={"lr_schedule": "cosine", "lr_warmup_rounds": 2}))  # run.rounds = 2
    with pytest.raises(ConfigError, match="lr_min"):
        make_config(tiny_config(training={"lr_schedule": "linear", "lr": 0.01, "lr_min": 0.1}))
    with pytest.raises(ConfigError, match="lr_schedule"):
        make_config(tiny_config(training={"lr_schedule": "step"}))
    cosine = {"lr_schedule": "cosine"}
    for sections in (  # where the rate does not follow the round, a schedule is refused, not ignored
        {"run": {"mode": "async"}, "fedbuff": {"buffer_size": 2}},
        {"run": {"engine": "batched"}},
        {"sharing": {"mode": "transfer"}, "transfer": {"path": "texts.jsonl"}},
    ):
        cfg = tiny_config(training=cosine)
        for name, values in sections.items():
            cfg[name] = {**cfg.get(name, {}), **values}
        with pytest.raises(ConfigError, match="lr_schedule"):
            make_config(cfg)


def test_clients_train_at_the_scheduled_rate(tiny_config, tmp_path):
    """Cosine over 2 rounds from 0.1 to 0: round 1 at 0.05, round 2 at 0 (SGD, FedAvg: θ stays).
    So the run ends where a 1-round run at a constant 0.05 ends, to the bit."""
    sgd = {"optimizer": "sgd", "max_grad_norm": None, "local_steps": 2}
    cosine = fedfm.run(
        tiny_config(run={"rounds": 2}, training={**sgd, "lr": 0.1, "lr_schedule": "cosine"}),
        output=tmp_path / "cosine", progress=False,
    )  # fmt: skip
    constant = fedfm.run(
        tiny_config(run={"rounds": 1}, training={**sgd, "lr": 0.05}),
        output=tmp_path / "constant",
        progress=False,
    )
    a = load_checkpoint(cosine.run_dir / "checkpoint").params
    b = load_checkpoint(constant.run_dir / "checkpoint").params
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert [r.get("lr") for r in cosine.history if r["round"] > 0] == pytest.approx([0.05, 0.0], abs=1e-15)
    full = fedfm.run(
        tiny_config(run={"rounds": 1}, training={**sgd, "lr": 0.1}), output=tmp_path / "full", progress=False
    )
    c = load_checkpoint(full.run_dir / "checkpoint").params
    assert any(not torch.equal(c[k], b[k]) for k in b)  # the rate matters: 0.1 ends elsewhere


def test_scaffold_controls_use_the_rate_the_round_trained_at(tiny_config):
    """c_k⁺ = c_k − c + (θ − y)/(K·η): with c = c_k = 0 it is −Δ/(K·η_t), η_t the round's rate."""
    from fedfm.algorithms.objectives import make_objective
    from fedfm.client.program import ClientJob, client_update, scheduled_training
    from fedfm.models.state import get_trainable_state
    from fedfm.tasks.setup import build_task, prepare_data
    from fedfm.types import RoundContext

    sgd = {"optimizer": "sgd", "lr": 0.1, "local_steps": 2, "max_grad_norm": None}
    training = {**sgd, "lr_schedule": "linear"}
    cfg = make_config(tiny_config(run={"rounds": 4}, strategy={"objective": "scaffold"}, training=training))
    data = prepare_data(cfg)
    bundle, task = build_task(cfg, data)
    theta = get_trainable_state(bundle.trainable)
    zero = {k: torch.zeros_like(v) for k, v in theta.items()}
    training = scheduled_training(cfg)
    update, state = client_update(
        bundle, task, ClientJob(0, data.client_train[0]), theta, RoundContext(3, 0, server_control=zero),
        training, make_objective(cfg.strategy), None,
    )  # fmt: skip
    eta = lr_at(0.1, 3, "linear", 4)  # 0.025
    assert eta == pytest.approx(0.025)
    for k, d in update.delta.items():
        assert torch.allclose(state[k], -d / (2 * eta), atol=1e-6)


def test_training_outside_the_rounds_ignores_the_schedule(tiny_config):
    """A baseline, the synthetic warm-up and fine-tuning after FL train at their own rate."""
    from fedfm.client.program import train_from
    from fedfm.models.state import get_trainable_state
    from fedfm.tasks.setup import build_task, prepare_data

    plain = make_config(tiny_config(training={"optimizer": "sgd"}))
    warm = make_config(tiny_config(run={"rounds": 8}, training={"optimizer": "sgd", "lr_warmup_rounds": 4}))
    data = prepare_data(plain)
    bundle, task = build_task(plain, data)
    start = get_trainable_state(bundle.trainable)
    rows = data.client_train[0]
    a, _ = train_from(bundle, task, rows, start, 2, plain.training, seed=0)
    b, _ = train_from(bundle, task, rows, start, 2, warm.training, seed=0)
    assert all(torch.equal(a[k], b[k]) for k in a)
