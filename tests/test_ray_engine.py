"""Contract: the Ray engine and the in-process engine reach the same global state for the same seed."""

from __future__ import annotations

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
