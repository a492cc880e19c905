"""FM-generated synthetic data: the synthesis pipeline on a tiny random generator, and each way a
run uses synthetic examples (warm-up, augmentation, both, synthetic-only)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fedfm
from fedfm.config import ConfigError, make_config
from fedfm.data.sources import DataError
from fedfm.data.synthetic import augment_rows
from fedfm.synthetic.generate import SynthError, SynthSettings, clean, normalized, synthesize
from fedfm.tasks.setup import prepare_data


def settings(generator, **kw) -> SynthSettings:
    base = dict(
        generator=str(generator),
        labels=("sport", "money"),
        per_class=100,
        batch_size=3,
        max_new_tokens=8,
        min_words=1,
        max_batches=1,
        seed=0,
    )
    return SynthSettings(**{**base, **kw})


def lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_synthesis_writes_labelled_rows_with_provenance(tmp_path, tiny_llama_dir):
    out = tmp_path / "s.jsonl"
    summary = synthesize(settings(tiny_llama_dir), out, device="cpu", note=lambda s: None)
    rows = lines(out)
    assert {r["label"] for r in rows} == {"sport", "money"}
    assert sum(summary["accepted"].values()) == len(rows) > 0
    assert summary["generated"] == 6 and summary["batches"] == {"sport": 1, "money": 1}
    for r in rows:
        assert r["synthetic"] is True and r["text"] == clean(r["text"])
        p = r["provenance"]
        assert p["generator"] == str(tiny_llama_dir) and p["batch"] == 0
        assert p["settings"] == {"temperature": 0.9, "top_p": 0.95, "max_new_tokens": 8}
        assert r["label"] in p["prompt"] and isinstance(p["seed"], int)
    keys = [normalized(r["text"]) for r in rows]
    assert len(set(keys)) == len(keys)  # no duplicates


def test_filter_drops_short_texts_and_duplicates_within_a_batch_and_against_the_file():
    from fedfm.synthetic.generate import _filter

    s = SynthSettings(labels=("a",), min_words=2, max_words=5)
    seen = {normalized("Already in the file.")}
    rejected = {"duplicate": 0, "length": 0, "quality": 0}
    texts = ["The cat sat.", "the  CAT sat!", "Short", "already in the file", "one two three four five six"]
    assert _filter(texts, "a", s, seen, None, rejected) == [("The cat sat.", None)]
    assert rejected == {"duplicate": 2, "length": 2, "quality": 0}


def test_resume_continues_with_the_same_seeds_and_refuses_other_settings(tmp_path, tiny_llama_dir):
    quiet = dict(device="cpu", note=lambda s: None)
    synthesize(settings(tiny_llama_dir, max_batches=1), tmp_path / "a.jsonl", **quiet)
    synthesize(settings(tiny_llama_dir, max_batches=2), tmp_path / "a.jsonl", **quiet)  # resumed
    synthesize(settings(tiny_llama_dir, max_batches=2), tmp_path / "b.jsonl", **quiet)  # in one go
    resumed, at_once = (sorted((tmp_path / n).read_text().splitlines()) for n in ("a.jsonl", "b.jsonl"))
    assert resumed == at_once  # the same samples (class order differs: a resume finishes class by class)
    before = (tmp_path / "a.jsonl").read_text()
    again = synthesize(settings(tiny_llama_dir, max_batches=2), tmp_path / "a.jsonl", **quiet)
    assert (tmp_path / "a.jsonl").read_text() == before and again["generated"] == 12  # nothing new
    with pytest.raises(SynthError, match="temperature differ"):
        synthesize(settings(tiny_llama_dir, temperature=0.5), tmp_path / "a.jsonl", **quiet)


def test_settings_are_checked():
    with pytest.raises(SynthError, match="no labels"):
        SynthSettings(labels=())
    with pytest.raises(SynthError, match="\\{label\\}"):
        SynthSettings(labels=("a",), prompt="write something")
    with pytest.raises(SynthError, match="descriptions name labels \\['sport'\\]"):
        SynthSettings(labels=("sports",), descriptions={"sport": "football"})
    with pytest.raises(SynthError, match="top_p"):
        SynthSettings(labels=("a",), top_p=0)


def test_quality_filter_keeps_samples_near_their_class():
    from fedfm.synthetic.generate import QualityFilter

    q = QualityFilter(SynthSettings(labels=("sport", "business"), kind="news article"), "cpu")
    texts = [
        "The striker scored twice as the home team won the cup final against their league rivals.",
        "Shares in the bank fell after it reported lower quarterly profits and cut its forecast.",
    ]
    assert [ok for ok, _ in q.keep(texts, "sport")] == [True, False]
    assert [ok for ok, _ in q.keep(texts, "business")] == [False, True]


def test_clean_drops_headers_and_an_unfinished_last_sentence():
    assert clean("# Title\nHeadline: x\n  The team won.  It was a  great") == "The team won."
    assert clean('"Markets rose today!"') == "Markets rose today!"


def test_augment_rows_by_hand():
    synth = np.array([0, 0, 0, 1, 1, 2])
    rng = np.random.default_rng(0)
    got = augment_rows(np.array([0, 0]), synth, 3, "missing", rng)
    assert sorted(synth[got].tolist()) == [1, 1, 2]  # only classes 1 and 2, as even as the pool allows
    got = augment_rows(np.array([0, 1, 2]), synth, 3, "missing", rng)
    assert len(got) == 0  # lacks nothing
    got = augment_rows(np.array([0]), synth, 4, "all", rng)
    assert sorted(synth[got].tolist()) == [0, 0, 1, 2]
    assert len(set(augment_rows(np.array([0]), synth, 100, "all", rng).tolist())) == 6  # no repeats


@pytest.fixture
def synthetic_jsonl(tmp_path, tiny_config):
    from tests.conftest import WORDS

    rows = []
    for label, words in WORDS.items():
        for i in range(6):
            rows.append({"text": f"synthetic {label} {i} {words}", "label": label, "synthetic": True})
    test_text = prepare_data(make_config(tiny_config())).test.texts[0]
    rows.append({"text": test_text, "label": "sport"})  # equal to a test text: must be dropped
    path = tmp_path / "synth.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def synthetic_config(tiny_config, path, mode, **kw):
    return tiny_config(
        synthetic={"mode": mode, "path": str(path), "warmup_steps": 3, "augment_per_client": 4, **kw},
        partition={"method": "shards", "num_clients": 3, "classes_per_client": 1},
        run={"rounds": 1},
    )


def test_augment_adds_only_missing_classes_and_never_touches_the_test_set(tiny_config, synthetic_jsonl):
    plain = prepare_data(make_config(synthetic_config(tiny_config, synthetic_jsonl, "none")))
    cfg = make_config(synthetic_config(tiny_config, synthetic_jsonl, "augment", augment_classes="missing"))
    data = prepare_data(cfg)
    assert len(data.synthetic_rows) == 18  # the copy of a test text is gone
    assert data.test.texts == plain.test.texts and not set(data.test.texts) & set(
        data.train.texts[data.num_real :]
    )
    for k, rows in enumerate(data.client_train):
        real, synth = rows[rows < data.num_real], rows[rows >= data.num_real]
        assert np.array_equal(real, plain.client_train[k])
        assert len(synth) == 4
        assert not set(data.train.labels[synth]) & set(data.train.labels[real])
    summary = data.partition_summary("shards")
    assert summary["num_synthetic"] == 18 and summary["num_train"] == plain.num_real
    assert all(c["num_synthetic"] == 4 for c in summary["clients"])


def test_only_mode_trains_on_synthetic_rows_alone(tiny_config, synthetic_jsonl):
    cfg = make_config(synthetic_config(tiny_config, synthetic_jsonl, "only"))
    data = prepare_data(cfg)
    assert data.num_real == 0 and len(data.train) == 18
    assert all(t.startswith("synthetic") for t in data.train.texts)
    assert sum(len(r) for r in data.client_train) == 18


def test_warmup_trains_before_round_one_and_is_logged(tmp_path, tiny_config, synthetic_jsonl):
    plain = fedfm.run(
        synthetic_config(tiny_config, synthetic_jsonl, "none"), output=tmp_path / "a", progress=False
    )
    both = synthetic_config(tiny_config, synthetic_jsonl, "both")
    warm = fedfm.run(both, output=tmp_path / "b", progress=False)
    events = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "warmup" and events[0]["steps"] == 3 and events[0]["num_synthetic"] == 18
    assert plain.history[0]["test_loss"] != warm.history[0]["test_loss"]  # round 0 is after warm-up
    part = json.loads((tmp_path / "b" / "partition.json").read_text())
    assert part["num_synthetic"] == 18 and all(c["num_synthetic"] == 4 for c in part["clients"])


def test_synthetic_config_errors_name_the_field(tiny_config, tmp_path, synthetic_jsonl):
    with pytest.raises(ConfigError, match="synthetic.path"):
        make_config(tiny_config(synthetic={"mode": "warmup"}))
    with pytest.raises(ConfigError, match="synthetic.path .* is not a file"):
        make_config(tiny_config(synthetic={"mode": "warmup", "path": str(tmp_path / "none.jsonl")}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "a b c", "label": "weather"}) + "\n")
    with pytest.raises(DataError, match="weather"):
        prepare_data(make_config(tiny_config(synthetic={"mode": "augment", "path": str(bad)})))
