"""Split fine-tuning across processes (fedfm.sharing.split.client and .server, over fedfm.deploy):
the client's bottom and the server's sessions, exchanging through the wire encoding, train what
the simulation's one-process split trains; what either side receives is checked."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import save_tiny_bert, tiny_experiment

from fedfm.algorithms.objectives import Objective
from fedfm.client.program import ClientJob, client_update
from fedfm.config import make_config
from fedfm.deploy.client import split_send
from fedfm.models.state import get_trainable_state
from fedfm.sharing.split.client import Link, client_bundle, received_gradient
from fedfm.sharing.split.codec import CutError, decode, encode
from fedfm.sharing.split.payload import client_part, split_update
from fedfm.sharing.split.server import SplitServer
from fedfm.tasks.setup import build_task, prepare_data
from fedfm.types import ClientResult, RoundContext
from fedfm.wire import WireError, pack_tensors, unpack_tensors

pytest.importorskip("grpc")


@pytest.fixture(scope="module")
def still_bert(tmp_path_factory):
    """A 4-layer tiny BERT without dropout: both sides' forward passes are deterministic."""
    return save_tiny_bert(
        tmp_path_factory.mktemp("bert4-still"),
        num_hidden_layers=4,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def split_cfg(model_dir, csv_path, **split):
    raw = tiny_experiment(model_dir, csv_path, sharing={"mode": "split"})
    raw["split"] = {"cut_layer": 2, **split}
    raw["training"] = {"local_steps": 3, "batch_size": 4, "lr": 1e-2, "max_grad_norm": None}
    return make_config(raw)


def wire(server: SplitServer, client_id: int):
    """A Link's ``send`` straight into the server's handler, through the real encoding."""

    def send(header, groups):
        blob = pack_tensors(groups)
        limit = server.admit(client_id, header)
        assert len(blob) <= limit
        reply, tensors = server.step(client_id, header, unpack_tensors(blob), len(blob))
        return reply, unpack_tensors(pack_tensors(tensors))

    return send


def remote_round(cfg, data, start, job, ctx):
    """One client's round over the cut: (the merged delta, the client's metrics, the server)."""
    server_bundle, server_task = build_task(cfg.model_copy(update={"sharing": cfg.sharing}), data)
    server = SplitServer(cfg, server_bundle, server_task, data.train.label_names)
    sent = server.open_round(start, [job.client_id], ctx)
    bundle, task, cut = client_bundle(cfg, data)
    assert set(bundle.trainable) == set(sent)  # the client holds exactly what it is sent
    cut.link = Link(wire(server, job.client_id), ctx.round)
    update, _ = client_update(bundle, task, job, sent, ctx, cfg.training, Objective("plain"))
    cut.link = None
    payload = split_update(update, cfg.split.cut_layer, cfg.split.u_shaped)
    assert not payload.server_delta  # nothing of the server's part was trained on the client
    result = server.attach(ClientResult(job.client_id, update=payload))
    return result.update.merged().delta, result.update.metrics, server


@pytest.mark.parametrize("u_shaped", [False, True], ids=["plain", "u-shaped"])
def test_the_remote_split_trains_what_the_simulated_split_trains(still_bert, csv_path, u_shaped):
    cfg = split_cfg(still_bert, csv_path, u_shaped=u_shaped)
    data = prepare_data(cfg)
    bundle, task = build_task(cfg, data)  # the simulation: both parts in one process
    start = get_trainable_state(bundle.trainable)
    job, ctx = ClientJob(1, data.client_train[1]), RoundContext(round=1, seed=0)
    simulated, _ = client_update(bundle, task, job, start, ctx, cfg.training, Objective("plain"))
    delta, metrics, server = remote_round(cfg, data, start, job, ctx)
    assert delta.keys() == simulated.delta.keys()
    for k in delta:
        torch.testing.assert_close(delta[k], simulated.delta[k], atol=1e-6, rtol=1e-5)
    assert any(float(v.abs().max()) > 0 for k, v in delta.items() if k not in client_part(delta, 2, u_shaped))
    # the server counted the bytes itself: every batch's activations up (U: and a gradient)
    batches = cfg.training.local_steps
    assert metrics["cut_messages"] == batches * (2 if u_shaped else 1)
    assert metrics["cut_bytes_up"] > batches * 4 * 4 * 32  # at least a float per token and width
    assert not server.sessions  # attached: the session is gone


def test_a_causal_lm_trains_across_the_cut(instruction_config):
    raw = instruction_config(sharing={"mode": "split"})
    raw["split"] = {"cut_layer": 1, "activation_bits": 8}
    raw["training"] = {**raw["training"], "max_grad_norm": None}
    cfg = make_config(raw)
    data = prepare_data(cfg)
    server_bundle, _ = build_task(cfg, data)
    start = get_trainable_state(server_bundle.trainable)
    job, ctx = ClientJob(0, data.client_train[0]), RoundContext(round=1, seed=0)
    delta, metrics, _ = remote_round(cfg, data, start, job, ctx)
    assert delta.keys() == start.keys() and metrics["train_loss"] > 0
    assert all(torch.isfinite(v).all() for v in delta.values())
    top = [k for k in delta if ".layers.1." in k]
    assert top and all(float(delta[k].abs().max()) > 0 for k in top if "lora_B" in k)


def test_encoding_round_trips_and_decoding_checks_everything():
    t = torch.randn(2, 3, 8)
    for bits in (32, 16, 8):
        back = decode(unpack_tensors(pack_tensors({"x": encode(t, bits)}))["x"], bits, (2, 3, 8), "x")
        assert back.dtype == torch.float32 and (back - t).abs().max() <= t.abs().max() / 100
    good = encode(t, 8)
    with pytest.raises(WireError, match="shape"):
        decode(good, 8, (2, 3, 9), "x")
    with pytest.raises(WireError, match="expected tensors"):
        decode({"v": t}, 8, (2, 3, 8), "x")
    with pytest.raises(WireError, match="is torch.float32, expected torch.bfloat16"):
        decode({"v": t}, 16, (2, 3, 8), "x")
    with pytest.raises(WireError, match="non-finite"):
        decode({"v": torch.full((2, 3, 8), float("inf"))}, 32, (2, 3, 8), "x")


def test_a_client_refuses_what_a_hostile_server_returns():
    shape = (2, 3, 4)
    with pytest.raises(CutError, match="non-finite"):
        received_gradient({"v": torch.full(shape, float("nan"))}, 32, shape, None)
    with pytest.raises(CutError, match="shape"):
        received_gradient({"v": torch.ones(2, 3, 5)}, 32, shape, None)
    with pytest.raises(CutError, match="split.max_cut_grad_norm"):
        received_gradient({"v": torch.full(shape, 10.0)}, 32, shape, 1.0)
    assert received_gradient({"v": torch.ones(shape)}, 32, shape, 10.0).shape == shape


def _session_server(still_bert, csv_path, **split):
    cfg = split_cfg(still_bert, csv_path, **split)
    data = prepare_data(cfg)
    bundle, task = build_task(cfg, data)
    server = SplitServer(cfg, bundle, task, data.train.label_names)
    server.open_round(get_trainable_state(bundle.trainable), [0, 1], RoundContext(round=1, seed=0))
    return server


def _message(b=2, t=5, width=32, labels=None, mask=None, h=None):
    return {
        "h": encode(torch.randn(b, t, width) if h is None else h, 32),
        "m": {"mask": torch.ones(b, t, dtype=torch.long) if mask is None else mask},
        "y": {"labels": torch.tensor([0, 1]) if labels is None else labels},
    }


@pytest.mark.parametrize(
    "groups, reason",
    [
        (_message(labels=torch.tensor([0, 7])), "class indices"),
        (_message(labels=torch.tensor([0.5, 1.0])), "integer tensor"),
        (_message(mask=torch.full((2, 5), 2)), "0/1"),
        (_message(mask=torch.zeros(2, 5, dtype=torch.long)), "at least one token"),
        (_message(width=31), "shape"),
        (_message(b=9, labels=torch.zeros(9, dtype=torch.long)), "batch shape"),
        (_message(h=torch.full((2, 5, 32), float("nan"))), "non-finite"),
        ({"h": {}}, "attention mask"),
    ],
    ids=["label-range", "float-labels", "mask-values", "empty-rows", "width", "batch", "nan", "no-mask"],
)
def test_a_hostile_clients_cut_message_fails_only_its_own_session(still_bert, csv_path, groups, reason):
    server = _session_server(still_bert, csv_path)
    reply, tensors = server.step(0, {"round": 1, "micro": 0, "phase": "forward"}, groups, 100)
    assert reason in reply["error"] and not tensors
    again, _ = server.step(0, {"round": 1, "micro": 0, "phase": "forward"}, _message(), 100)
    assert "already failed" in again["error"]  # the session stays failed ...
    fine, tensors = server.step(1, {"round": 1, "micro": 0, "phase": "forward"}, _message(), 100)
    assert "error" not in fine and tensors["g"]["v"].shape == (2, 5, 32)  # ... the others go on
    from fedfm.types import SplitUpdate

    failed = server.attach(ClientResult(0, update=SplitUpdate({}, 4)))
    assert failed.failure is not None and "cut exchange failed" in failed.failure.reason


def test_the_servers_stand_in_ids_keep_the_padding_where_it_is(still_bert, csv_path):
    server = _session_server(still_bert, csv_path)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    _, batch = server._inputs(_message(mask=mask))
    ids = batch["input_ids"]
    assert ((ids == server.pad_id) == (mask == 0)).all()  # a decoder classifier finds the last real token


def test_a_failed_session_refuses_the_next_message_before_reading_it(still_bert, csv_path):
    server = _session_server(still_bert, csv_path)
    server.step(0, {"round": 1, "micro": 0, "phase": "forward"}, _message(width=31), 100)
    with pytest.raises(ValueError, match="already failed"):
        server.admit(0, {"round": 1, "micro": 0, "phase": "forward"})
    with pytest.raises(ValueError, match="out of order"):
        server.admit(1, {"round": 1, "micro": 3, "phase": "forward"})
    server.open_round(dict(server.start), [0, 1], RoundContext(round=2, seed=0))
    with pytest.raises(ValueError, match="closed"):  # a round-1 message read while round 2 opened
        server.step(0, {"round": 1, "micro": 0, "phase": "forward"}, _message(), 100)
    assert not server.sessions  # it opened no session of round 2


def test_the_server_admits_only_the_cohorts_next_message(still_bert, csv_path):
    server = _session_server(still_bert, csv_path)
    with pytest.raises(ValueError, match="not expecting"):
        server.admit(3, {"round": 1, "phase": "forward"})  # not in the cohort
    with pytest.raises(ValueError, match="not expecting"):
        server.admit(0, {"round": 2, "phase": "forward"})  # another round
    with pytest.raises(ValueError, match="phase"):
        server.admit(0, {"round": 1, "phase": "backward"})  # no backward in a plain split
    reply, _ = server.step(0, {"round": 1, "micro": 5, "phase": "forward"}, _message(), 100)
    assert "out of order" in reply["error"]
    from fedfm.types import SplitUpdate, Update

    assert (
        "without training through the cut"
        in server.attach(ClientResult(1, update=SplitUpdate({}, 4))).failure.reason
    )
    assert "'update' payload" in server.attach(ClientResult(1, update=Update({}, 4))).failure.reason
    server.close_round()
    with pytest.raises(ValueError, match="not expecting"):
        server.admit(0, {"round": 1, "phase": "forward"})


def test_a_deployed_split_run_over_mutual_tls_matches_the_simulation(still_bert, csv_path, tmp_path):
    """Real server and client processes on 127.0.0.1: every batch crosses the cut over gRPC."""
    import json

    import tomli_w
    from tests.deploy_tools import free_port, make_certificates, run_federation, write_tokens

    import fedfm
    from fedfm.server.checkpoint import load_checkpoint

    raw = split_cfg(still_bert, csv_path, activation_bits=32).model_dump(mode="json", exclude_none=True)
    raw["run"] = {**raw["run"], "rounds": 2}
    raw["partition"] = {**raw["partition"], "method": "iid", "num_clients": 3}
    raw["sampling"] = {**raw["sampling"], "fraction": 1.0}
    raw["validation"] = {**raw["validation"], "max_num_examples": 1000, "max_update_norm": 100.0}
    path = tmp_path / "exp.toml"
    path.write_text(tomli_w.dumps(raw))
    certs = make_certificates(tmp_path / "certs", sites=3)
    port, tokens = free_port(), write_tokens(tmp_path / "tokens.txt", 3)
    out = tmp_path / "deployed"
    run_federation(path, tmp_path, certs, tokens, out, port)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if r.get("event") == "round"]
    assert [r["round"] for r in rounds] == [0, 1, 2] and all(r["num_clients"] == 3 for r in rounds[1:])
    assert all(r["cut_bytes_up"] > 0 and r["cut_bytes_down"] > 0 for r in rounds[1:])
    simulated = fedfm.run(make_config(raw), output=tmp_path / "simulated", progress=False)
    deployed, local = (
        load_checkpoint(out / "checkpoint").params,
        load_checkpoint(simulated.run_dir / "checkpoint").params,
    )
    for k in local:
        torch.testing.assert_close(deployed[k], local[k], atol=1e-5, rtol=1e-4)
    assert rounds[-1]["test_accuracy"] == pytest.approx(simulated.history[-1]["test_accuracy"])


def test_a_frozen_server_cannot_hold_a_client_past_the_rounds_deadline():
    import threading
    import time
    from concurrent import futures

    import grpc

    from fedfm.deploy import fedfm_pb2_grpc as rpc

    release = threading.Event()

    class Frozen(rpc.FedFMServicer):
        def SplitStep(self, request_iterator, context):  # reads the message, never answers
            list(request_iterator)
            release.wait(30)
            yield from ()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    rpc.add_FedFMServicer_to_server(Frozen(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        stub = rpc.FedFMStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        began = time.monotonic()
        send = split_send(stub, (), began + 1.0, 1 << 20)
        with pytest.raises(grpc.RpcError) as err:
            send({"round": 1, "micro": 0, "phase": "forward"}, {"h": encode(torch.ones(1, 2, 4), 32)})
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - began < 10
        with pytest.raises(CutError, match="deadline passed"):
            split_send(stub, (), time.monotonic() - 1, 1 << 20)({"round": 1}, {})
    finally:
        release.set()
        server.stop(grace=None)
