"""Whole runs on the tiny model: outputs, adapter equivalence, strategies, failures, resume."""

import json
from pathlib import Path

import pytest
import tomli_w
import torch
import torch.nn.functional as F

import fedfm
from fedfm.config import make_config
from fedfm.tasks.setup import prepare_data


def round_records(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["event"] == "round"], [r for r in lines if r["event"] == "client"]


def test_run_folder_holds_every_output(tiny_config, tmp_path):
    result = fedfm.run(tiny_config(), output=tmp_path / "r", progress=False)
    d = result.run_dir
    for name in (
        "config.toml",
        "metrics.jsonl",
        "partition.json",
        "checkpoint/state.sqlite",
        "accuracy.png",
        "loss.png",
        "partition.png",
        "report.html",
        "adapter/adapter_config.json",
    ):
        assert (d / name).exists(), name
    rounds, clients = round_records(d)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for key in ("round", "test_accuracy", "test_loss", "train_loss", "num_clients", "elapsed_s"):
        assert key in rounds[-1]
    assert rounds[-1]["num_clients"] == 4 and len(clients) == 8
    assert result.final_metrics["round"] == 2 and len(result.history) == 3
    partition = json.loads((d / "partition.json").read_text())
    assert sum(c["num_train"] for c in partition["clients"]) == partition["num_train"]
    assert fedfm.load_config(d / "config.toml") == make_config(tiny_config())
    html = (d / "report.html").read_text()
    assert "data:image/png;base64" in html and "Partition" in html and "[partition]" in html
    assert "Communication" in html and "less than sending every weight" in html


def test_exported_adapter_loads_with_peft_and_predicts_the_same(tiny_config, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = make_config(tiny_config(run={"rounds": 2}))
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=3, ignore_mismatched_sizes=True
    )
    model = PeftModel.from_pretrained(base, result.run_dir / "adapter").eval()
    test = prepare_data(cfg).test
    tok = AutoTokenizer.from_pretrained(result.run_dir / "adapter")
    enc = tok(
        test.texts,
        truncation=True,
        max_length=cfg.model.max_length,
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        logits = model(**enc).logits
    labels = torch.as_tensor(test.labels)
    acc = (logits.argmax(-1) == labels).float().mean().item()
    loss = F.cross_entropy(logits, labels).item()
    assert acc == pytest.approx(result.final_metrics["test_accuracy"])
    assert loss == pytest.approx(result.final_metrics["test_loss"], rel=1e-4)


def test_an_export_loads_as_a_hugging_face_user_loads_it_and_predicts_the_same(tiny_config, tmp_path):
    """The usual pattern: the base named by the adapter's config, its tokenizer from that folder,
    then the adapter. adapter/base once held no tokenizer, so AutoTokenizer silently built a
    default one and the model predicted at chance with no error."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = make_config(tiny_config(run={"rounds": 1}))
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    adapter = result.run_dir / "adapter"
    base_path = PeftConfig.from_pretrained(adapter).base_model_name_or_path
    assert Path(base_path) == adapter / "base"
    tok = AutoTokenizer.from_pretrained(base_path)
    assert tok.vocab_size == AutoTokenizer.from_pretrained(adapter).vocab_size
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base_path), adapter)
    test = prepare_data(cfg).test
    enc = tok(test.texts, truncation=True, max_length=cfg.model.max_length, padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model.eval()(**enc).logits.argmax(-1)
    acc = (predicted == torch.as_tensor(test.labels)).float().mean().item()
    assert acc == pytest.approx(result.final_metrics["test_accuracy"])


@pytest.mark.parametrize(
    "strategy,training",
    [
        ({"server_optimizer": "sgd", "server_momentum": 0.9}, {}),
        ({"server_optimizer": "adam", "server_lr": 0.01}, {}),
        ({"server_optimizer": "yogi", "server_lr": 0.01}, {}),
        ({"server_optimizer": "adagrad", "server_lr": 0.01, "weighting": "uniform"}, {}),
        ({"objective": "fedprox", "mu": 0.1}, {}),
        ({"objective": "scaffold"}, {"optimizer": "sgd", "lr": 0.1}),
    ],
)
def test_strategies_compose_from_config(tiny_config, tmp_path, strategy, training):
    cfg = tiny_config(
        strategy=strategy, training=training, sampling={"fraction": 0.5}, eval={"at_start": False}
    )
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    rounds, _ = round_records(result.run_dir)
    assert [r["num_clients"] for r in rounds] == [2, 2]
    assert all(r["test_loss"] is not None and r["failed"] == [] for r in rounds)


@pytest.mark.parametrize("method", ["ia3", "prompt_tuning", "head", "full"])
def test_peft_methods_run_and_export(tiny_config, tmp_path, method):
    result = fedfm.run(
        tiny_config(peft={"method": method}, run={"rounds": 1}),
        output=tmp_path / "r",
        progress=False,
    )
    exported = {p.name for p in (result.run_dir / "adapter").iterdir()}
    assert ("adapter_config.json" in exported) == (method not in ("head", "full"))


def test_local_evaluation_reports_client_spread(tiny_config, tmp_path):
    cfg = tiny_config(data={"client_test_fraction": 0.3}, eval={"local": True}, run={"rounds": 1})
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    final = result.final_metrics
    assert 0 <= final["client_accuracy_worst10"] <= final["client_accuracy_mean"] <= 1
    assert final["client_accuracy_std"] >= 0


def test_rounds_where_every_client_fails_are_skipped_without_state_change(tiny_config, tmp_path, monkeypatch):
    from fedfm.models.state import get_trainable_state
    from fedfm.server.checkpoint import load_checkpoint
    from fedfm.server.driver import RunFailedError
    from fedfm.tasks.classification import ClassificationTask
    from fedfm.tasks.setup import build_task

    # a loss that diverges makes every client fail at the train stage (an lr above 100 is refused)
    cfg = make_config(tiny_config(run={"rounds": 1}))
    monkeypatch.setattr(ClassificationTask, "loss", lambda self, model, batch: torch.tensor(float("nan")))
    with pytest.raises(RunFailedError, match="no client delivered a usable update") as failed:
        fedfm.run(cfg, output=tmp_path / "bad", progress=False)
    result = failed.value.result
    rounds, _ = round_records(result.run_dir)
    last = rounds[-1]
    assert last["num_clients"] == 0 and "skipped" in last
    assert {f["stage"] for f in last["failed"]} == {"train"} and len(last["failed"]) == 4
    assert all("non-finite" in f["reason"] for f in last["failed"])
    initial = get_trainable_state(build_task(cfg, prepare_data(cfg))[0].trainable)
    params = load_checkpoint(result.run_dir / "checkpoint").params
    assert all(torch.equal(params[k], initial[k]) for k in initial)


def test_min_clients_skips_a_round(tiny_config, tmp_path):
    cfg = tiny_config(
        run={"rounds": 1},
        sampling={"fraction": 1.0, "min_clients": 5},
        partition={"num_clients": 6},
    )
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    rounds, _ = round_records(result.run_dir)
    assert "skipped" not in rounds[-1]
    cfg = tiny_config(run={"rounds": 1}, sampling={"clients_per_round": 2, "min_clients": 3})
    with pytest.raises(ValueError, match="min_clients"):
        fedfm.run(cfg, output=tmp_path / "r2", progress=False)


def test_resume_in_process_matches_uninterrupted(tiny_config, tmp_path):
    full = fedfm.run(tiny_config(run={"rounds": 4}), output=tmp_path / "full", progress=False)
    part = fedfm.run(tiny_config(run={"rounds": 2}), output=tmp_path / "part", progress=False)
    resumed = fedfm.run(resume=part.run_dir, overrides=["run.rounds=4"], progress=False)
    assert resumed.final_metrics["test_loss"] == full.final_metrics["test_loss"]
    assert [r["round"] for r in resumed.history] == [0, 1, 2, 3, 4]


def test_refuses_to_overwrite_a_run(tiny_config, tmp_path):
    fedfm.run(tiny_config(run={"rounds": 1}), output=tmp_path / "r", progress=False)
    with pytest.raises(fedfm.ConfigError, match="already holds a run"):
        fedfm.run(tiny_config(run={"rounds": 1}), output=tmp_path / "r", progress=False)
    with pytest.raises(fedfm.ConfigError, match="not a fedfm run folder"):
        fedfm.run(resume=tmp_path / "nowhere", progress=False)


def test_a_run_needs_no_optional_extra(tmp_path, tiny_config):
    """Without fedfm[privacy] and fedfm[llm] (imports blocked), a plain run finishes with its report."""
    import subprocess
    import sys

    cfg = tmp_path / "exp.toml"
    cfg.write_text(tomli_w.dumps(tiny_config(run={"rounds": 1})))
    blocked = ["dp_accounting", "opacus", "cryptography", "gguf", "rouge_score", "grpc", "ray"]
    code = (
        "import sys\n"
        f"for m in {blocked!r}: sys.modules[m] = None\n"
        "import fedfm\n"
        f"fedfm.run({str(cfg)!r}, output={str(tmp_path / 'r')!r}, progress=False)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    assert (tmp_path / "r" / "report.html").is_file()
