"""Your own Trainer script as a fedfm client: the shipped example joins a federation of real
processes, and 2 clients × 3 rounds equal a FedAvg computed by hand from plain Trainer runs."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
import tomllib
from pathlib import Path

import pytest
import torch

pytest.importorskip("grpc")

from fedfm.config import make_config  # noqa: E402
from fedfm.hf import ScriptTrainer, refusal, simulate  # noqa: E402
from fedfm.models.state import get_trainable_state, set_trainable_state, trainable_parameters  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer" / "classify.py"


def example():
    spec = importlib.util.spec_from_file_location("hf_classify_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write_sites(csv_path: Path, folder: Path) -> tuple[list[Path], list[str]]:
    rows = list(csv.DictReader(csv_path.open()))
    labels = sorted({r["label"] for r in rows})
    sites = [rows[i] for i in range(len(rows)) if i % 3], [rows[i] for i in range(len(rows)) if not i % 3]
    paths = []
    for k, site in enumerate(sites):  # 2/3 and 1/3 of the rows: the weights differ
        path = folder / f"site{k}.csv"
        with path.open("w", newline="") as fh:
            out = csv.DictWriter(fh, fieldnames=["text", "label"], extrasaction="ignore")
            out.writeheader()
            out.writerows(site)
        paths.append(path)
    return paths, labels


def script_args(model_dir, labels, out) -> list[str]:
    return [
        "--model", str(model_dir), "--labels", ",".join(labels), "--steps", "3", "--batch-size", "8",
        "--lr", "0.01", "--r", "4", "--alpha", "8", "--max-length", "16", "--seed", "7", "--output", str(out),
    ]  # fmt: skip


def test_two_trainer_script_clients_equal_fedavg_of_plain_trainer_runs(
    tmp_path, tiny_config, tiny_model_dir, csv_path
):
    import tomli_w

    (sites, labels) = write_sites(csv_path, tmp_path)
    config = tmp_path / "exp.toml"
    config.write_text(
        tomli_w.dumps(
            tiny_config(run={"rounds": 3}, validation={"max_update_norm": 100.0, "max_num_examples": 1000})
        )
    )
    args = script_args(tiny_model_dir, labels, tmp_path / "out-{k}")
    result = simulate(
        config, [str(EXAMPLE), "--data", str(tmp_path / "site{k}.csv"), *args], 2,
        output=tmp_path / "run", progress=False,
    )  # fmt: skip
    assert (tmp_path / "run" / "clients" / "site1.log").exists()
    records = result.history
    assert [r["round"] for r in records] == [0, 1, 2, 3] and all(r["num_clients"] == 2 for r in records[1:])

    # by hand: every round, each client runs a plain Trainer from the global model (seed 7 + t − 1)
    from transformers import set_seed

    from fedfm.server.driver import Run

    ex = example()
    (tmp_path / "ref").mkdir()
    theta = Run(
        make_config(tomllib.loads(config.read_text())), tmp_path / "ref", progress=False
    ).initial_params
    start = dict(theta)
    sizes = [sum(1 for _ in csv.DictReader(p.open())) for p in sites]
    for t in (1, 2, 3):
        deltas = []
        for site in sites:
            trainer = ex.build_trainer(
                ex.parse(["--data", str(site), *script_args(tiny_model_dir, labels, tmp_path / "ref-out")])
            )
            live = trainable_parameters(trainer.model)
            set_trainable_state(live, theta)
            set_seed(7 + t - 1)
            trainer.train()
            after = get_trainable_state(live)
            deltas.append({n: after[n] - theta[n] for n in theta})
        theta = {
            n: theta[n] + sum(s * d[n] for s, d in zip(sizes, deltas, strict=True)) / sum(sizes)
            for n in theta
        }
    from fedfm.server.checkpoint import load_checkpoint

    final = load_checkpoint(tmp_path / "run" / "checkpoint").params
    assert set(final) == set(theta)
    for n in theta:
        torch.testing.assert_close(final[n], theta[n], atol=1e-5, rtol=1e-4)
    assert max(float((final[n] - start[n]).abs().max()) for n in theta) > 1e-3  # it trained


@pytest.mark.parametrize(
    ("section", "words"),
    [
        ({"privacy": {"dp": "example", "noise_multiplier": 1.0}}, "DP-SGD"),
        ({"strategy": {"objective": "fedprox"}}, "objective = 'fedprox'"),
        ({"personalization": {"method": "fedper"}, "data": {"client_test_fraction": 0.2}}, "personalization"),
    ],
)
def test_a_run_a_trainer_script_cannot_join_is_refused_with_the_reason(tiny_config, section, words):
    cfg = make_config(tiny_config(**section))
    assert words in refusal(cfg)
    with pytest.raises(ValueError, match="cannot take a Trainer script"):
        ScriptTrainer(object(), cfg)
    assert refusal(make_config(tiny_config())) is None


def test_the_runs_client_transforms_apply_to_a_script_clients_update(
    tmp_path, tiny_config, tiny_model_dir, csv_path
):
    """The delta of a plain trainer.train() goes through the run's client halves: compressed
    (q8) when the run compresses, and from the global model it was given, whatever the model
    held before."""
    from fedfm.types import RoundContext
    from fedfm.wire import context_header

    (sites, labels) = write_sites(csv_path, tmp_path)
    ex = example()
    trainer = ex.build_trainer(
        ex.parse(["--data", str(sites[0]), *script_args(tiny_model_dir, labels, tmp_path / "o")])
    )
    cfg = make_config(tiny_config(compression={"method": "q8"}))
    client = ScriptTrainer(trainer, cfg)
    live = trainable_parameters(trainer.model)
    theta = {k: v + 0.01 for k, v in get_trainable_state(live).items()}
    header = context_header(RoundContext(round=2, seed=0))
    payload, _ = client.train(0, client.data.client_train[0], header, {"p": theta}, {})
    assert payload.kind == "encoded" and payload.num_examples == len(trainer.train_dataset)
    plain, _ = ScriptTrainer(trainer, make_config(tiny_config())).train(0, None, header, {"p": theta}, {})
    assert plain.kind == "update" and set(plain.delta) == set(theta)
    assert all(torch.isfinite(v).all() for v in plain.delta.values())
    assert max(float(v.abs().max()) for v in plain.delta.values()) > 0  # it trained from θ
    with pytest.raises(ValueError, match="trainable tensors differ"):
        client.train(0, None, header, {"p": {"nope": torch.zeros(1)}}, {})


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    from tests.deploy_tools import make_certificates

    return make_certificates(tmp_path_factory.mktemp("certs"))


def test_script_clients_of_a_deployed_server_over_mutual_tls_survive_its_kill_and_resume(
    tmp_path, tiny_config, tiny_model_dir, csv_path, certs
):
    """Two script clients with the server's address and their TLS files in the environment, as a
    site runs them; the server is killed with SIGKILL after round 1 and resumed; the clients ride
    it out, and the run ends where an uninterrupted one does."""
    import os
    import signal
    import subprocess

    import tomli_w
    from tests.deploy_tools import free_port, server_args, start, wait_for_file_text, write_tokens

    from fedfm.server.checkpoint import load_checkpoint

    (sites, labels) = write_sites(csv_path, tmp_path)
    config = tmp_path / "exp.toml"
    limits = {"max_update_norm": 100.0, "max_num_examples": 1000}
    cfg = tiny_config(run={"rounds": 3}, validation=limits, partition={"method": "iid", "num_clients": 2})
    config.write_text(tomli_w.dumps(cfg))
    port, tokens = free_port(), write_tokens(tmp_path / "tokens.txt", 2)
    out = tmp_path / "run"
    args = server_args(config, port, tmp_path / "tokens.txt", certs, out)
    server = start(args, tmp_path / "s1.log")
    clients = []
    for k, token in enumerate(tokens):
        env = {
            **os.environ,
            "FEDFM_SERVER": f"localhost:{port}",
            "FEDFM_TOKEN": token,
            "FEDFM_CA": str(certs["ca"]),
            "FEDFM_CERT": str(certs[f"site{k}"]),
            "FEDFM_KEY": str(certs[f"site{k}_key"]),
        }
        argv = [
            sys.executable,
            str(EXAMPLE),
            "--data",
            str(sites[k]),
            *script_args(tiny_model_dir, labels, tmp_path / f"o{k}"),
        ]
        log = open(tmp_path / f"c{k}.log", "w")  # noqa: SIM115
        clients.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        wait_for_file_text(out / "metrics.jsonl", '"event": "round", "round": 1,')
        server.send_signal(signal.SIGKILL)
        server.wait()
        resumed = args[:1] + args[2:]
        i = resumed.index("--output")
        resumed[i : i + 2] = ["--resume", out]
        server = start(resumed, tmp_path / "s2.log")
        assert server.wait(timeout=240) == 0, (tmp_path / "s2.log").read_text()[-3000:]
        assert all(c.wait(timeout=60) == 0 for c in clients), (tmp_path / "c0.log").read_text()[-3000:]
    finally:
        for p in [server, *clients]:
            if p.poll() is None:
                p.kill()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["round"] for r in records if r.get("event") == "round"}) == [0, 1, 2, 3]
    command = [str(EXAMPLE), "--data", str(tmp_path / "site{k}.csv")]
    command += script_args(tiny_model_dir, labels, tmp_path / "w{k}")
    whole = simulate(config, command, 2, output=tmp_path / "whole", progress=False)
    resumed_params, whole_params = (
        load_checkpoint(out / "checkpoint").params,
        load_checkpoint(whole.run_dir / "checkpoint").params,
    )
    for n in whole_params:
        torch.testing.assert_close(resumed_params[n], whole_params[n], atol=1e-5, rtol=1e-4)
