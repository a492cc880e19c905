import json

import numpy as np
import pytest

from fedfm.config import DataSection, RunConfig
from fedfm.data.sources import DataError, bbc_news, load_source
from fedfm.tasks.setup import prepare_data


def test_bbc_news_is_real_and_stable():
    data, test = bbc_news(DataSection())
    assert test is None
    assert len(data) == 2225
    assert data.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert np.bincount(data.labels).tolist() == [510, 386, 417, 511, 401]
    assert data.texts[0] == bbc_news(DataSection())[0].texts[0]


def test_default_split_is_seeded_and_stratified():
    a, b = prepare_data(RunConfig()), prepare_data(RunConfig())
    assert len(a.test) == 426 and len(a.train) == 1701  # 2,127 distinct articles
    assert a.test.texts == b.test.texts
    assert set(a.test.texts).isdisjoint(a.train.texts)  # the 98 duplicates do not leak
    assert sum(len(p) for p in a.client_train) == len(a.train)


def test_deduplication_keeps_first_and_cleans_test(tmp_path):
    from fedfm.data.dataset import first_occurrences

    assert first_occurrences(["a", "b", "a", "c", "b"]).tolist() == [0, 1, 3]
    assert first_occurrences(["a", "x", "c"], exclude=["a", "b"]).tolist() == [1, 2]


def test_csv_and_jsonl_sources(tmp_path, csv_path):
    train, test = load_source(DataSection(name="csv", path=str(csv_path)))
    assert len(train) == 90 and train.label_names == ["money", "music", "sport"] and test is None
    assert "site" in train.columns
    rows = [{"body": "a b", "y": 1}, {"body": "c d", "y": 0}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    train, _ = load_source(DataSection(name="jsonl", path=str(path), text_column="body", label_column="y"))
    assert train.labels.tolist() == [1, 0] and train.label_names == ["0", "1"]


def test_clear_data_errors(tmp_path, csv_path):
    with pytest.raises(DataError, match="data.path is required"):
        load_source(DataSection(name="csv"))
    with pytest.raises(DataError, match="does not exist"):
        load_source(DataSection(name="csv", path=str(tmp_path / "nope.csv")))
    with pytest.raises(DataError, match="no column 'txt'.*columns: text, label, site"):
        load_source(DataSection(name="csv", path=str(csv_path), text_column="txt"))
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    with pytest.raises(DataError, match="bad.jsonl:1: not valid JSON"):
        load_source(DataSection(name="jsonl", path=str(tmp_path / "bad.jsonl")))


def test_unknown_dataset_names_the_alternatives():
    with pytest.raises(DataError, match="bbc-news"):
        load_source(DataSection(name="no-such-org/no-such-dataset"))


def test_natural_partition_and_client_test_split(tiny_config):
    from fedfm.config import make_config

    cfg = make_config(
        tiny_config(
            partition={"method": "natural", "column": "site", "num_clients": 4},
            data={"client_test_fraction": 0.2},
        )
    )
    data = prepare_data(cfg)
    assert data.num_clients == 4
    for k in range(4):
        assert set(data.train.columns["site"][i] for i in data.client_train[k]) == {f"site{k}"}
        assert len(data.client_test[k]) > 0
        assert set(data.client_train[k]).isdisjoint(data.client_test[k])
