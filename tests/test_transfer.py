"""Knowledge transfer between the FM and small client models (sharing.mode = "transfer")."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tests.conftest import make_rows

import fedfm
from fedfm.algorithms.distill import distillation_loss, ensemble_logits
from fedfm.config import ConfigError, make_config
from fedfm.server.checkpoint import ClientStore
from fedfm.transforms.compression import serialized_nbytes


def test_the_distillation_loss_by_hand():
    s = torch.zeros(1, 2, requires_grad=True)
    t = torch.tensor([[math.log(3.0), 0.0]])  # softmax (0.75, 0.25) against the student's (0.5, 0.5)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert distillation_loss(s, t, 1.0).item() == pytest.approx(kl, rel=1e-6)
    assert distillation_loss(s, 2 * t, 2.0).item() == pytest.approx(4 * kl, rel=1e-6)  # τ² · KL at τ
    assert distillation_loss(t.clone(), t, 3.0).item() == pytest.approx(0.0, abs=1e-7)
    teacher = t.clone().requires_grad_(True)
    distillation_loss(s, teacher, 1.0).backward()
    assert teacher.grad is None and s.grad is not None  # the teacher is a target
    # the gradient with respect to the student's logits is τ (p_s − p_t) / rows, here (−0.25, 0.25)
    torch.testing.assert_close(s.grad, torch.tensor([[-0.25, 0.25]]))


def test_the_ensemble_is_the_weighted_mean():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[5.0, 4.0]])
    torch.testing.assert_close(ensemble_logits([a, b], [1, 3]), torch.tensor([[4.0, 3.0]]))
    with pytest.raises(ValueError):
        ensemble_logits([a], [1, 2])


@pytest.fixture
def transfer_config(offsite_config, tiny_model_dir, bert4_dir, tmp_path):
    public = tmp_path / "public.jsonl"  # public texts: the same kinds of words, other draws, no labels used
    public.write_text("\n".join(json.dumps({"text": r["text"]}) for r in make_rows(10, seed=5)))
    raw = offsite_config(sharing={"mode": "transfer"}, training={"local_steps": 2})
    raw["transfer"] = {
        "path": str(public),
        "client_models": [
            {"name": str(tiny_model_dir), "init": "random"},
            {"name": str(bert4_dir), "layers": [0]},
        ],
        "server_steps": 3,
    }
    return raw


def _lines(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_transfer_run_moves_only_logits_between_different_models(transfer_config, tmp_path):
    result = fedfm.run(make_config(transfer_config), output=tmp_path / "r", progress=False)
    lines = _lines(result.run_dir)
    sharing = next(r for r in lines if r.get("event") == "sharing")
    assert sharing["transfer_examples"] == 30
    assert [m["params"] for m in sharing["client_models"]] != [sharing["server_params"]] * 2
    rounds = [r for r in lines if r.get("event") == "round" and r["round"] > 0]
    clients = [r for r in lines if r.get("event") == "client"]
    assert {r["model"] for r in clients} == {0, 1}  # both architectures took part
    message = serialized_nbytes({"logits": torch.zeros(30, 3)})  # 30 texts × 3 classes, float32
    assert 360 < message < 360 + 200  # the values and a small safetensors header
    for r in rounds:
        assert r["bytes_up"] == r["num_clients"] * message and r["bytes_down"] == len(r["cohort"]) * message
        assert r["server_distill_loss"] >= 0
    final = result.final_metrics
    assert 0 <= final["test_accuracy"] <= 1 and 0 <= final["client_test_accuracy_mean"] <= 1
    assert set(ClientStore(result.run_dir / "checkpoint").all()) == {0, 1, 2, 3}
    assert (result.run_dir / "adapter" / "adapter_config.json").is_file()
    report = (result.run_dir / "report.html").read_text()
    assert "<b>transfer</b>" in report and "the clients' own models" in report


def test_a_resumed_transfer_run_continues_where_it_stopped(transfer_config, tmp_path):
    whole = fedfm.run(make_config(transfer_config), output=tmp_path / "whole", progress=False)
    first = {**transfer_config, "run": {**transfer_config["run"], "rounds": 1}}
    fedfm.run(make_config(first), output=tmp_path / "parts", progress=False)
    resumed = fedfm.run(resume=tmp_path / "parts", overrides=["run.rounds=2"], progress=False)
    for key in ("test_accuracy", "test_loss", "client_test_accuracy_mean"):
        assert resumed.final_metrics[key] == pytest.approx(whole.final_metrics[key], rel=1e-5)


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda raw: raw["transfer"].pop("path"), "transfer.path"),
        (
            lambda raw: raw.setdefault("privacy", {}).update(
                dp="client", noise_multiplier=1.0, clip_norm=1.0
            ),
            "privacy.dp",
        ),
        (lambda raw: raw.setdefault("run", {}).update(engine="batched"), "run.engine"),
        (
            lambda raw: (
                raw.setdefault("sharing", {}).update(mode="none") or raw["run"].update(protocol="transfer")
            ),
            "sharing.mode",
        ),
    ],
)
def test_transfer_refuses_what_it_cannot_run(transfer_config, change, field):
    change(transfer_config)
    with pytest.raises(ConfigError, match=field):
        make_config(transfer_config)


def test_the_fm_warms_up_on_labelled_synthetic_data_before_it_teaches(transfer_config, tmp_path):
    from tests.conftest import WORDS

    synth = tmp_path / "synth.jsonl"
    rows = [
        {"text": f"synthetic {label} {i} {words}", "label": label, "synthetic": True}
        for label, words in WORDS.items()
        for i in range(6)
    ]
    synth.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {**transfer_config, "run": {**transfer_config["run"], "rounds": 1}}
    cold = fedfm.run(make_config(base), output=tmp_path / "cold", progress=False)
    warm_cfg = {**base, "synthetic": {"mode": "warmup", "path": str(synth), "warmup_steps": 12}}
    warm = fedfm.run(make_config(warm_cfg), output=tmp_path / "warm", progress=False)
    lines = _lines(warm.run_dir)
    event = next(r for r in lines if r.get("event") == "warmup")
    assert event["steps"] == 12 and event["num_synthetic"] == 18
    assert not any(r.get("event") == "warmup" for r in _lines(cold.run_dir))
    # the warm FM starts round 1 from another state than the cold one: its round-0 score differs
    cold0, warm0 = (next(r for r in _lines(run.run_dir) if r.get("round") == 0) for run in (cold, warm))
    assert warm0["test_loss"] != cold0["test_loss"]
    with pytest.raises(ConfigError, match="synthetic.mode"):
        make_config({**base, "synthetic": {"mode": "augment", "path": str(synth)}})
