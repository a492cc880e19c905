"""End to end on the real packaged SmolLM2-135M: the GGUF cache under concurrent first loads,
and one short federated round of instruction tuning on real chatterbot data."""

import json
import os
import subprocess
import sys

import pytest
import torch

import fedfm

LOAD = "from fedfm.models.resolve import resolve_model; print(resolve_model('smollm2-135m'))"


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    """Two processes race to build the cache from the GGUF file; both must get the same folder."""
    cache = tmp_path_factory.mktemp("fedfm-cache")
    env = {**os.environ, "FEDFM_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LOAD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1].decode()[-2000:] for o in outs]
    paths = {o[0].decode().strip().splitlines()[-1] for o in outs}
    assert len(paths) == 1
    folder = paths.pop()
    assert sorted(p.name for p in cache.iterdir()) == ["smollm2-135m"]  # no temporary folders left
    return cache, folder


@pytest.mark.slow
def test_concurrent_first_loads_leave_one_complete_cache(smollm2_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, folder = smollm2_cache
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1] :])


@pytest.mark.slow
def test_one_federated_round_on_chatterbot_lowers_held_out_loss(smollm2_cache, tmp_path, monkeypatch):
    cache, _ = smollm2_cache
    monkeypatch.setenv("FEDFM_CACHE", str(cache))
    cfg = {
        "run": {"rounds": 1, "threads": 2},
        "task": {"kind": "instruction", "num_eval_prompts": 1, "max_new_tokens": 4},
        "model": {"name": "smollm2-135m", "max_length": 64},
        "data": {"name": "chatterbot", "max_examples": 120, "max_test_examples": 30},
        "partition": {"method": "iid", "num_clients": 3},
        "sampling": {"fraction": 1.0},
        "training": {"local_steps": 3, "batch_size": 4, "lr": 2e-3},
        "eval": {"batch_size": 20},
    }
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    rounds = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rounds if r["event"] == "round"]
    assert rounds[1]["test_perplexity"] < rounds[0]["test_perplexity"]
    assert torch.isfinite(torch.tensor(rounds[1]["test_loss"]))
