"""DPO / IPO losses and their metrics against hand computations (fedfm.algorithms.preference)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedfm.algorithms.preference import (
    IGNORE,
    dpo_loss,
    ipo_loss,
    reward_metrics,
    sequence_logprobs,
)


def test_the_dpo_loss_by_hand():
    # h = (−1 − (−2)) − (−3 − (−2.5)) = 1 + 0.5 = 1.5; β·h = 0.15; −log σ(0.15) = log(1 + e^−0.15)
    t = lambda x: torch.tensor([x])  # noqa: E731
    loss = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.5), beta=0.1)
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-0.15)), rel=1e-6)
    assert float(loss) == pytest.approx(0.620957, rel=1e-5)
    # IPO: (h − 1/(2β))² = (1.5 − 5)² = 12.25
    assert float(ipo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.5), beta=0.1)) == pytest.approx(12.25)
    m = reward_metrics(torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -2.0]),
                       torch.tensor([-2.5, -2.0]), beta=0.1)  # fmt: skip
    # pair 1: r_w = 0.1, r_l = −0.05 (right); pair 2: r_w = −0.2, r_l = 0.1 (wrong)
    assert m["reward_accuracy"] == 0.5 and m["reward_margin"] == pytest.approx((0.15 - 0.3) / 2)


def test_a_policy_equal_to_its_reference_has_loss_log_2():
    x = torch.tensor([-5.0, -1.0, -7.5])
    assert float(dpo_loss(x, x - 1, x, x - 1, beta=0.5)) == pytest.approx(math.log(2))


@given(st.floats(-20, 20), st.floats(0.01, 2.0))
def test_dpo_falls_as_the_policy_prefers_the_chosen_reply_more(shift, beta):
    base = dict(policy_rejected=torch.tensor([-3.0]), ref_chosen=torch.tensor([-2.0]),
                ref_rejected=torch.tensor([-3.0]), beta=beta)  # fmt: skip
    low = dpo_loss(torch.tensor([-2.0 + shift]), **base)
    high = dpo_loss(torch.tensor([-2.0 + shift + 0.5]), **base)
    assert float(high) <= float(low) + 1e-7


def test_sequence_logprobs_sum_only_the_reply_tokens_by_hand():
    # vocabulary of 2; logits at t predict the token at t+1
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[IGNORE, 0, 1]])  # the prompt's token carries no loss; replies 0 then 1
    # p(token 0 | t=0) = 1/2; p(token 1 | t=1) = 1/(3+1) = 1/4
    assert float(sequence_logprobs(logits, labels)) == pytest.approx(math.log(0.5) + math.log(0.25))
    masked = torch.tensor([[IGNORE, IGNORE, 1]])
    assert float(sequence_logprobs(logits, masked)) == pytest.approx(math.log(0.25))


# ---------------------------------------------------------------- the preference task


def _rounds(run_dir):
    import json

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == "round"]


def test_federated_dpo_runs_and_moves_the_held_out_reward_accuracy(preference_config, tmp_path):
    import fedfm
    from fedfm.config import make_config

    cfg = make_config(preference_config(eval={"batch_size": 8, "at_start": True}, run={"rounds": 3}))
    result = fedfm.run(cfg, output=tmp_path / "dpo", progress=False)
    rounds = _rounds(result.run_dir)
    start, end = rounds[0], rounds[-1]
    assert start["test_reward_margin"] == pytest.approx(0.0, abs=1e-5)  # the policy starts at π_ref
    assert start["test_loss"] == pytest.approx(math.log(2), abs=1e-5)  # −log σ(0)
    assert end["test_reward_margin"] > 0.1 and end["test_reward_accuracy"] > 0.7
    for key in ("test_reward_accuracy_by_group", "test_reward_margin_by_group", "test_loss_by_group"):
        assert set(end[key]) == {"money", "music", "sport"}
    assert len(end["generations"]) == 2 and all("answer" in g for g in end["generations"])
    report = (result.run_dir / "report.html").read_text()
    assert "Held-out reward accuracy per client group" in report and "Answers to fixed prompts" in report
    assert (result.run_dir / "reward.png").is_file()
    # π_ref is the model with its (now trained) adapter switched off: the base, unmoved
    from fedfm.models.state import set_trainable_state
    from fedfm.server.checkpoint import load_checkpoint
    from fedfm.tasks.preference import policy_logps, reference_logps

    _, bundle, task = _task(cfg)
    stored = task.train.reference_logps.clone()
    set_trainable_state(bundle.trainable, load_checkpoint(result.run_dir / "checkpoint").params)
    assert torch.allclose(reference_logps(bundle.model, task.train, task.pad_id, 8, "cpu"), stored, atol=1e-5)
    with torch.no_grad():
        policy = policy_logps(bundle.model.eval(), task.batch(task.train, range(8), "cpu"))[0]
    assert not torch.allclose(policy, stored[:8, 0], atol=1e-3)  # while the policy moved


def _task(cfg):
    from fedfm.tasks.setup import build_task, prepare_data

    data = prepare_data(cfg)
    bundle, task = build_task(cfg, data)
    return data, bundle, task


def test_a_pairs_log_probs_sum_over_its_reply_tokens_alone_whatever_the_padding(preference_config):
    from fedfm.config import make_config
    from fedfm.tasks.preference import policy_logps

    cfg = make_config(preference_config())
    _, bundle, task = _task(cfg)
    model = bundle.model.eval()
    rows = [0, 1, 2]
    with torch.no_grad():
        chosen, rejected = policy_logps(model, task.batch(task.train, rows, "cpu"))
        for side, got in (("chosen", chosen), ("rejected", rejected)):
            for j, r in enumerate(rows):  # one unpadded row at a time, summed by hand
                ids = getattr(task.train, f"{side}_ids")[r]
                labels = getattr(task.train, f"{side}_labels")[r]
                logp = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1].float(), -1)
                reply = (labels[1:] != IGNORE).nonzero().flatten()
                assert 0 < len(reply) < len(ids) - 1  # the prompt carries no label
                assert got[j] == pytest.approx(float(logp[reply, labels[1:][reply]].sum()), abs=1e-4)
        # the loss on that batch is DPO's on those log-probs and the stored π_ref ones
        ref = task.train.reference_logps[rows]
        loss = task.loss(model, task.batch(task.train, rows, "cpu"))
    assert float(loss) == pytest.approx(
        float(dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], 0.5)), abs=1e-5
    )


def test_an_sft_adapter_is_merged_in_as_the_start_and_the_reference(
    preference_config, instruction_config, tmp_path
):
    import fedfm
    from fedfm.config import make_config
    from fedfm.tasks.preference import policy_logps

    sft = fedfm.run(
        make_config(instruction_config(run={"rounds": 1})), output=tmp_path / "sft", progress=False
    )
    folder = str(sft.run_dir / "adapter")
    cfg = make_config(preference_config(task={"kind": "preference", "reference_adapter": folder}))
    _, _, task = _task(cfg)
    # the SFT model (base + its adapter) scores the pairs as π_ref does
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(cfg.model.name, dtype=torch.float32)
    with_sft = PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        chosen = policy_logps(with_sft, task.batch(task.train, range(6), "cpu"))[0]
    plain = make_config(preference_config())
    _, _, untuned = _task(plain)
    assert torch.allclose(chosen, task.train.reference_logps[:6, 0], atol=1e-4)
    assert not torch.allclose(
        untuned.train.reference_logps[:6, 0], task.train.reference_logps[:6, 0], atol=1e-3
    )
    bad = make_config(preference_config(task={"kind": "preference", "reference_adapter": str(tmp_path)}))
    with pytest.raises(ValueError, match="reference_adapter"):
        _task(bad)


def test_ipo_and_an_sft_term_train_and_baselines_compare_federated_local_and_centralized(
    preference_config, tmp_path
):
    import json

    import fedfm
    from fedfm.config import make_config

    cfg = make_config(
        preference_config(
            task={"kind": "preference", "preference_loss": "ipo", "sft_weight": 0.5, "baselines": True},
            run={"rounds": 1},
        )
    )
    result = fedfm.run(cfg, output=tmp_path / "ipo", progress=False)
    assert math.isfinite(_rounds(result.run_dir)[-1]["test_loss"])
    baselines = json.loads((result.run_dir / "baselines.json").read_text())
    assert [r["setting"] for r in baselines["rows"]] == ["federated", "local-only", "centralized"]
    assert all(0 <= r["all_held_out"]["reward_accuracy"] <= 1 for r in baselines["rows"])
    assert "reward_accuracy" in (result.run_dir / "baselines.md").read_text()


@pytest.mark.parametrize(
    "sections, field",
    [
        ({"task": {"kind": "preference", "packing": True}}, "task.packing"),
        ({"privacy": {"dp": "example", "noise_multiplier": 1.0}}, "privacy.dp"),
        ({"peft": {"method": "full"}}, "PEFT adapter"),
        ({"strategy": {"lora_aggregation": "stack"}}, "lora_aggregation"),
    ],
)
def test_preference_refuses_what_it_cannot_run(preference_config, sections, field):
    from fedfm.config import ConfigError, make_config

    with pytest.raises((ConfigError, ValueError), match=field):
        make_config(preference_config(**sections))


def test_bad_pairs_are_refused_with_the_row(tmp_path):
    import json

    from fedfm.data.preference import rows_to_pairs
    from fedfm.data.sources import DataError

    good = {"prompt": "hi", "chosen": "hello there", "rejected": "go away"}
    with pytest.raises(DataError, match="row 2.*missing rejected"):
        rows_to_pairs([good, {"prompt": "hi", "chosen": "x"}], "topic", "pairs.jsonl")
    with pytest.raises(DataError, match="row 1.*same reply"):
        rows_to_pairs([{**good, "rejected": "hello there"}], "topic", "pairs.jsonl")
    with pytest.raises(DataError, match="end with a user turn"):
        rows_to_pairs([{**good, "prompt": [{"role": "assistant", "content": "x"}]}], "topic", "p")
    conversational = {**good, "chosen": [{"role": "assistant", "content": "hello there"}]}
    pair = json.loads(rows_to_pairs([conversational], "topic", "p").texts[0])
    assert pair == {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": "hello there",
        "rejected": "go away",
    }


def test_the_shipped_pairs_load_with_their_provenance():
    import json

    from fedfm.data.preference import load_preference_source, shipped_path

    class Cfg:
        name = "chatterbot-preference"

    train, test = load_preference_source(Cfg())
    assert test is None and len(train) >= 300 and len(train.label_names) >= 15
    rows = [json.loads(line) for line in shipped_path().read_text().splitlines()]
    assert all(r["provenance"]["rejected"].startswith("greedy reply of the untuned") for r in rows)
    assert all(r["chosen"].strip() != r["rejected"].strip() for r in rows)


def test_synth_preference_writes_resumes_and_refuses_other_settings(tmp_path):
    import json

    from fedfm.synthetic.generate import SynthError
    from fedfm.synthetic.preference import PreferenceSettings, preference_pairs

    # the real packaged SmolLM2 (cached as safetensors), 4 greedy tokens per prompt
    settings = PreferenceSettings("smollm2-135m", per_category=1, max_new_tokens=4, batch_size=21)
    out = tmp_path / "pairs.jsonl"
    first = preference_pairs(settings, out, device="cpu", note=lambda _: None)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert first["written"] == len(rows) >= 15 and len(rows) + sum(first["dropped"].values()) == 21
    assert len({r["category"] for r in rows}) == len(rows)  # one per category
    assert all(r["rejected"].strip() and r["rejected"] != r["chosen"] for r in rows)
    assert rows[0]["provenance"]["rejected"] == "greedy reply of the untuned smollm2-135m"
    again = preference_pairs(settings, out, device="cpu", note=lambda _: None)
    assert again["written"] == len(rows) and len(out.read_text().splitlines()) == len(rows)
    with pytest.raises(SynthError, match="other settings"):
        preference_pairs(PreferenceSettings("smollm2-135m", per_category=2), out, note=lambda _: None)


def test_the_cli_synth_preference_drops_blank_replies_and_says_why(tiny_llama_dir, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "pairs.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "fedfm.cli", "synth", "--preference", "--output", str(out), "--generator",
         str(tiny_llama_dir), "--per-category", "1", "--max-new-tokens", "3", "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    # a random tiny model answers with blank lines: every pair is dropped, and the count says why
    assert "wrote 0 preference pairs" in done.stdout and "'empty': 21" in done.stdout
    assert out.read_text() == ""
