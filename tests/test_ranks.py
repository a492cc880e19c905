"""One client on several processes (torch.distributed, gloo on CPU): a 2-process client gives the
update a 1-process client gives with the same global batch; a rank that dies fails the round
with the reason instead of hanging."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from fedfm.client.program import ClientJob, ClientProgram
from fedfm.config import make_config
from fedfm.models.state import get_trainable_state
from fedfm.tasks.setup import build_task, prepare_data
from fedfm.types import RoundContext


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_update(cfg_dict: dict, theta_path: str):
    """One client's round (client 0, round 1) from the θ saved at ``theta_path``."""
    cfg = make_config(cfg_dict)
    data = prepare_data(cfg)
    bundle, task = build_task(cfg, data)
    _LAST_MODEL.append(bundle.model)
    program = ClientProgram.from_config(cfg)
    job = ClientJob(0, data.client_train[0], None)
    theta = torch.load(theta_path)
    payload, _ = program(bundle, task, job, theta, RoundContext(round=1, seed=0), {})
    return payload


def _rank(
    rank: int,
    world: int,
    port: int,
    cfg_dict: dict,
    theta_path: str,
    out: str,
    die: bool,
    shard: bool = False,
) -> None:
    from fedfm.systems import ranks

    torch.set_num_threads(1)
    ranks.join(rank, world, f"127.0.0.1:{port}", timeout_s=10, shard_base=shard)
    if die and rank == 1:
        os._exit(3)  # a rank that dies as the round starts
    try:
        payload = client_update(cfg_dict, theta_path)
        held = ranks.held_bytes(_LAST_MODEL[-1]) if shard else None
        torch.save(
            {"delta": payload.delta, "loss": payload.metrics["train_loss"], "held": held}, f"{out}.{rank}"
        )
    except Exception as err:
        torch.save({"error": f"{type(err).__name__}: {err}"}, f"{out}.{rank}")
    finally:
        if not die:
            ranks.leave()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    from tests.deploy_tools import make_certificates

    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def setup(tmp_path, tiny_config, csv_path):
    from tests.conftest import save_tiny_bert

    model = save_tiny_bert(tmp_path / "bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg = tiny_config(
        model={"name": str(model), "max_length": 16},
        peft={"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        training={"local_steps": 3, "batch_size": 7, "lr": 1e-2, "grad_accumulation": 2},
        partition={"method": "iid", "num_clients": 2, "min_size": 1},
    )
    c = make_config(cfg)
    bundle, _ = build_task(c, prepare_data(c))
    theta = tmp_path / "theta.pt"
    torch.save(get_trainable_state(bundle.trainable), theta)
    return cfg, str(theta), str(tmp_path / "out")


_LAST_MODEL: list = []


@pytest.mark.parametrize(
    ("shard", "batch_size"), [(False, 7), (True, 7), (True, 1)], ids=["ddp", "fsdp", "fsdp-empty-share"]
)
def test_two_processes_give_the_update_one_process_gives_with_the_same_global_batch(setup, shard, batch_size):
    # With the frozen base sharded (FSDP), each rank holds about half of the base and gathers it
    # block by block; the trainable LoRA weights stay whole, so the update is the same. With one
    # row per batch rank 1's share is empty: it forwards a row that counts for nothing, since
    # every rank must join each block's gather.
    cfg, theta, out = setup
    cfg = {**cfg, "training": {**cfg["training"], "batch_size": batch_size}}
    torch.set_num_threads(1)
    one = client_update(cfg, theta)
    mp.spawn(_rank, args=(2, free_port(), cfg, theta, out, False, shard), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in (0, 1)]
    if shard:
        (held, total), (held_1, _) = ranks[0]["held"], ranks[1]["held"]
        assert held + held_1 < 1.1 * total and held < 0.6 * total, (held, held_1, total)
        print(f"rank 0 holds {held} of {total} parameter bytes; rank 1 {held_1}")
    for k, v in one.delta.items():
        assert torch.equal(ranks[0]["delta"][k], ranks[1]["delta"][k])  # every rank ends the same
        torch.testing.assert_close(ranks[0]["delta"][k], v, atol=1e-6, rtol=1e-5)
    assert ranks[0]["loss"] == pytest.approx(one.metrics["train_loss"], rel=1e-5)
    assert max(float(v.abs().max()) for v in one.delta.values()) > 1e-4  # it trained


def test_a_rank_that_dies_fails_the_round_with_the_reason_instead_of_hanging(setup):
    cfg, theta, out = setup
    ctx = mp.spawn(_rank, args=(2, free_port(), cfg, theta, out, True), nprocs=2, join=False)
    ctx.processes[0].join(timeout=120)
    assert not ctx.processes[0].is_alive(), "rank 0 hung after rank 1 died"
    result = torch.load(f"{out}.0")
    assert "error" in result and ("Connection" in result["error"] or "timed out" in result["error"].lower())


def test_dp_sgd_on_several_processes_is_refused(tiny_config):
    from fedfm.systems import ranks

    with pytest.raises(ValueError, match="DP-SGD"):
        ranks.check(make_config(tiny_config(privacy={"dp": "example", "noise_multiplier": 1.0})))
    ranks.check(make_config(tiny_config()))
    full = make_config(tiny_config(peft={"method": "full"}))
    ranks.check(full)  # several processes without sharding train every weight
    with pytest.raises(ValueError, match="FSDP.*peft.method = 'full'"):
        ranks.check(full, shard_base=True)
    with pytest.raises(ValueError, match="at least 2 processes"):
        ranks.Layout(nproc=1, shard_base=True)


def test_a_deployed_client_on_two_processes_trains_the_run_the_simulation_trains(
    tmp_path, tiny_config, certs, csv_path
):
    """Two clients, each ``fedfm client --nproc 2`` over mutual TLS, one with its frozen base
    sharded (``--fsdp``): the deployed run ends where the one-process simulation does (no dropout,
    so the ranks' shares add up exactly)."""
    pytest.importorskip("grpc")
    from tests.conftest import save_tiny_bert
    from tests.deploy_tools import client_args, client_data, free_port, server_args, start, write_tokens

    import fedfm
    from fedfm.server.checkpoint import load_checkpoint

    model = save_tiny_bert(tmp_path / "bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg = tiny_config(
        model={"name": str(model), "max_length": 16},
        peft={"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        partition={"method": "iid", "num_clients": 2, "min_size": 1},
        training={"local_steps": 3, "batch_size": 7, "lr": 1e-2},
        strategy={"weighting": "uniform"},
        validation={"max_update_norm": 100.0},
    )
    import tomli_w

    path = tmp_path / "exp.toml"
    path.write_text(tomli_w.dumps(cfg))
    port, tokens = free_port(), write_tokens(tmp_path / "tokens.txt", 2)
    out = tmp_path / "deployed"
    server = start(server_args(path, port, tmp_path / "tokens.txt", certs, out), tmp_path / "server.log")
    data = client_data(path)
    clients = [
        start(client_args(port, tokens[0], certs, "--nproc", "2", data=data), tmp_path / "c0.log"),
        start(client_args(port, tokens[1], certs, "--nproc", "2", "--fsdp", data=data), tmp_path / "c1.log"),
    ]
    assert server.wait(timeout=240) == 0, (tmp_path / "server.log").read_text()[-3000:]
    assert all(c.wait(timeout=60) == 0 for c in clients), (tmp_path / "c0.log").read_text()[-3000:]
    assert "training on 2 processes" in (tmp_path / "c0.log").read_text()
    assert "frozen base sharded across them (FSDP)" in " ".join((tmp_path / "c1.log").read_text().split())
    simulated = fedfm.run(path, output=tmp_path / "sim", progress=False)
    deployed, local = (
        load_checkpoint(out / "checkpoint").params,
        load_checkpoint(simulated.run_dir / "checkpoint").params,
    )
    for k in local:
        torch.testing.assert_close(deployed[k], local[k], atol=1e-5, rtol=1e-4)
