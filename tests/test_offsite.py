"""Offsite tuning (sharing.mode = "offsite") and the layer selection it is built from."""

from __future__ import annotations

import json
import tomllib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fedfm
from fedfm.config import ConfigError, make_config
from fedfm.models.layers import keep_layers, layer_list, rename_layers
from fedfm.models.resolve import ModelError
from fedfm.models.state import get_trainable_state, set_trainable_state
from fedfm.sharing import SHARING_MODES
from fedfm.sharing.offsite import emulator_plan
from fedfm.tasks.setup import build_bundle, prepare_data

LABELS = ["money", "music", "sport"]


def test_emulator_plans_by_hand():
    assert emulator_plan(6, 1, 2).kept == (0, 1, 4, 5)  # middle 1..4, first and last kept
    assert emulator_plan(6, 1, None).kept == (0, 1, 4, 5)  # half of the middle, rounded up
    assert emulator_plan(6, 1, 1).kept == (0, 2, 5)
    assert emulator_plan(6, 1, 0).kept == (0, 5)
    assert emulator_plan(6, 1, 4).kept == tuple(range(6))  # nothing dropped
    assert emulator_plan(12, 2, 3).kept == (0, 1, 2, 6, 9, 10, 11)  # middle 2..9: 0, 3.5→4, 7 steps in
    assert emulator_plan(12, 2, 3).adapter == (0, 1, 10, 11)
    assert emulator_plan(7, 1, None).kept == (0, 1, 3, 5, 6)  # 5 middle layers → 3
    with pytest.raises(ModelError, match="adapter_layers = 4"):
        emulator_plan(6, 4, 0)
    with pytest.raises(ModelError, match="emulator_layers = 5"):
        emulator_plan(6, 1, 5)


@given(st.integers(2, 40), st.integers(1, 20), st.integers(0, 40) | st.none())
def test_emulator_plans_keep_the_adapter_and_thin_only_the_middle(n, k, keep):
    if 2 * k > n or (keep is not None and keep > n - 2 * k):
        with pytest.raises(ModelError):
            emulator_plan(n, k, keep)
        return
    plan = emulator_plan(n, k, keep)
    middle = n - 2 * k
    expected = (middle + 1) // 2 if keep is None else keep
    assert list(plan.kept) == sorted(set(plan.kept)) and len(plan.kept) == 2 * k + expected
    assert plan.adapter == tuple(range(k)) + tuple(range(n - k, n))
    assert set(plan.adapter) <= set(plan.kept) and all(0 <= i < n for i in plan.kept)
    if expected >= 2:  # the first and the last middle layer stay: the thinning is uniform over the middle
        assert plan.kept[k] == k and plan.kept[-k - 1] == n - k - 1


def test_rename_layers_maps_positions_to_fm_indices_and_nothing_else():
    state = {
        "base_model.model.bert.encoder.layer.1.attention.self.query.lora_A.weight": 1,
        "base_model.model.bert.encoder.layer.0.output.dense.lora_B.weight": 2,
        "classifier.weight": 3,
        "bert.embeddings.layer.1.x": 4,  # another stack's layer 1: untouched
    }
    out = rename_layers(state, "base_model.model.bert.encoder.layer", {0: 0, 1: 3})
    assert out == {
        "base_model.model.bert.encoder.layer.3.attention.self.query.lora_A.weight": 1,
        "base_model.model.bert.encoder.layer.0.output.dense.lora_B.weight": 2,
        "classifier.weight": 3,
        "bert.embeddings.layer.1.x": 4,
    }


def _randomise(bundle, seed):
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=g) * 0.1 for k, v in get_trainable_state(bundle.trainable).items()
    }


def _logits(bundle, texts):
    enc = bundle.tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    bundle.model.eval()
    with torch.no_grad():
        return bundle.model(**enc).logits


TEXTS = ["match goal team player", "bank market shares profit", "album band song"]


def test_an_emulator_that_drops_no_layer_is_the_full_model(offsite_config):
    cfg = make_config(offsite_config(offsite={"emulator_layers": 2}))  # 4 layers: 1 + 2 + 1, none dropped
    mode = SHARING_MODES.get("offsite")
    emulator = build_bundle(mode.client_view(cfg), LABELS)
    server = mode.server_model(cfg, LABELS)
    assert len(layer_list(emulator.model)[1]) == 4
    state = _randomise(emulator, 1)
    set_trainable_state(emulator.trainable, state)
    set_trainable_state(server.bundle.trainable, server.params(state))
    torch.testing.assert_close(_logits(emulator, TEXTS), _logits(server.bundle, TEXTS))
    # only the adapter layers (0 and 3) carry LoRA, in both
    layers = {int(k.split("layer.")[1].split(".")[0]) for k in state if "lora" in k}
    assert layers == {0, 3}


def test_the_adapter_plugs_into_the_fm_at_its_own_layers(offsite_config):
    cfg = make_config(offsite_config(offsite={"emulator_layers": 0}))  # layers 0 and 3 only
    mode = SHARING_MODES.get("offsite")
    emulator = build_bundle(mode.client_view(cfg), LABELS)
    server = mode.server_model(cfg, LABELS)
    assert len(layer_list(emulator.model)[1]) == 2 and emulator.model.config.num_hidden_layers == 2
    assert emulator.num_total() < server.bundle.num_total()
    state = _randomise(emulator, 2)
    plugged = server.params(state)
    set_trainable_state(server.bundle.trainable, plugged)  # every key the FM's adapter has: no KeyError
    assert set(plugged) == set(server.bundle.trainable)
    top = [k for k in state if ".layer.1." in k]
    assert top and all(torch.equal(plugged[k.replace(".layer.1.", ".layer.3.")], state[k]) for k in top)
    # the middle layers matter: the emulator's predictions are not the FM's
    set_trainable_state(emulator.trainable, state)
    assert not torch.allclose(_logits(emulator, TEXTS), _logits(server.bundle, TEXTS))


def test_keeping_layers_of_a_causal_lm_renumbers_its_cache(tiny_llama_dir, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    keep_layers(model, [1])
    assert model.config.num_hidden_layers == 1 and model.model.layers[0].self_attn.layer_idx == 0
    enc = smollm2_tokenizer(["hello there"], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=3, do_sample=False)  # the key-value cache works
    assert out.shape[1] == enc["input_ids"].shape[1] + 3


def test_peft_layers_adapt_or_train_only_those_layers(tiny_config):
    lora = build_bundle(make_config(tiny_config(peft={"method": "lora", "r": 4, "layers": [1]})), LABELS)
    assert {k for k in lora.trainable if "lora" in k} and all(
        ".layer.1." in k for k in lora.trainable if "lora" in k
    )
    full = build_bundle(make_config(tiny_config(peft={"method": "full", "layers": [0]})), LABELS)
    trained = [k for k in full.trainable]
    assert all(k.startswith(("bert.encoder.layer.0.", "classifier.")) for k in trained)
    assert any(k.startswith("classifier.") for k in trained)
    with pytest.raises(ModelError, match=r"model.layers = \[0, 5\]: the model has layers 0..1"):
        build_bundle(make_config(tiny_config(model={"layers": [0, 5]})), LABELS)
    with pytest.raises(ModelError, match="peft.layers names layers"):
        build_bundle(make_config(tiny_config(model={"layers": [0]}, peft={"layers": [1]})), LABELS)
    with pytest.raises(ConfigError, match="peft.layers does not apply"):
        make_config(tiny_config(peft={"method": "ia3", "layers": [0]}))
    with pytest.raises(ModelError, match="strictly increasing"):
        build_bundle(make_config(tiny_config(model={"layers": [1, 0]})), LABELS)


@pytest.mark.parametrize(
    "sections, field",
    [
        ({"peft": {"method": "head"}}, "peft.method"),
        ({"model": {"layers": [0, 1]}}, "model.layers"),
        ({"task": {"baselines": True}}, "task.baselines"),
        ({"strategy": {"lora_aggregation": "stack"}}, "lora_aggregation"),
        ({"peft": {"method": "ia3"}}, "peft.method"),
        ({"offsite": {"adapter_layers": 3}}, "offsite.adapter_layers = 3"),
        ({"offsite": {"emulator_layers": 3}}, "offsite.emulator_layers = 3"),
        ({"task": {"kind": "image_classification"}, "data": {"name": "digits"}, "model": {}}, "task.kind"),
    ],
)
def test_offsite_refuses_what_it_cannot_run(offsite_config, sections, field):
    raw = offsite_config(**sections)
    if "model" in sections and not sections["model"]:
        raw.pop("model")
    with pytest.raises(ConfigError, match=field):
        make_config(raw)


def test_an_offsite_run_records_both_accuracies_and_exports_the_plugged_in_adapter(
    offsite_config, bert4_dir, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedfm.server.export import export_run

    cfg = make_config(offsite_config(offsite={"emulator_layers": 0}))
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    sharing = next(r for r in records if r.get("event") == "sharing")
    assert sharing["emulator_layers"] == [0, 3] and sharing["adapter_layers"] == [0, 3]
    assert sharing["client_params"] < sharing["server_params"]
    final = result.final_metrics
    assert 0 <= final["test_accuracy"] <= 1 and 0 <= final["emulator_test_accuracy"] <= 1
    report = (result.run_dir / "report.html").read_text()
    assert (
        "<h2>Computation</h2>" in report and "<b>offsite</b>" in report and "emulator the clients" in report
    )
    # the exported adapter loads with plain peft onto the FM and gives the plug-in's numbers
    base = AutoModelForSequenceClassification.from_pretrained(
        bert4_dir, num_labels=3, ignore_mismatched_sizes=True
    )
    model = PeftModel.from_pretrained(base, result.run_dir / "adapter").eval()
    test = prepare_data(cfg).test
    tok = AutoTokenizer.from_pretrained(result.run_dir / "adapter")
    enc = tok(test.texts, truncation=True, max_length=16, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    labels = torch.as_tensor(test.labels)
    assert F.cross_entropy(logits, labels).item() == pytest.approx(final["test_loss"], rel=1e-4)
    # `fedfm export` from the run folder writes the same plugged-in adapter
    export_run(result.run_dir, tmp_path / "exported")
    base = AutoModelForSequenceClassification.from_pretrained(
        bert4_dir, num_labels=3, ignore_mismatched_sizes=True
    )
    again = PeftModel.from_pretrained(base, tmp_path / "exported").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**enc).logits, logits)


def test_deployed_clients_are_sent_the_emulator(offsite_config):
    pytest.importorskip("grpc")
    from fedfm.deploy.view import client_config_toml as client_config

    cfg = make_config(offsite_config(offsite={"emulator_layers": 0}))
    sent = tomllib.loads(client_config(cfg))
    assert sent["model"]["layers"] == [0, 3] and sent["peft"]["layers"] == [0, 3]
    assert sent["sharing"]["mode"] == "none"
    assert make_config(sent).model.layers == [0, 3]  # a valid config the client builds its model from


def test_clients_of_an_emulator_count_fewer_flops_and_bytes_than_clients_of_the_fm(offsite_config, tmp_path):
    costs = {}
    for mode in ("none", "offsite"):
        raw = offsite_config(run={"rounds": 1}, sharing={"mode": mode}, training={"count_costs": True})
        raw["offsite"] = {"emulator_layers": 0}
        result = fedfm.run(make_config(raw), output=tmp_path / mode, progress=False)
        lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        clients = [r for r in lines if r.get("event") == "client"]
        rnd = next(r for r in lines if r.get("event") == "round" and r["round"] == 1)
        assert len(clients) == 4 and all(r["flops"] > 0 and r["peak_memory_bytes"] > 0 for r in clients)
        assert rnd["client_flops_mean"] == pytest.approx(sum(r["flops"] for r in clients) / 4)
        costs[mode] = clients[0]
    full, emulator = costs["none"], costs["offsite"]
    # same client, same batches: two of four layers run, and the adapter trains in both
    assert emulator["flops"] < full["flops"]
    assert emulator["memory_weights_bytes"] < full["memory_weights_bytes"]
    assert emulator["memory_activations_bytes"] < full["memory_activations_bytes"]
    assert "FLOPs per client" in (tmp_path / "offsite" / "report.html").read_text()


def test_offsite_tuning_of_a_causal_lm(instruction_config, tmp_path):
    raw = instruction_config(sharing={"mode": "offsite"}, model={"layers": None})
    raw["offsite"] = {"emulator_layers": 0}
    raw["model"].pop("layers")
    result = fedfm.run(make_config(raw), output=tmp_path / "r", progress=False)
    final = result.final_metrics
    assert "test_perplexity" in final and "emulator_test_perplexity" in final


@pytest.mark.parametrize(
    "sections",
    [
        {
            "privacy": {"dp": "client", "noise_multiplier": 0.5, "clip_norm": 1.0},
            "strategy": {"weighting": "uniform"},
        },
        {"strategy": {"server_optimizer": "adam", "server_lr": 1e-2, "objective": "fedprox", "mu": 0.1}},
        {"strategy": {"aggregator": "trimmed_mean", "byzantine": 1}},
    ],
    ids=["client-dp", "fedadam-fedprox", "trimmed-mean"],
)
def test_offsite_tuning_composes_with_dp_and_the_strategies(offsite_config, tmp_path, sections):
    raw = offsite_config(run={"rounds": 1}, **sections)
    raw["offsite"] = {"emulator_layers": 0}
    result = fedfm.run(make_config(raw), output=tmp_path / "r", progress=False)
    final = result.final_metrics
    assert final["num_clients"] == 4 and "emulator_test_accuracy" in final
    if "privacy" in sections:  # the accounted release is the emulator's adapter update, as in any run
        assert final["epsilon"] > 0


def test_a_distilled_emulator_is_closer_to_the_fm_and_distils_the_same_on_resume(offsite_config, tmp_path):
    import json as _json

    from tests.conftest import make_rows

    public = tmp_path / "public.jsonl"  # public texts, never a client's
    public.write_text("\n".join(_json.dumps({"text": r["text"]}) for r in make_rows(6, seed=9)))
    raw = offsite_config(run={"rounds": 1})
    raw["offsite"] = {
        "emulator_layers": 1,
        "distill_steps": 25,
        "distill_path": str(public),
        "distill_lr": 1e-3,
    }
    result = fedfm.run(make_config(raw), output=tmp_path / "r", progress=False)
    lines = [_json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    distill = next(r for r in lines if r.get("event") == "distill")
    assert distill["steps"] == 25 and distill["texts"] == 18
    assert distill["loss_last"] < 0.5 * distill["loss_first"]  # the thinned middle learnt the FM's
    again = fedfm.run(resume=result.run_dir, overrides=["run.rounds=2"], progress=False)
    whole = fedfm.run(
        make_config({**raw, "run": {**raw["run"], "rounds": 2}}), output=tmp_path / "w", progress=False
    )
    assert again.final_metrics["test_loss"] == pytest.approx(whole.final_metrics["test_loss"], rel=1e-5)
    with pytest.raises(ConfigError, match="distill_path"):
        make_config({**raw, "offsite": {"distill_steps": 5}})


def test_the_packaged_layer_counts_are_the_models_own(bert4_dir):
    from transformers import AutoConfig

    from fedfm.models.resolve import resolve_model
    from fedfm.sharing.offsite import fm_num_layers

    assert (
        fm_num_layers(make_config({}).model)
        == AutoConfig.from_pretrained(resolve_model("minilm")).num_hidden_layers
    )
    assert fm_num_layers(make_config({"model": {"name": str(bert4_dir)}}).model) == 4  # read from config.json


def _public_texts(tmp_path):
    from tests.conftest import make_rows

    public = tmp_path / "public.jsonl"  # public texts, never a client's
    public.write_text("\n".join(json.dumps({"text": r["text"]}) for r in make_rows(6, seed=9)))
    return public


def test_emulator_weights_load_only_when_they_are_exactly_the_middle_layers(offsite_config, tmp_path):
    from fedfm.sharing.offsite import emulator_config, emulator_weights, load_emulator_weights

    raw = offsite_config()
    raw["offsite"] = {"emulator_layers": 1, "distill_steps": 1, "distill_path": str(_public_texts(tmp_path))}
    cfg = make_config(raw)
    server = build_bundle(emulator_config(cfg), LABELS)
    sent = emulator_weights(server, cfg)
    assert sent and all(k.startswith("1.") for k in sent)  # the one kept middle layer (position 1)
    g = torch.Generator().manual_seed(0)
    sent = {k: v + torch.randn(v.shape, generator=g) * 0.01 for k, v in sent.items()}  # "distilled"
    client = build_bundle(emulator_config(cfg), LABELS)
    before = {k: v.clone() for k, v in emulator_weights(client, cfg).items()}
    for bad, reason in [
        ({**sent, "1.extra.weight": torch.ones(1)}, "unexpected"),
        ({k: v for k, v in list(sent.items())[1:]}, "missing"),
        ({k: (v[:1] if i == 0 else v) for i, (k, v) in enumerate(sent.items())}, "expected"),
        ({k: v * float("nan") for k, v in sent.items()}, "non-finite"),
    ]:
        with pytest.raises(ValueError, match=reason):
            load_emulator_weights(client, cfg, bad)
        for k, v in emulator_weights(client, cfg).items():  # nothing was loaded
            assert torch.equal(v, before[k])
    load_emulator_weights(client, cfg, sent)
    for k, v in emulator_weights(client, cfg).items():
        assert torch.equal(v, sent[k])


def test_deployed_clients_train_on_the_servers_distilled_emulator(offsite_config, tmp_path):
    """Real processes: the server distils, ships the middle layers (GetModel), and the run ends
    with the simulation's parameters, which it could not with the undistilled emulator."""
    pytest.importorskip("grpc")
    import tomli_w
    from tests.deploy_tools import free_port, make_certificates, run_federation, write_tokens

    from fedfm.server.checkpoint import load_checkpoint

    raw = offsite_config(partition={"method": "iid", "num_clients": 3}, sampling={"fraction": 1.0})
    raw["validation"] = {"max_num_examples": 1000, "max_update_norm": 100.0}
    raw["offsite"] = {"emulator_layers": 1, "distill_steps": 10, "distill_path": str(_public_texts(tmp_path))}
    path = tmp_path / "exp.toml"
    path.write_text(tomli_w.dumps(raw))
    certs = make_certificates(tmp_path / "certs", sites=3)
    port, tokens = free_port(), write_tokens(tmp_path / "tokens.txt", 3)
    run_federation(path, tmp_path, certs, tokens, tmp_path / "deployed", port)
    assert "loaded the server's distilled emulator" in (tmp_path / "c0.log").read_text()
    simulated = fedfm.run(make_config(raw), output=tmp_path / "simulated", progress=False)
    deployed = load_checkpoint(tmp_path / "deployed" / "checkpoint").params
    local = load_checkpoint(simulated.run_dir / "checkpoint").params
    for k in local:
        torch.testing.assert_close(deployed[k], local[k], atol=1e-5, rtol=1e-4)
