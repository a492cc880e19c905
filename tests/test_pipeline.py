"""The update-transform pipeline and the round function, on their own."""

from __future__ import annotations

import torch

from fedfm.config import make_config
from fedfm.server.round import ServerRound, apply_round
from fedfm.transforms import Pipeline
from fedfm.transforms.base import ClientStep
from fedfm.types import ClientFailure, ClientResult, Encoded, Masked, RoundContext, Update


def _rnd(params, cohort=(0, 1, 2)):
    return ServerRound(1, list(cohort), 0, params, None, lambda c: params, 10**6)


def test_the_pipeline_is_built_in_its_declared_order(tiny_config):
    cfg = make_config(
        tiny_config(
            peft={"rank_tiers": [2, 4]},
            strategy={"lora_aggregation": "exact"},
            compression={"method": "q8"},
            attack={"kind": "scale"},
        )
    )
    assert Pipeline.build(cfg).names() == ["validation", "rank", "attack", "compression"]
    assert Pipeline.build(make_config(tiny_config())).names() == ["validation"]
    secure = make_config(tiny_config(secagg={"enabled": True}, strategy={"weighting": "uniform"}))
    assert Pipeline.build(secure).names() == ["validation", "secure"]


def test_client_halves_make_typed_payloads_and_server_halves_undo_them(tiny_config):
    cfg = make_config(tiny_config(compression={"method": "fp16"}))
    pipeline = Pipeline.build(cfg)
    params = {"w": torch.zeros(4)}
    update = Update({"w": torch.tensor([1.0, -2.0, 0.5, 0.0])}, 3, {"train_loss": 0.7})
    job = type("Job", (), {"client_id": 0, "rank": None})()
    sent = pipeline.client(update, ClientStep(job, RoundContext(1, 0), {}))
    assert isinstance(sent, Encoded) and sent.payload["w"].dtype == torch.float16
    rnd = _rnd(params)
    stream, reduce = pipeline.server([ClientResult(0, update=sent)], rnd, lambda items: list(items))
    (got,) = reduce(stream)
    assert isinstance(got.update, Update) and torch.equal(got.update.delta["w"], update.delta["w"])
    assert rnd.tally.accepted == [0]


def test_a_payload_of_the_wrong_kind_is_rejected_with_the_client_and_the_reason(tiny_config):
    pipeline = Pipeline.build(make_config(tiny_config(compression={"method": "fp16"})))
    params = {"w": torch.zeros(2)}
    rnd = _rnd(params)
    results = [
        ClientResult(0, update=Masked({"masked": torch.zeros(3)})),
        ClientResult(1, update=Update({"w": torch.ones(2)}, 1)),  # dense where encoded is expected
        ClientResult(2, failure=ClientFailure(2, "train", "boom")),
    ]
    stream, reduce = pipeline.server(rnd.tally.delivered(results, lambda: None), rnd, lambda s: list(s))
    assert reduce(stream) == []
    assert [r["client"] for r in rnd.tally.rejected] == [0, 1]
    assert all("expected an encoded update" in r["reason"] for r in rnd.tally.rejected)
    assert rnd.tally.failed == [{"client": 2, "stage": "train", "reason": "boom"}]


def test_the_round_returns_a_new_state_and_leaves_the_given_one_alone(tiny_config, tmp_path):
    from fedfm.server.driver import Run

    cfg = make_config(tiny_config(run={"rounds": 1}))
    (tmp_path / "r").mkdir()
    run = Run(cfg, tmp_path / "r", progress=False)
    before = run.state
    theta = {k: v.clone() for k, v in before.params.items()}
    rnd = run.server_round(run.state, 1, [0, 1, 2, 3])
    results = run.engine.run_cohort(before.params, rnd.cohort, RoundContext(1, 0))
    after, record = apply_round(before, results, rnd, run.strategy)
    assert after is not before and after.round == 1 and before.round == 0
    assert all(torch.equal(before.params[k], theta[k]) for k in theta)  # untouched
    assert any(not torch.equal(after.params[k], theta[k]) for k in theta)
    assert record["num_clients"] == 4 and record["bytes_up"] > 0


def test_pipeline_extra_takes_only_transforms_registered_by_name(tiny_config):
    import pytest

    from fedfm.config import ConfigError

    with pytest.raises(ConfigError, match=r"pipeline.extra.*'dp'.*own config section"):
        make_config(tiny_config(pipeline={"extra": ["dp"]}))
    with pytest.raises(ConfigError, match=r"pipeline.extra.*unknown transform 'nope'.*registered|allowed"):
        make_config(tiny_config(pipeline={"extra": ["nope"]}))
