"""Instruction tuning: formatting and loss masking, data loaders, and a run on a tiny Llama."""

import json

import numpy as np
import pytest
import torch

import fedfm
from fedfm.config import make_config
from fedfm.data.instruction import chatterbot, messages_of, row_messages, rows_to_conversations
from fedfm.data.sources import DataError
from fedfm.tasks.instruction import IGNORE, format_conversation, pack, pad_batch

HI = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]


def test_only_the_reply_tokens_carry_loss(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids, labels, truncated = format_conversation(tok, HI, 200)
    assert ids == tok.apply_chat_template(HI, tokenize=True)["input_ids"] or ids == list(
        tok.apply_chat_template(HI, tokenize=True)
    )
    # Hand-checked: the rendering ends "<|im_start|>assistant\nhello there<|im_end|>\n"; the loss
    # falls on exactly the last four tokens: "hello", " there", "<|im_end|>", "\n".
    carrying = [i for i, lab in enumerate(labels) if lab != IGNORE]
    assert carrying == list(range(len(ids) - 4, len(ids)))
    assert tok.decode([ids[i] for i in carrying]) == "hello there<|im_end|>\n"
    assert [labels[i] for i in carrying] == [ids[i] for i in carrying]
    assert tok.decode(ids[: len(ids) - 4]).endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert not truncated


def test_every_assistant_turn_is_learnt_and_no_user_turn(smollm2_tokenizer):
    tok = smollm2_tokenizer
    chat = [*HI, {"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine"}]
    ids, labels, _ = format_conversation(tok, chat, 200)
    learnt = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE])
    assert learnt == "hello there<|im_end|>\nfine<|im_end|>\n"
    ids_cut, labels_cut, truncated = format_conversation(tok, chat, 10)
    assert truncated and len(ids_cut) == len(labels_cut) == 10 and ids_cut == ids[:10]


def test_dynamic_padding_and_packing():
    a, b = torch.tensor([5, 6, 7]), torch.tensor([8])
    batch = pad_batch([a, b], [torch.tensor([IGNORE, 6, 7]), torch.tensor([8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, labels = pack([a, b, a], [a, b, a], width=4)
    assert [r.tolist() for r in ids] == [[5, 6, 7, 8], [5, 6, 7]] and len(labels) == 2


def test_task_loss_matches_transformers_own_label_loss(tiny_llama_dir, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    from fedfm.tasks.instruction import token_nll

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    rows = [
        format_conversation(smollm2_tokenizer, HI, 64),
        format_conversation(
            smollm2_tokenizer, HI[:1] + [{"role": "assistant", "content": "a longer reply here"}], 64
        ),
    ]
    batch = pad_batch([torch.tensor(r[0]) for r in rows], [torch.tensor(r[1]) for r in rows], 0)
    nll, count = token_nll(model, batch)
    ours = nll.sum() / count.sum()
    assert ours.item() == pytest.approx(model(**batch).loss.item(), rel=1e-5)


def test_loaders_alpaca_and_chat_forms_and_errors():
    alpaca = {"instruction": "Add", "input": "2 and 3", "output": "5"}
    assert row_messages(alpaca, "x") == [
        {"role": "user", "content": "Add\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    assert row_messages({"messages": HI}, "x") == HI
    with pytest.raises(DataError, match="last message must be the assistant"):
        row_messages({"messages": HI[:1]}, "f.jsonl row 3")
    with pytest.raises(DataError, match="Alpaca form"):
        row_messages({"prompt": "p"}, "x")
    data = rows_to_conversations([{"messages": HI, "topic": "b"}, {**alpaca, "topic": "a"}], "topic", "x")
    assert data.label_names == ["a", "b"] and data.labels.tolist() == [1, 0]
    assert messages_of(data.texts[0]) == HI


def test_chatterbot_has_21_categories_of_pairs():
    data, test = chatterbot(None)
    assert test is None and len(data.label_names) == 21 and "trivia" in data.label_names
    first = messages_of(data.texts[0])
    assert [m["role"] for m in first] == ["user", "assistant"]
    assert np.bincount(data.labels).min() >= 1 and len(data) > 2000


def test_one_round_on_a_tiny_llama_exports_and_round_trips(instruction_config, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedfm.server.export import export_run

    cfg = instruction_config()
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    rounds = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rounds if r["event"] == "round"]
    assert [r["round"] for r in rounds] == [0, 1] and rounds[1]["num_clients"] == 3
    for r in rounds:
        assert r["test_perplexity"] == pytest.approx(np.exp(r["test_loss"]))
        assert set(r["test_perplexity_by_group"]) == {"money", "music", "sport"}
        assert len(r["generations"]) == 2 and 0 <= r["rouge_l"] <= 1
    assert rounds[1]["test_loss"] < rounds[0]["test_loss"]
    html = (result.run_dir / "report.html").read_text()
    assert "Answers to fixed prompts" in html and "perplexity" in html
    assert (result.run_dir / "perplexity.png").exists()

    merged = export_run(result.run_dir, tmp_path / "merged", merge=True)
    model = AutoModelForCausalLM.from_pretrained(merged)
    tok = AutoTokenizer.from_pretrained(merged)
    prompt = tok.apply_chat_template(
        HI[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 3
    base = AutoModelForCausalLM.from_pretrained(cfg["model"]["name"])
    adapted = PeftModel.from_pretrained(base, result.run_dir / "adapter").eval()
    with torch.no_grad():
        a = adapted(**prompt).logits
        b = model(**prompt).logits
    assert torch.allclose(a, b, atol=1e-4)  # merged weights = base + adapter


def test_memory_options_and_packing_run(instruction_config, tmp_path):
    cfg = instruction_config(
        training={"grad_accumulation": 2, "precision": "bf16", "gradient_checkpointing": True},
        task={"packing": True, "num_eval_prompts": 0},
    )
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    assert result.final_metrics["num_clients"] == 3
    assert np.isfinite(result.final_metrics["test_loss"])


def test_quantized_base_needs_a_gpu_and_says_so(instruction_config, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(fedfm.ModelError, match="CUDA GPU"):
        fedfm.run(instruction_config(model={"quantization": "4bit"}), output=tmp_path / "r", progress=False)


def test_instruction_config_errors(instruction_config):
    with pytest.raises(fedfm.ConfigError, match="classification only"):
        make_config(instruction_config(attack={"kind": "label_flip"}))
    with pytest.raises(fedfm.ConfigError, match="causal LM"):
        make_config(instruction_config(model={"name": "minilm"}))


def test_baselines_table_in_the_run_folder_and_report(instruction_config, tmp_path):
    cfg = instruction_config(run={"rounds": 2}, task={"baselines": True, "num_eval_prompts": 0})
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    b = json.loads((result.run_dir / "baselines.json").read_text())
    assert [r["setting"] for r in b["rows"]] == ["federated", "local-only", "centralized"]
    # 3 clients × 2 rounds × 2 local steps (every client joins every round)
    assert b["federated_total_steps"] == 12 and b["local_steps"] == [2, 2, 2]
    for r in (b["rows"][0], b["rows"][2]):  # one model each (local-only averages over clients)
        assert r["all_held_out"]["perplexity"] == pytest.approx(np.exp(r["all_held_out"]["loss"]))
    assert "| centralized |" in (result.run_dir / "baselines.md").read_text()
    assert "Is federation worth it?" in (result.run_dir / "report.html").read_text()
    fed = b["rows"][0]["all_held_out"]["loss"]
    assert fed == pytest.approx(result.final_metrics["test_loss"], rel=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2"])
def test_causal_lm_families_get_lora_on_their_attention(family, smollm2_tokenizer, tmp_path):
    """Tiny random models of each family: PEFT picks the target modules; GPT-2's tokenizer has no
    chat template, so fedfm's plain fallback template renders (and masks) its conversations."""
    import transformers

    from fedfm.config import make_config as mk
    from fedfm.models.build import build_causal_lm

    small = dict(num_hidden_layers=1, num_attention_heads=2, hidden_size=16, intermediate_size=32)
    configs = {
        "llama": transformers.LlamaConfig(num_key_value_heads=1, **small),
        "qwen2": transformers.Qwen2Config(num_key_value_heads=1, **small),
        "mistral": transformers.MistralConfig(num_key_value_heads=1, **small),
        "gpt2": transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16),
    }
    config = configs[family]
    config.vocab_size = len(smollm2_tokenizer)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path)
    smollm2_tokenizer.save_pretrained(tmp_path)
    if family == "gpt2":  # a base-model tokenizer: no chat template
        cfg_path = tmp_path / "tokenizer_config.json"
        data = json.loads(cfg_path.read_text())
        data.pop("chat_template", None)
        cfg_path.write_text(json.dumps(data))
        (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    cfg = mk({"task": {"kind": "instruction"}, "model": {"name": str(tmp_path)}})
    bundle = build_causal_lm(cfg.model, cfg.peft, cfg.training, 0, "cpu")
    targets = {"gpt2": {"c_attn"}}.get(family, {"q_proj", "v_proj"})
    assert set(bundle.model.peft_config["default"].target_modules) == targets
    ids, labels, _ = format_conversation(bundle.tokenizer, HI, 64)
    learnt = bundle.tokenizer.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE])
    assert learnt.startswith("hello there")
    if family == "gpt2":
        from fedfm.models.build import FALLBACK_CHAT_TEMPLATE

        assert bundle.tokenizer.chat_template == FALLBACK_CHAT_TEMPLATE
        assert "### Assistant:\nhello there" in bundle.tokenizer.decode(ids)


def test_instruction_sources_route_and_fail_clearly(instruction_jsonl, tmp_path):
    from fedfm.config import DataSection
    from fedfm.data.instruction import load_instruction_source

    train, test = load_instruction_source(DataSection(name="jsonl", path=str(instruction_jsonl)))
    assert test is None and train.label_names == ["all"] and len(train) == 48  # no `label` field: one group
    with pytest.raises(DataError, match="classification source"):
        load_instruction_source(DataSection(name="csv"))
    with pytest.raises(DataError, match="chatterbot"):  # offline: a HF id fails, naming the alternatives
        load_instruction_source(DataSection(name="no-such-org/no-such-dataset"))
    (tmp_path / "t.jsonl").write_text(json.dumps({"messages": HI, "topic": "zzz"}) + "\n")
    with pytest.raises(DataError, match="do not occur in the training data"):
        load_instruction_source(
            DataSection(
                name="jsonl",
                path=str(instruction_jsonl),
                test_path=str(tmp_path / "t.jsonl"),
                label_column="topic",
            )
        )
