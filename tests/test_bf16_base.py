"""Base weights loaded and kept in bfloat16 (``model.dtype``): the frozen base takes half the
memory, LoRA factors stay float32 (PEFT), what travels is float32, and a run lands close to the
float32 run (not equal: bfloat16 keeps 8 bits of mantissa)."""

from __future__ import annotations

import math

import pytest
import torch

import fedfm
from fedfm.config import make_config
from fedfm.tasks.setup import build_task, prepare_data


def _frozen_bytes(bundle) -> int:
    trainable = {id(p) for p in bundle.trainable.values()}
    return sum(p.numel() * p.element_size() for p in bundle.model.parameters() if id(p) not in trainable)


def _bundle(cfg):
    return build_task(cfg, prepare_data(cfg))[0]


def test_a_bf16_base_halves_the_frozen_weights_and_keeps_the_adapter_in_float32(tiny_config):
    wide = _bundle(make_config(tiny_config()))
    narrow = _bundle(make_config(tiny_config(model={**tiny_config()["model"], "dtype": "bfloat16"})))
    assert _frozen_bytes(narrow) * 2 == _frozen_bytes(wide)
    frozen = [p for p in narrow.model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    lora = {k: p for k, p in narrow.trainable.items() if "lora_" in k}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())


def test_a_bf16_causal_lm_base_loads_in_bf16_and_tunes(instruction_config, tmp_path):
    cfg = make_config(instruction_config(model={**instruction_config()["model"], "dtype": "bfloat16"}))
    bundle = _bundle(cfg)
    frozen = [p for p in bundle.model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)  # training, perplexity, generation
    assert math.isfinite(result.final_metrics["test_loss"]) and result.history[-1]["num_clients"] == 3


def test_a_bf16_run_lands_close_to_the_float32_run_and_sends_float32(tiny_config, tmp_path):
    wide = fedfm.run(tiny_config(), output=tmp_path / "fp32", progress=False)
    narrow = fedfm.run(
        tiny_config(model={**tiny_config()["model"], "dtype": "bfloat16"}),
        output=tmp_path / "bf16",
        progress=False,
    )
    assert narrow.final_metrics["test_loss"] == pytest.approx(wide.final_metrics["test_loss"], abs=2e-2)
    assert narrow.history[-1]["bytes_up"] == wide.history[-1]["bytes_up"]  # the payload stays float32
