"""Contract: the batched engine gives each client the delta it computes alone (the in-process
engine), and the same aggregate and metrics, for the same seed.

The tiny models here have no dropout in the base (hidden/attention dropout 0), while LoRA dropout
is on: each client's LoRA masks come from its own generator in its own batch's shape, so they are
the masks it draws alone, and the results agree to float tolerance. (With the base's own dropout
they agree only in distribution: ``docs/performance.md``.)

Tolerances: the combined batch's matmuls have another row count than one client's, and oneDNN
sums them in another blocking order, so the same rows' logits differ in the last bits (~1e-9).
SGD carries that through as ~1e-7 relative. AdamW divides by √v + ε, which magnifies the last-bit
difference of a gradient entry near ε (~1e-7 absolute) into ~1e-5 of the tensor's norm; its check
is 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.conftest import save_tiny_bert

import fedfm
from fedfm.client.program import ClientProgram
from fedfm.config import RunConfig
from fedfm.engines import ENGINES, EngineSetup
from fedfm.models.state import get_trainable_state
from fedfm.server.checkpoint import load_checkpoint
from fedfm.tasks.setup import build_task, client_jobs, prepare_data
from fedfm.types import RoundContext

SGD = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}
ADAMW = {"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.01}


@pytest.fixture(scope="module")
def no_dropout_bert(tmp_path_factory):
    """The tiny BERT of ``tiny_model_dir`` with its hidden and attention dropout off."""
    folder = tmp_path_factory.mktemp("tiny-bert-nodrop")
    return save_tiny_bert(folder, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture
def contract_config(tiny_config, no_dropout_bert):
    """Five clients of different sizes (Dirichlet shards) and so different step counts."""

    def make(**sections):
        cfg = tiny_config(
            model={"name": str(no_dropout_bert), "max_length": 16},
            peft={"method": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
            partition={"method": "dirichlet", "alpha": 0.5, "num_clients": 5, "min_size": 2},
            training={"local_epochs": 1, "local_steps": None, "batch_size": 8, "max_grad_norm": 1.0},
        )
        for name, values in sections.items():
            cfg.setdefault(name, {}).update(values)
        return cfg

    return make


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm().clamp(min=1e-12))


def per_client(cfg_dict, server_control: bool = False):
    """Each engine's results for one cohort of every client, from the same global state."""
    cfg = RunConfig.model_validate(cfg_dict)
    data = prepare_data(cfg)
    bundle, task = build_task(cfg, data)
    jobs = client_jobs(data, cfg.peft)
    program = ClientProgram.from_config(cfg)
    params = get_trainable_state(bundle.trainable)
    gen = torch.Generator().manual_seed(3)
    control = {k: 0.01 * torch.randn(v.shape, generator=gen) for k, v in params.items()}
    ctx = RoundContext(round=1, seed=0, server_control=control if server_control else None)
    out = {}
    for name in ("inprocess", "batched"):
        engine = ENGINES.get(name)(EngineSetup(bundle, task, jobs, program, None, None, cfg.batched))
        out[name] = {r.client_id: r for r in engine.run_cohort(params, list(range(len(jobs))), ctx)}
    return jobs, out


@pytest.mark.parametrize(
    ("name", "sections", "control", "tol"),
    [
        ("plain-adamw", {"training": ADAMW}, False, 1e-4),
        ("plain-sgd-accumulation", {"training": {**SGD, "grad_accumulation": 2}}, False, 1e-5),
        ("fedprox-sgd", {"training": SGD, "strategy": {"objective": "fedprox", "mu": 0.5}}, False, 1e-5),
        ("scaffold-sgd", {"training": SGD, "strategy": {"objective": "scaffold"}}, True, 1e-5),
        (
            "rank-tiers",
            {"training": SGD, "peft": {"rank_tiers": [4, 2, 1], "rank_assignment": "round_robin"}},
            False,
            1e-5,
        ),
    ],
)
def test_each_client_gets_the_delta_it_computes_alone(contract_config, name, sections, control, tol):
    jobs, out = per_client(contract_config(**sections), server_control=control)
    steps = {int(r.update.metrics["steps"]) for r in out["inprocess"].values()}
    assert len(steps) > 1, "the group must hold clients with different step counts"
    for job in jobs:
        alone, grouped = out["inprocess"][job.client_id], out["batched"][job.client_id]
        assert alone.failure is None and grouped.failure is None
        assert grouped.update.num_examples == alone.update.num_examples
        assert grouped.update.metrics["steps"] == alone.update.metrics["steps"]
        assert grouped.update.metrics["train_loss"] == pytest.approx(
            alone.update.metrics["train_loss"], rel=1e-5
        )
        assert grouped.update.delta.keys() == alone.update.delta.keys()  # PEFT's keys, unchanged
        for k, d in alone.update.delta.items():
            if d.norm() > 0:
                assert rel_err(d, grouped.update.delta[k]) < tol, (name, job.client_id, k)
            else:  # e.g. components beyond a client's rank: exactly zero in both
                assert torch.equal(grouped.update.delta[k], d), (name, job.client_id, k)
        if control:
            for k, c in alone.update.control_delta.items():
                assert rel_err(c, grouped.update.control_delta[k]) < tol


@pytest.mark.parametrize("packing", [False, True])
def test_instruction_tuning_clients_get_their_own_delta(instruction_config, packing):
    # the tiny Llama has no dropout; rows of different lengths pad to the group's widest
    cfg = instruction_config(
        peft={"dropout": 0.1},
        training={**SGD, "local_steps": None, "local_epochs": 1, "batch_size": 3},
        task={"packing": packing},
    )
    jobs, out = per_client(cfg)
    for job in jobs:
        alone, grouped = out["inprocess"][job.client_id], out["batched"][job.client_id]
        assert alone.failure is None and grouped.failure is None
        assert grouped.update.metrics["train_loss"] == pytest.approx(
            alone.update.metrics["train_loss"], rel=1e-5
        )
        for k, d in alone.update.delta.items():
            assert rel_err(d, grouped.update.delta[k]) < 1e-5, (job.client_id, k)


def test_a_client_with_no_rows_fails_alone_and_the_group_trains(contract_config):
    cfg = RunConfig.model_validate(contract_config(training=SGD))
    data = prepare_data(cfg)
    bundle, task = build_task(cfg, data)
    jobs = client_jobs(data, cfg.peft)
    jobs[2] = type(jobs[2])(2, np.array([], dtype=np.int64))
    program = ClientProgram.from_config(cfg)
    engine = ENGINES.get("batched")(EngineSetup(bundle, task, jobs, program, None, None, cfg.batched))
    results = {
        r.client_id: r
        for r in engine.run_cohort(get_trainable_state(bundle.trainable), [0, 1, 2, 3], RoundContext(1, 0))
    }
    assert "no training examples" in results[2].failure.reason
    assert all(results[c].update is not None for c in (0, 1, 3))


@pytest.mark.parametrize(
    ("name", "sections", "tol"),
    [
        (
            "scaffold-topk",
            {
                "training": SGD,
                "strategy": {"objective": "scaffold"},
                "compression": {"method": "topk", "ratio": 0.3},
            },
            1e-5,
        ),
        (
            "client-dp-reproducible",
            {
                "training": SGD,
                "privacy": {"dp": "client", "noise_multiplier": 0.3, "clip_norm": 0.5, "noise_seed": 7},
                "strategy": {"weighting": "uniform"},
            },
            1e-5,
        ),
        (
            "fedprox-adamw-groups-of-two",
            {"training": ADAMW, "strategy": {"objective": "fedprox"}, "batched": {"clients_per_group": 2}},
            1e-4,
        ),
    ],
)
def test_same_aggregate_and_metrics_over_two_rounds(tmp_path, contract_config, name, sections, tol):
    cfg = contract_config(run={"rounds": 2, "threads": 1}, sampling={"fraction": 0.8}, **sections)
    alone = fedfm.run(cfg, output=tmp_path / "inprocess", progress=False)
    cfg["run"]["engine"] = "batched"
    grouped = fedfm.run(cfg, output=tmp_path / "batched", progress=False)
    a, b = load_checkpoint(alone.run_dir / "checkpoint"), load_checkpoint(grouped.run_dir / "checkpoint")
    run_cfg = RunConfig.model_validate(cfg)
    start = get_trainable_state(build_task(run_cfg, prepare_data(run_cfg))[0].trainable)
    for k in a.params:  # what two rounds moved the global state, compared
        assert rel_err(a.params[k] - start[k], b.params[k] - start[k]) < tol, k
    for ra, rb in zip(alone.history, grouped.history, strict=True):
        assert ra.get("cohort") == rb.get("cohort")
        for metric in ("test_accuracy", "test_macro_f1"):
            if metric in ra:
                assert rb[metric] == ra[metric], (name, metric)
        if ra.get("test_loss") is not None:
            assert rb["test_loss"] == pytest.approx(ra["test_loss"], rel=1e-5)


def test_unbatchable_settings_are_refused_at_config_time(tiny_config):
    base = tiny_config(run={"engine": "batched"})
    for sections, field in [
        ({"peft": {"method": "prompt_tuning"}}, "peft.method"),
        ({"peft": {"method": "ia3"}}, "peft.method"),
        ({"privacy": {"dp": "example", "noise_multiplier": 1.0, "clip_norm": 1.0}}, "privacy.dp"),
    ]:
        cfg = {**base, **{k: {**base.get(k, {}), **v} for k, v in sections.items()}}
        with pytest.raises(ValueError, match=field):
            RunConfig.model_validate(cfg)


def _engine_parts(cfg_dict):
    cfg = RunConfig.model_validate(cfg_dict)
    data = prepare_data(cfg)
    bundle, task = build_task(cfg, data)
    return cfg, bundle, task, client_jobs(data, cfg.peft), ClientProgram.from_config(cfg)


def test_one_clients_own_error_fails_it_alone_and_a_pass_error_spares_finished_clients(contract_config):
    cfg, bundle, task, jobs, program = _engine_parts(contract_config(training=SGD))
    params = get_trainable_state(bundle.trainable)
    alone = {
        r.client_id: r
        for r in ENGINES.get("inprocess")(
            EngineSetup(bundle, task, jobs, program, None, None, cfg.batched)
        ).run_cohort(params, range(5), RoundContext(1, 0))
    }
    broken = list(jobs)
    broken[1] = type(jobs[1])(1, np.array([10**6]))  # its own batch raises (a row it does not have)
    engine = ENGINES.get("batched")(EngineSetup(bundle, task, broken, program, None, None, cfg.batched))
    results = {r.client_id: r for r in engine.run_cohort(params, range(5), RoundContext(1, 0))}
    assert "IndexError" in results[1].failure.reason
    for c in (0, 2, 3, 4):
        for k, d in alone[c].update.delta.items():
            assert rel_err(d, results[c].update.delta[k]) < 1e-5
    # the shared pass fails at its second step: one-step clients had finished and keep their results
    calls, real = [], task.segment_losses

    def failing(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return real(*args)

    task.segment_losses = failing
    try:
        engine = ENGINES.get("batched")(EngineSetup(bundle, task, jobs, program, None, None, cfg.batched))
        results = {r.client_id: r for r in engine.run_cohort(params, range(5), RoundContext(1, 0))}
    finally:
        task.segment_losses = real
    for c, r in results.items():
        if alone[c].update.metrics["steps"] == 1:
            assert r.update is not None, c
        else:
            assert "in the group's batched pass" in r.failure.reason, c
    assert any(r.update is not None for r in results.values()) and any(r.failure for r in results.values())


def test_a_model_whose_trainable_tensors_do_not_stack_is_refused_at_set_up(contract_config):
    cfg, bundle, task, jobs, program = _engine_parts(
        contract_config(peft={"target_modules": ["word_embeddings"]})
    )
    with pytest.raises(ValueError, match="run.engine = 'batched': the batched engine cannot stack"):
        ENGINES.get("batched")(EngineSetup(bundle, task, jobs, program, None, None, cfg.batched))
