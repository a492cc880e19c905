"""Split fine-tuning (sharing.mode = "split"): the cut, what crosses it, and who holds what."""

from __future__ import annotations

import json

import pytest
import torch
from tests.test_offsite import LABELS

import fedfm
from fedfm.config import ConfigError, make_config
from fedfm.models.state import get_trainable_state, set_trainable_state
from fedfm.server.driver import RunFailedError
from fedfm.sharing.split.codec import CutError, roundtrip
from fedfm.sharing.split.mode import Exchange
from fedfm.sharing.split.payload import client_part, is_server_key, split_update
from fedfm.tasks.setup import build_bundle
from fedfm.types import Update


@pytest.fixture
def split_config(offsite_config):
    def make(**split):
        raw = offsite_config(sharing={"mode": "split"})
        raw["split"] = {"cut_layer": 2, **split}
        return raw

    return make


def _batch(bundle):
    texts = ["match goal team player", "bank market shares profit", "album band song", "cup race win"]
    enc = bundle.tokenizer(texts, padding="max_length", max_length=8, truncation=True, return_tensors="pt")
    return enc, torch.tensor([2, 0, 1, 2])


def _gradients(bundle, exchange=None):
    enc, labels = _batch(bundle)
    bundle.model.train()
    for p in bundle.trainable.values():
        p.grad = None
    torch.manual_seed(0)
    cuts = bundle.parts
    with cuts.training(exchange) if exchange is not None else torch.enable_grad():
        loss = torch.nn.functional.cross_entropy(bundle.model(**enc).logits, labels)
        loss.backward()
    return {k: p.grad.clone() for k, p in bundle.trainable.items()}


@pytest.mark.parametrize("u_shaped", [False, True])
def test_a_split_computes_the_unsplit_models_gradients(split_config, u_shaped):
    bundle = build_bundle(make_config(split_config(u_shaped=u_shaped)), LABELS)
    g = torch.Generator().manual_seed(3)
    set_trainable_state(
        bundle.trainable,
        {
            k: torch.randn(v.shape, generator=g) * 0.1
            for k, v in get_trainable_state(bundle.trainable).items()
        },
    )
    exchange = Exchange(32, 0.0, None)
    split, whole = _gradients(bundle, exchange), _gradients(bundle)
    assert split.keys() == whole.keys()
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], rtol=0, atol=0)
    # one batch: 4 × 8 tokens × 32 values of float32 up, the same back; U-shaped: twice each way
    per_message = 4 * 8 * 32 * 4
    assert exchange.bytes_up == exchange.bytes_down == per_message * (2 if u_shaped else 1)
    assert exchange.messages == 1


def test_compressed_cut_messages_are_close_and_smaller():
    t = torch.randn(3, 5, 16)
    same, n32 = roundtrip(t, 32)
    half, n16 = roundtrip(t, 16)
    q, n8 = roundtrip(t, 8)
    assert same is t and n32 == 3 * 5 * 16 * 4 and n16 == n32 // 2
    assert n8 == 3 * 5 * 16 + 4 * 3 * 5  # a byte per value and a float32 scale per row
    assert (half - t).abs().max() <= t.abs().max() / 128
    scale = t.abs().amax(-1, keepdim=True) / 127
    assert ((q - t).abs() <= scale / 2 + 1e-7).all()  # rounding to the nearest step


def test_a_client_refuses_a_bad_gradient_from_the_server():
    exchange = Exchange(32, 0.0, max_grad_norm=1.0)
    with pytest.raises(CutError, match="not finite"):
        exchange.gradient_to_client(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(CutError, match="norm 5 > split.max_cut_grad_norm = 1"):
        exchange.gradient_to_client(torch.tensor([[3.0, 4.0]]))
    assert exchange.bytes_down == 0  # nothing refused is counted as received


def test_who_holds_which_tensor():
    lora = "base_model.model.bert.encoder.layer.{}.attention.self.query.lora_A.weight"
    assert not is_server_key(lora.format(1), 2, False) and is_server_key(lora.format(2), 2, False)
    assert is_server_key("base_model.model.classifier.modules_to_save.weight", 2, False)
    assert not is_server_key(
        "base_model.model.classifier.modules_to_save.weight", 2, True
    )  # U: the head is the client's
    assert not is_server_key("bert.embeddings.word_embeddings.weight", 2, False)
    assert is_server_key("model.layers.30.mlp.down_proj.lora_B.weight", 2, True)
    delta = {lora.format(i): torch.full((1,), float(i)) for i in range(4)} | {
        "classifier.weight": torch.ones(1)
    }
    parts = split_update(Update(delta, 5, {"train_loss": 1.0}), 2, False)
    assert set(parts.tensors()["p"]) == {lora.format(0), lora.format(1)}
    assert set(parts.server_delta) == {lora.format(2), lora.format(3), "classifier.weight"}
    assert parts.merged().delta.keys() == delta.keys() and parts.merged().num_examples == 5
    assert client_part(delta, 2, False).keys() == parts.client_delta.keys()


def _records(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r.get("event") == "client"], [r for r in lines if r.get("event") == "round"]


def test_a_split_run_moves_only_the_bottom_and_the_cut(split_config, tmp_path):
    from fedfm.transforms.compression import serialized_nbytes

    raw = split_config(activation_bits=8)
    raw["training"]["count_costs"] = True
    cfg = make_config(raw)
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    clients, rounds = _records(result.run_dir)
    last = rounds[-1]
    assert 0 <= result.final_metrics["test_accuracy"] <= 1
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    sharing = next(r for r in lines if r.get("event") == "sharing")
    held_params = sum(
        p.numel()
        for n, p in build_bundle(cfg, LABELS).model.named_parameters()
        if "embeddings" in n or ".layer.0." in n or ".layer.1." in n
    )  # the embeddings and layers 0-1, LoRA included; the rest (layers 2-3, pooler, head) is the server's
    assert sharing["cut_layer"] == 2 and sharing["client_params"] == held_params
    assert "The cut is after layer 1" in (result.run_dir / "report.html").read_text()
    # what a client holds: LoRA of layers 0-1 only; the server part (layers 2-3, the head) stays
    bundle = build_bundle(cfg, LABELS)
    held = client_part(get_trainable_state(bundle.trainable), 2, False)
    assert held and all(".layer.0." in k or ".layer.1." in k for k in held)
    per_client = serialized_nbytes(held)
    n = last["num_clients"]
    assert last["bytes_up"] == n * per_client + last["cut_bytes_up"]
    assert last["bytes_down"] == n * per_client + last["cut_bytes_down"]
    # 8-bit cut messages: a byte per value, a scale per token, per batch of 8 × 16 tokens
    mine = [r for r in clients if r["round"] == last["round"]]
    for r in mine:
        assert r["cut_bytes_up"] % (32 + 4) == 0 and r["cut_bytes_up"] <= r["steps"] * 8 * 16 * (32 + 4)
        assert r["cut_bytes_down"] == r["cut_bytes_up"]
        assert r["server_flops"] > 0 and r["flops"] > 0
        assert r["memory_weights_bytes"] > 0 and r["server_peak_memory_bytes"] > 0


def test_a_server_gradient_past_the_bound_fails_the_client_with_the_reason(split_config, tmp_path):
    with pytest.raises(RunFailedError) as err:
        fedfm.run(make_config(split_config(max_cut_grad_norm=1e-12)), output=tmp_path / "r", progress=False)
    _, rounds = _records(err.value.result.run_dir)
    reasons = [f["reason"] for r in rounds for f in r.get("failed", [])]
    assert reasons and all("gradient at the cut" in x and "max_cut_grad_norm" in x for x in reasons)


def test_activation_noise_changes_what_the_server_sees(split_config):
    bundle = build_bundle(make_config(split_config(activation_noise=0.5)), LABELS)
    noisy = _gradients(bundle, Exchange(32, 0.5, None, torch.Generator().manual_seed(1)))
    clean = _gradients(bundle, Exchange(32, 0.0, None))
    top = [k for k in clean if "classifier" in k]
    assert any(not torch.equal(noisy[k], clean[k]) for k in top)


@pytest.mark.parametrize(
    "sections, field",
    [
        ({"privacy": {"dp": "client", "noise_multiplier": 1.0, "clip_norm": 1.0}}, "privacy.dp"),
        ({"run": {"engine": "batched"}}, "run.engine"),
        ({"compression": {"method": "topk"}}, "compression.method"),
        ({"peft": {"method": "ia3"}}, "peft.method"),
        ({"run": {"protocol": "fedpft"}, "peft": {"method": "head"}}, "run.protocol"),
        ({"split": {"cut_layer": 4}}, "split.cut_layer = 4"),
    ],
)
def test_split_refuses_what_it_cannot_run(split_config, sections, field):
    raw = split_config()
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    with pytest.raises(ConfigError, match=field):
        make_config(raw)


@pytest.mark.parametrize("u_shaped", [False, True])
def test_split_fine_tuning_of_a_causal_lm(instruction_config, tmp_path, u_shaped):
    raw = instruction_config(sharing={"mode": "split"}, training={"count_costs": True})
    raw["split"] = {"cut_layer": 1, "u_shaped": u_shaped, "activation_bits": 16}
    result = fedfm.run(make_config(raw), output=tmp_path / "r", progress=False)
    clients, rounds = _records(result.run_dir)
    assert rounds[-1]["num_clients"] == 3 and rounds[-1]["cut_bytes_up"] > 0
    assert all(r["server_flops"] > 0 and r["flops"] > 0 for r in clients)
    assert "test_perplexity" in result.final_metrics


def test_a_tied_head_is_the_clients_embedding_too(instruction_config):
    """SmolLM2-style tied embeddings: the head the server runs is the matrix the client embeds
    with, so it counts as the client's weights, not only the server's."""
    cfg = make_config({**instruction_config(sharing={"mode": "split"}), "split": {"cut_layer": 1}})
    bundle = build_bundle(cfg, ["a"])
    model = bundle.model
    embed = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is embed  # the tiny Llama ties them
    theirs = bundle.parts.server_parameters()
    assert id(embed) not in theirs
    assert theirs  # the top layer and the final norm are the server's
    assert all(id(p) in theirs for p in model.base_model.model.model.layers[1].parameters())


def test_a_client_that_fails_mid_step_leaves_no_gradient_for_the_next(split_config):
    from fedfm.client.program import ClientJob, client_init

    cfg = make_config(split_config())
    bundle = build_bundle(cfg, LABELS)
    for p in bundle.trainable.values():
        p.grad = torch.ones_like(p)  # what a refused backward pass leaves behind
    from fedfm.algorithms.objectives import Objective
    from fedfm.types import RoundContext

    state = get_trainable_state(bundle.trainable)
    client_init(
        bundle,
        None,
        ClientJob(0, [0, 1]),
        state,
        RoundContext(round=1, seed=0),
        cfg.training,
        Objective("plain"),
    )
    assert all(p.grad is None for p in bundle.trainable.values())


def test_a_deployment_refuses_split_with_a_stateful_objective(split_config):
    pytest.importorskip("grpc")
    from fedfm.deploy.auth import DeployError
    from fedfm.deploy.server import check_deployable

    raw = split_config()
    raw["strategy"] = {"weighting": "uniform"}
    raw["validation"] = {"max_update_norm": 100.0}
    check_deployable(make_config(raw))  # plain split fine-tuning deploys (tests/test_split_remote.py)
    raw["strategy"]["objective"] = "fedprox"
    with pytest.raises(DeployError, match="strategy.objective = 'plain'"):
        check_deployable(make_config(raw))
