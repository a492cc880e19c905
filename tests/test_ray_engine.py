"""Contract: the Ray engine and the in-process engine reach the same global state for the same seed."""

from __future__ import annotations

import time

import pytest
import torch

import fedfm
from fedfm.server.checkpoint import ClientStore, load_checkpoint

pytest.importorskip("ray")
pytestmark = pytest.mark.usefixtures("one_ray_at_a_time")


def test_ray_matches_inprocess_after_two_rounds_with_client_state(tmp_path, tiny_config):
    # SCAFFOLD and top-k error feedback both keep per-client state that must follow the client.
    cfg = tiny_config(
        run={"rounds": 2, "threads": 1},
        strategy={"objective": "scaffold"},
        training={"optimizer": "sgd", "lr": 0.05, "local_steps": 3},
        compression={"method": "topk", "ratio": 0.2},
        sampling={"fraction": 0.75},
    )
    local = fedfm.run(cfg, output=tmp_path / "inprocess", progress=False)
    cfg["run"]["engine"] = "ray"
    cfg["ray"] = {"num_workers": 2, "cpus_per_worker": 1}
    remote = fedfm.run(cfg, output=tmp_path / "ray", progress=False)
    assert_same_run(local, remote)
    # Each worker trains groups of two clients as the batched engine does: the same run as that
    # engine's (the tiny model's own dropout draws over each group's combined batch, so a grouped
    # run equals another grouped run, not the one-client-at-a-time run).
    cfg["ray"]["batched"], cfg["batched"] = True, {"clients_per_group": 2}
    grouped_remote = fedfm.run(cfg, output=tmp_path / "ray-batched", progress=False)
    cfg["run"]["engine"] = "batched"
    assert_same_run(fedfm.run(cfg, output=tmp_path / "batched", progress=False), grouped_remote)


def assert_same_run(local, remote):
    a, b = load_checkpoint(local.run_dir / "checkpoint"), load_checkpoint(remote.run_dir / "checkpoint")
    for k in a.params:
        torch.testing.assert_close(b.params[k], a.params[k], atol=1e-6, rtol=1e-5)
    for k in a.server_control or {}:
        torch.testing.assert_close(b.server_control[k], a.server_control[k], atol=1e-6, rtol=1e-5)
    states_a = ClientStore(local.run_dir / "checkpoint").all()
    states_b = ClientStore(remote.run_dir / "checkpoint").all()
    assert states_a.keys() == states_b.keys() and states_a
    for client, state in states_a.items():
        for kind in state:
            for k in state[kind]:
                torch.testing.assert_close(states_b[client][kind][k], state[kind][k], atol=1e-6, rtol=1e-5)
    assert [r["cohort"] for r in remote.history[1:]] == [r["cohort"] for r in local.history[1:]]


def test_personal_state_rides_on_ray_workers_as_on_the_batched_engine(tmp_path, tiny_config):
    # FedSA-LoRA: each client's B matrices live in the driver's client states, travel to whichever
    # worker trains it, and come back; grouped on the workers as the batched engine groups
    cfg = tiny_config(
        run={"rounds": 2, "threads": 1, "engine": "ray"},
        personalization={"method": "fedsa"},
        data={"client_test_fraction": 0.3},
        sampling={"fraction": 0.75},
        ray={"num_workers": 2, "cpus_per_worker": 1, "batched": True},
        batched={"clients_per_group": 2},
    )
    on_ray = fedfm.run(cfg, output=tmp_path / "ray", progress=False)
    cfg["run"]["engine"] = "batched"
    batched = fedfm.run(cfg, output=tmp_path / "batched", progress=False)
    assert_same_run(batched, on_ray)
    assert all("personal" in s for s in ClientStore(on_ray.run_dir / "checkpoint").all().values())


@pytest.fixture
def no_dropout(tmp_path, tiny_config):
    """A tiny BERT without dropout, LoRA without dropout: a client's ranks add up to one process."""
    from tests.conftest import save_tiny_bert

    model = save_tiny_bert(tmp_path / "bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return tiny_config(
        run={"rounds": 2, "threads": 1},
        model={"name": str(model), "max_length": 16},
        peft={"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        training={"local_steps": 3, "batch_size": 7, "lr": 1e-2},
        partition={"method": "iid", "num_clients": 3, "min_size": 1},
    )


def test_each_client_on_two_ray_workers_with_the_base_sharded_trains_the_in_process_run(tmp_path, no_dropout):
    # ray.procs_per_client = 2: a gang of two actors per client (gloo, FSDP over the frozen base);
    # every rank takes its share of each batch, so the run is the one-process run.
    cfg = no_dropout
    local = fedfm.run(cfg, output=tmp_path / "inprocess", progress=False)
    cfg["run"]["engine"] = "ray"
    cfg["ray"] = {"num_workers": 2, "cpus_per_worker": 0.5, "procs_per_client": 2, "fsdp": True}
    remote = fedfm.run(cfg, output=tmp_path / "ray", progress=False)
    a, b = load_checkpoint(local.run_dir / "checkpoint"), load_checkpoint(remote.run_dir / "checkpoint")
    for k in a.params:
        torch.testing.assert_close(b.params[k], a.params[k], atol=1e-6, rtol=1e-5)
    assert remote.history[-1]["num_clients"] == 3 and not remote.history[-1]["failed"]


def test_a_rank_killed_mid_round_fails_its_client_and_the_gang_is_retired(tmp_path, no_dropout):
    import threading

    import ray

    from fedfm.api import prepare_run
    from fedfm.server.driver import Run

    cfg = no_dropout
    cfg["run"]["engine"] = "ray"
    cfg["training"] = {**cfg["training"], "local_steps": None, "local_epochs": 3, "batch_size": 2}
    cfg["partition"] = {"method": "iid", "num_clients": 2, "min_size": 1}
    cfg["ray"] = {"num_workers": 2, "cpus_per_worker": 0.5, "procs_per_client": 2, "rank_timeout_s": 60}
    cfg, run_dir = prepare_run(cfg, output=tmp_path / "run")
    run = Run(cfg, run_dir, progress=False)
    engine, killed, gangs = run.engine, [], {}
    inner = engine.run_cohort

    def kill_rank_1(cohort):  # as soon as a client's gang is training, kill its rank 1
        for _ in range(2000):
            client = next((c for c in cohort if engine.actors_of(c)), None)
            if client is not None:
                ray.kill(engine.actors_of(client)[1])
                killed.append(client)
                return
            time.sleep(0.005)

    def run_cohort(params, cohort, ctx):
        gangs[ctx.round] = len(engine.workers)
        if ctx.round == 1:
            threading.Thread(target=kill_rank_1, args=(cohort,), daemon=True).start()
        yield from inner(params, cohort, ctx)

    engine.run_cohort = run_cohort
    result = run.execute()
    victim = killed[0]
    first, second = result.history[-2], result.history[-1]
    failed = {f["client"]: f["reason"] for f in first["failed"]}
    assert list(failed) == [victim] and "Ray worker on node" in failed[victim], failed
    assert first["num_clients"] == 1  # the round went on with the other client
    assert gangs == {1: 2, 2: 1}  # the broken gang was retired
    assert second["num_clients"] == 2 and not second["failed"]  # both on the gang left


@pytest.mark.parametrize(
    ("ray_options", "other", "match"),
    [
        ({"fsdp": True}, {}, "procs_per_client ≥ 2"),
        ({"procs_per_client": 2, "batched": True}, {}, "ray.batched trains groups"),
        ({"procs_per_client": 2, "gpus_per_worker": 1}, {}, "NCCL.*not built"),
        ({"procs_per_client": 2}, {"privacy": {"dp": "example", "noise_multiplier": 1.0}}, "DP-SGD"),
        ({"procs_per_client": 2, "fsdp": True}, {"peft": {"method": "full"}}, "FSDP.*'full'"),
    ],
)
def test_what_clients_on_several_ray_workers_cannot_do_is_refused_at_config_time(
    tiny_config, ray_options, other, match
):
    from fedfm.config import ConfigError, make_config

    with pytest.raises(ConfigError, match=match):
        make_config(tiny_config(run={"engine": "ray"}, ray=ray_options, **other))
