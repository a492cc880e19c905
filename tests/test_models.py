import pytest
import torch

from fedfm.config import ModelSection, PeftSection
from fedfm.models import (
    ModelError,
    build_classifier,
    get_trainable_state,
    resolve_model,
    set_trainable_state,
)

LABELS = ["a", "b", "c"]


def build(folder, **peft):
    return build_classifier(ModelSection(name=str(folder)), PeftSection(**peft), LABELS, seed=0, device="cpu")


def test_lora_payload_uses_peft_keys_and_includes_the_head(tiny_model_dir):
    bundle = build(tiny_model_dir, method="lora", r=4)
    keys = set(bundle.trainable)
    assert any(k.endswith("query.lora_A.weight") for k in keys)
    assert "base_model.model.classifier.weight" in keys
    assert not any(".default." in k for k in keys)  # adapter name stripped, as in PEFT files
    assert bundle.num_trainable() < bundle.num_total() / 10


@pytest.mark.parametrize("method", ["ia3", "prompt_tuning", "head", "full"])
def test_every_peft_method_builds_and_trains(tiny_model_dir, method):
    bundle = build(tiny_model_dir, method=method, num_virtual_tokens=2)
    assert bundle.trainable
    assert set(bundle.trainable.values()) == {p for p in bundle.model.parameters() if p.requires_grad}
    x = bundle.tokenizer(["hello world"], return_tensors="pt")
    bundle.model(**x).logits.sum().backward()
    assert any(p.grad is not None for p in bundle.trainable.values())
    if method == "prompt_tuning":
        assert "prompt_embeddings" in bundle.trainable


def test_state_round_trip(tiny_model_dir):
    bundle = build(tiny_model_dir)
    state = get_trainable_state(bundle.trainable)
    changed = {k: v + 1 for k, v in state.items()}
    set_trainable_state(bundle.trainable, changed)
    for k, v in get_trainable_state(bundle.trainable).items():
        torch.testing.assert_close(v, changed[k])
    with pytest.raises(KeyError):
        set_trainable_state(bundle.trainable, {})


def test_same_seed_same_initial_state_and_random_init(tiny_model_dir):
    a = get_trainable_state(build(tiny_model_dir).trainable)
    b = get_trainable_state(build(tiny_model_dir).trainable)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rnd = build_classifier(
        ModelSection(name=str(tiny_model_dir), init="random"), PeftSection(), LABELS, 0, "cpu"
    )
    pre = build(tiny_model_dir)
    w = "bert.embeddings.word_embeddings.weight"
    assert not torch.equal(
        dict(rnd.model.base_model.model.named_parameters())[w],
        dict(pre.model.base_model.model.named_parameters())[w],
    )


def test_model_resolution_errors(tmp_path):
    assert resolve_model("minilm").endswith("model")
    with pytest.raises(ModelError, match="looks like a path"):
        resolve_model(str(tmp_path / "nowhere"))
    with pytest.raises(ModelError, match="Registered models: .*minilm"):
        build_classifier(ModelSection(name="no-such-org/no-such-model"), PeftSection(), LABELS, 0, "cpu")


def test_lora_on_unknown_architecture_names_the_fix(tiny_model_dir):
    with pytest.raises(ModelError, match="peft.target_modules"):
        build(tiny_model_dir, method="lora", target_modules=["no_such_layer"])


def test_classification_export_loads_with_auto_peft_and_keeps_the_labels(tiny_model_dir, tmp_path):
    """The adapter folder records num_labels / id2label / label2id, so the auto class builds a head
    of the right size and the exported head is the trained one."""
    from peft import AutoPeftModelForSequenceClassification

    from fedfm.models.state import get_trainable_state
    from fedfm.server.export import export_adapter

    labels = ["sport", "tech", "politics", "business", "film"]
    bundle = build_classifier(ModelSection(name=str(tiny_model_dir)), PeftSection(r=2), labels, 0, "cpu")
    params = {k: v + 0.01 for k, v in get_trainable_state(bundle.trainable).items()}
    folder = export_adapter(bundle, params, tmp_path / "adapter", labels=True)
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(str(folder))
    assert loaded.config.num_labels == 5
    assert loaded.config.id2label[4] == "film" and loaded.config.label2id["politics"] == 2
    from peft import get_peft_model_state_dict

    saved = get_peft_model_state_dict(loaded)  # the trained adapter and head, not a fresh 2-label one
    assert set(saved) == set(params)
    assert all(torch.allclose(saved[k], params[k]) for k in params)
