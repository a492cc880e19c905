"""DoRA (Liu et al. 2024, PEFT's ``use_dora``): the magnitude vectors train, travel and are averaged
with A and B; the exported adapter is a DoRA adapter PEFT loads and predicts with as the run
scored it; what DoRA does not compose with is refused naming the field."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fedfm
from fedfm.config import ConfigError, make_config
from fedfm.models.state import get_trainable_state
from fedfm.server.checkpoint import load_checkpoint
from fedfm.tasks.setup import build_task, prepare_data

MAGNITUDE = "lora_magnitude_vector"


def test_magnitudes_travel_and_the_export_is_a_dora_adapter(tiny_config, tiny_model_dir, tmp_path):
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = make_config(tiny_config(peft={**tiny_config()["peft"], "dora": True}))
    before = get_trainable_state(build_task(cfg, prepare_data(cfg))[0].trainable)  # θ0
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    after = load_checkpoint(result.run_dir / "checkpoint").params
    magnitudes = [k for k in after if k.endswith(MAGNITUDE)]
    assert magnitudes and all(k in before for k in magnitudes)
    assert any(not torch.equal(after[k], before[k]) for k in magnitudes)  # trained and aggregated
    assert result.history[-1]["bytes_up"] > 0
    assert PeftConfig.from_pretrained(result.run_dir / "adapter").use_dora
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=3, ignore_mismatched_sizes=True
    )
    model = PeftModel.from_pretrained(base, result.run_dir / "adapter").eval()
    test = prepare_data(cfg).test
    tok = AutoTokenizer.from_pretrained(result.run_dir / "adapter")
    enc = tok(test.texts, truncation=True, max_length=cfg.model.max_length, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    loss = F.cross_entropy(logits, torch.as_tensor(test.labels)).item()
    assert loss == pytest.approx(result.final_metrics["test_loss"], rel=1e-4)


@pytest.mark.parametrize(
    "sections,field",
    [
        ({"strategy": {"lora_aggregation": "exact"}}, "lora_aggregation"),
        ({"peft": {"rank_tiers": [2, 4]}}, "rank_tiers"),
        ({"privacy": {"dp": "example", "noise_multiplier": 1.0}}, "privacy.dp"),
        ({"run": {"engine": "batched"}}, "peft.dora"),
        ({"peft": {"method": "ia3"}}, "peft.method"),
    ],
)
def test_what_dora_does_not_compose_with_is_refused(tiny_config, sections, field):
    cfg = tiny_config(peft={**tiny_config()["peft"], "dora": True})
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    with pytest.raises(ConfigError, match=field):
        make_config(cfg)
