"""Docs and shipped examples stay in step with the code."""

import sys
from pathlib import Path

import pytest

from fedfm.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_reference_is_current():
    sys.path.insert(0, str(ROOT / "tools"))
    from gen_config_docs import render

    assert (ROOT / "docs" / "configuration.md").read_text() == render(), (
        "docs/configuration.md is stale: run `python tools/gen_config_docs.py`"
    )


def test_measured_tables_are_rendered_from_their_results_files():
    """A table between results markers equals what its JSON renders: a number edited by hand, or
    a results file updated without its table, fails here; an empty block would too."""
    sys.path.insert(0, str(ROOT / "tools"))
    from render_results import BLOCK, RENDERERS, documents, render

    docs = {p: p.read_text() for p in documents()}
    names = {m.group(2) for text in docs.values() for m in BLOCK.finditer(text)}
    assert set(RENDERERS) <= names  # every named renderer has its table
    assert {
        "claims",
        "sweep/default-experiment",
        "sweep/init-vs-noniid",
        "sweep/synthetic-extreme-noniid",
    } <= names
    for path, text in docs.items():
        assert render(text) == text, f"{path.name}: a table differs from its results file"
    for old, new in [
        ("| streaming mean | 8 |", "| streaming mean | 9 |"),
        ("| augment | 3 |", "| augment | 4 |"),
    ]:
        doc = next(t for t in docs.values() if old in t)
        edited = doc.replace(old, new)
        assert render(edited) != edited


def test_every_table_of_measured_numbers_has_a_results_file_or_is_listed():
    """A new hand-written table of measured numbers (outside results markers, not listed in
    docs/results/unsourced.toml) fails here, and so does a listed table that is gone."""
    sys.path.insert(0, str(ROOT / "tools"))
    from render_results import documents, unsourced_problems

    assert unsourced_problems() == []
    texts = {str(p.relative_to(ROOT)): p.read_text() for p in documents()}
    texts["README.md"] += "\n| setting | accuracy |\n| --- | --- |\n| new | 0.912 |\n"
    assert any("README.md" in p and "without a results file" in p for p in unsourced_problems(texts))


@pytest.mark.parametrize(
    "path",
    sorted([*(ROOT / "examples").glob("*.toml"), *(ROOT / "examples" / "hf_trainer").glob("*.toml")]),
    ids=lambda p: p.name,
)
def test_shipped_examples_validate(path):
    load_config(path)


def test_default_example_is_the_embedded_default():
    cfg = load_config(ROOT / "examples" / "default.toml", ["run.name=fedfm"])
    assert cfg == load_config(None)


@pytest.mark.parametrize("path", sorted((ROOT / "examples" / "sweeps").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_sweeps_expand_to_valid_cells(path, monkeypatch):
    from fedfm.reporting.sweep import check_cells, expand, load_sweep

    monkeypatch.chdir(ROOT)  # sweep files name data paths relative to the repository root
    spec = load_sweep(path)
    cells = expand(spec)
    assert len(check_cells(spec, cells)) == len(cells) > 1


def test_shipped_synthetic_data_is_labelled_with_bbc_classes():
    import json

    rows = [
        json.loads(x) for x in (ROOT / "examples/synthetic/bbc-news-smollm2.jsonl").read_text().splitlines()
    ]
    assert {r["label"] for r in rows} == {"business", "entertainment", "politics", "sports", "tech"}
    assert all(r["synthetic"] and r["provenance"]["generator"] == "smollm2-135m" for r in rows)
