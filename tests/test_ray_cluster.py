"""Ray scale-out on a real multi-node cluster (started locally): workers on two nodes train groups
of clients with the batched engine's training; a node killed mid-round fails the clients it was
training, with the reason, and the round goes on; the next round runs on the node that is left."""

from __future__ import annotations

import csv

import pytest
from tests.conftest import make_rows

from fedfm.api import prepare_run
from fedfm.server.driver import Run

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.usefixtures("one_ray_at_a_time")


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the driver's node: no workers
    c.add_node(num_cpus=1)
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


def uneven_sites(path):
    """Four sites: two with 6 rows, two with 60 (local epochs make the latter train 10× longer)."""
    rows = make_rows(n_per_class=40)
    sizes = {"a": 6, "b": 6, "c": 60, "d": 60}
    out = []
    for site, n in sizes.items():
        out += [{**r, "site": site} for r in rows[len(out) : len(out) + n]]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(out[0]))
        writer.writeheader()
        writer.writerows(out)
    return path


def test_batched_ray_workers_on_two_nodes_survive_a_node_killed_mid_round(tmp_path, tiny_config, cluster):
    cfg = tiny_config(
        run={"rounds": 2, "engine": "ray", "threads": 1},
        data={"name": "csv", "path": str(uneven_sites(tmp_path / "sites.csv")), "test_fraction": 0.2},
        partition={"method": "natural", "column": "site", "num_clients": 4, "min_size": 1},
        training={"local_steps": None, "local_epochs": 40, "batch_size": 8},
        ray={"address": cluster.address, "num_workers": 2, "cpus_per_worker": 1, "batched": True},
        batched={"clients_per_group": 2},
        eval={"every": 2},
    )
    cfg, run_dir = prepare_run(cfg, output=tmp_path / "run")
    run = Run(cfg, run_dir, progress=False)
    engine = run.engine
    assert len({gang.node for gang in engine.workers}) == 2  # one worker per node
    killed = []
    inner = engine.run_cohort

    def kill_mid_round(params, cohort, ctx):
        for result in inner(params, cohort, ctx):
            if not killed and ctx.round == 1:  # the short group is back; the long one is training
                pending = [c for c in cohort if engine.node_of(c) is not None]
                assert pending, "the long group should still be training"
                node = engine.node_of(pending[0])
                victim = next(n for n in cluster.list_all_nodes() if n.node_id == node)
                cluster.remove_node(victim, allow_graceful=False)
                killed.append((node, sorted(pending)))
            yield result

    engine.run_cohort = kill_mid_round
    result = run.execute()
    node, lost = killed[0]
    first, second = result.history[-2], result.history[-1]
    failed = {f["client"]: f["reason"] for f in first["failed"]}
    assert sorted(failed) == lost
    assert all("Ray worker on node" in r and node in r for r in failed.values())
    assert first["num_clients"] == 4 - len(lost)  # the round went on with the rest
    assert second["num_clients"] == 4 and not second["failed"]  # all on the surviving node
