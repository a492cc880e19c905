"""Shared fixtures: a tiny randomly initialised BERT saved as a local model folder, small data."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden 32) with MiniLM's tokenizer, randomly initialised, as a folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fedfm.models.resolve import resolve_model

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


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

    def make(**sections) -> dict:
        cfg = {
            "run": {"rounds": 2, "seed": 0, "threads": 1},
            "model": {"name": str(tiny_model_dir), "max_length": 16},
            "peft": {"method": "lora", "r": 4, "alpha": 8},
            "data": {"name": "csv", "path": str(csv_path), "test_fraction": 0.25},
            "partition": {"method": "iid", "num_clients": 4, "min_size": 1},
            "sampling": {"fraction": 1.0},
            "training": {"local_steps": 3, "batch_size": 8, "lr": 1e-2},
            "eval": {"batch_size": 32},
        }
        for name, values in sections.items():
            cfg.setdefault(name, {}).update(values)
        return cfg

    return make
