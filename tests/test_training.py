import numpy as np
import pytest
import torch

from fedfm.algorithms.objectives import make_objective
from fedfm.client.program import ClientJob, ClientProgram, batch_order, client_update, num_local_steps
from fedfm.config import StrategySection, TrainingSection, make_config
from fedfm.engines import EngineSetup, InProcessEngine
from fedfm.models.state import get_trainable_state
from fedfm.server.checkpoint import ClientStore, ServerState, save_checkpoint
from fedfm.tasks.setup import build_task, prepare_data
from fedfm.transforms import Pipeline
from fedfm.types import RoundContext


@pytest.fixture
def setup(tiny_config):
    cfg = make_config(tiny_config())
    data = prepare_data(cfg)
    bundle, task = build_task(cfg, data)
    return cfg, data, bundle, task


def test_local_steps_and_batch_order():
    assert num_local_steps(100, TrainingSection(local_epochs=1, batch_size=16)) == 7
    assert num_local_steps(100, TrainingSection(local_epochs=0.5, batch_size=16)) == 4
    assert num_local_steps(100, TrainingSection(local_steps=3)) == 3
    batches = list(batch_order(5, 2, 4, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [
        2,
        2,
        1,
        2,
    ]  # an epoch ends with a short batch, then reshuffles
    assert sorted(torch.cat(batches[:3]).tolist()) == [0, 1, 2, 3, 4]


def test_client_update_is_deterministic_and_shaped(setup):
    cfg, data, bundle, task = setup
    theta = get_trainable_state(bundle.trainable)
    job = ClientJob(1, data.client_train[1])
    obj = make_objective(cfg.strategy)
    a, _ = client_update(bundle, task, job, theta, RoundContext(1, 0), cfg.training, obj)
    b, _ = client_update(bundle, task, job, theta, RoundContext(1, 0), cfg.training, obj)
    c, _ = client_update(bundle, task, job, theta, RoundContext(2, 0), cfg.training, obj)
    assert set(a.delta) == set(theta) and a.num_examples == len(job.indices)
    assert a.metrics["steps"] == 3
    assert all(torch.equal(a.delta[k], b.delta[k]) for k in theta)
    assert any(not torch.equal(a.delta[k], c.delta[k]) for k in theta)
    assert any(v.abs().sum() > 0 for v in a.delta.values())


def test_fedprox_pulls_towards_the_global_model(setup):
    cfg, data, bundle, task = setup
    theta = get_trainable_state(bundle.trainable)
    job = ClientJob(0, data.client_train[0])
    training = cfg.training.model_copy(update={"local_steps": 8, "optimizer": "sgd", "lr": 0.5})

    def norm(objective):
        u, _ = client_update(
            bundle, task, job, theta, RoundContext(1, 0), training, make_objective(objective)
        )
        return torch.sqrt(sum((v**2).sum() for v in u.delta.values())).item()

    assert norm(StrategySection(objective="fedprox", mu=1.0)) < norm(StrategySection())


def test_engine_reports_a_failing_client_and_goes_on(setup):
    cfg, data, bundle, task = setup
    rows = [data.client_train[0], np.array([], dtype=np.int64), data.client_train[2]]
    clients = [ClientJob(k, r) for k, r in enumerate(rows)]
    engine = InProcessEngine(EngineSetup(bundle, task, clients, ClientProgram.from_config(cfg), None))
    results = list(engine.run_cohort(get_trainable_state(bundle.trainable), [0, 1, 2], RoundContext(1, 0)))
    assert [r.client_id for r in results] == [0, 1, 2]
    assert results[1].failure.stage == "train" and "no training examples" in results[1].failure.reason
    assert results[0].update is not None and results[2].update is not None


def test_engine_keeps_scaffold_state_per_client(setup, tmp_path):
    cfg, data, bundle, task = setup
    obj = make_objective(StrategySection(objective="scaffold"))
    theta = get_trainable_state(bundle.trainable)
    program = ClientProgram(cfg.training, obj, Pipeline.build(cfg))
    jobs = [ClientJob(k, r) for k, r in enumerate(data.client_train)]
    engine = InProcessEngine(EngineSetup(bundle, task, jobs, program, None))
    ctx = RoundContext(1, 0, obj.server_init(theta))
    results = list(engine.run_cohort(theta, [0, 2], ctx))
    assert all(r.update.control_delta is not None for r in results)
    assert set(engine.states.take_changed()) == {0, 2}
    folder = tmp_path / "checkpoint"  # committed with the server state, one row per client
    save_checkpoint(folder, ServerState(1, theta, {}), engine.states.take_changed())
    restored = InProcessEngine(EngineSetup(bundle, task, jobs, program, None))
    restored.states.attach(ClientStore(folder))
    kept, original = restored.states.get(2)["scaffold"], engine.states.get(2)["scaffold"]
    assert all(torch.equal(kept[k], original[k]) for k in theta)
    assert restored.states.get(1) is None and ClientStore(folder).written_in(1) == [0, 2]


def test_init_step_final_is_client_update(setup):
    """Driving the steps by hand (as a batched engine would) gives client_update's result, with
    the step variants on: FedProx's penalty and gradient accumulation."""
    from fedfm.client.program import client_final, client_init, client_step, local_batches

    cfg, data, bundle, task = setup
    theta = get_trainable_state(bundle.trainable)
    job = ClientJob(1, data.client_train[1])
    obj = make_objective(StrategySection(objective="fedprox", mu=0.5))
    training = cfg.training.model_copy(update={"grad_accumulation": 2})
    want, _ = client_update(bundle, task, job, theta, RoundContext(1, 0), training, obj)
    local = client_init(bundle, task, job, theta, RoundContext(1, 0), training, obj)
    steps = 0
    for positions in local_batches(local):
        client_step(local, positions)
        steps += 1
    got, _ = client_final(local)
    assert steps == 2 * want.metrics["steps"]  # micro-batches: steps × grad_accumulation
    assert all(torch.equal(got.delta[k], want.delta[k]) for k in theta)
    assert got.metrics == want.metrics
