"""End to end on the real packaged MiniLM and BBC News (a small, fast slice of the default run),
trained on the batched engine: its adapter is PEFT's own and loads back with the same metrics."""

import pytest
import torch
import torch.nn.functional as F

import fedfm
from fedfm.config import make_config
from fedfm.models.resolve import resolve_model
from fedfm.tasks.setup import prepare_data


@pytest.mark.slow
def test_minilm_bbc_news_round_and_adapter_round_trip(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = make_config(
        {},
        [
            "data.max_examples=240",
            "data.max_test_examples=100",
            "model.max_length=32",
            "run.rounds=2",
            "training.local_steps=8",
            "sampling.fraction=0.4",
            "partition.method=iid",
            "run.engine=batched",  # the golden default run covers the in-process engine on this model
        ],
    )
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    history = result.history
    assert [r["round"] for r in history] == [0, 1, 2]
    assert history[-1]["test_loss"] < history[0]["test_loss"]  # training helps the real model

    base = AutoModelForSequenceClassification.from_pretrained(resolve_model("minilm"), num_labels=5)
    model = PeftModel.from_pretrained(base, result.run_dir / "adapter").eval()
    test = prepare_data(cfg).test
    tok = AutoTokenizer.from_pretrained(result.run_dir / "adapter")
    enc = tok(test.texts, truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    labels = torch.as_tensor(test.labels)
    assert (logits.argmax(-1) == labels).float().mean().item() == pytest.approx(
        result.final_metrics["test_accuracy"]
    )
    assert F.cross_entropy(logits, labels).item() == pytest.approx(
        result.final_metrics["test_loss"], rel=1e-4
    )
    # the export records its labels: the auto class needs no num_labels and gives the same model
    from peft import AutoPeftModelForSequenceClassification

    auto = AutoPeftModelForSequenceClassification.from_pretrained(str(result.run_dir / "adapter")).eval()
    assert auto.config.id2label == {i: n for i, n in enumerate(test.label_names)}
    with torch.no_grad():
        assert torch.allclose(auto(**enc).logits, logits, atol=1e-5)
