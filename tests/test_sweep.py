"""Sweeps: grid × variant expansion, checks before work, rounds-to-target, resume of finished cells."""

from __future__ import annotations

import json

import pytest
import tomli_w

from fedfm.api import run_sweep
from fedfm.config import ConfigError, RunConfig
from fedfm.reporting.sweep import expand, load_sweep, markdown_table, rounds_to_target


def write_sweep(tmp_path, sweep: dict, base: dict | None = None):
    if base is not None:
        (tmp_path / "base.toml").write_text(tomli_w.dumps(base))
        sweep = {"base": "base.toml", **sweep}
    path = tmp_path / "sweep.toml"
    path.write_text(tomli_w.dumps({"sweep": sweep}))
    return path


def test_grid_times_variants_in_file_order(tmp_path):
    path = write_sweep(
        tmp_path,
        {
            "name": "s",
            "set": {"run.rounds": 2},
            "grid": {"partition.alpha": [0.1, 100.0], "run.seed": [0, 1]},
            "variants": {
                "pre-lora": {"model.init": "pretrained"},
                "rand-full": {"model.init": "random", "peft.method": "full"},
            },
        },
    )
    cells = expand(load_sweep(path))
    assert len(cells) == 2 * 2 * 2
    assert [c.name for c in cells[:3]] == [
        "alpha=0.1__seed=0__pre-lora",
        "alpha=0.1__seed=0__rand-full",
        "alpha=0.1__seed=1__pre-lora",
    ]
    last = cells[-1]
    assert last.values == {"partition.alpha": 100.0, "run.seed": 1, "variant": "rand-full"}
    assert last.overrides == [
        "run.rounds=2",
        "partition.alpha=100.0",
        "run.seed=1",
        'model.init="random"',
        'peft.method="full"',
    ]


def test_bad_sweep_files_name_the_problem(tmp_path, tiny_config):
    with pytest.raises(ConfigError, match="no \\[sweep.grid\\]"):
        load_sweep(write_sweep(tmp_path, {"name": "s"}))
    with pytest.raises(ConfigError, match="sweep.grid.run.seed must be a non-empty list"):
        load_sweep(write_sweep(tmp_path, {"grid": {"run.seed": 3}}))
    with pytest.raises(ConfigError, match="unknown sweep key"):
        load_sweep(write_sweep(tmp_path, {"grid": {"run.seed": [1]}, "grids": 1}))
    # A bad value fails before any cell runs, naming the cell and the field.
    path = write_sweep(tmp_path, {"grid": {"partition.alpha": [0.5, -1.0]}}, base=tiny_config())
    with pytest.raises(ConfigError, match="(?s)sweep cell alpha=-1.0.*partition.alpha"):
        run_sweep(path, tmp_path / "out", progress=False, note=lambda s: None)
    assert not (tmp_path / "out" / "alpha=0.5").exists()


def test_rounds_to_target_by_hand():
    history = [{"round": 0, "test_accuracy": 0.2}, {"round": 1, "test_accuracy": 0.7}, {"round": 2}]
    history.append({"round": 3, "test_accuracy": 0.9})
    assert rounds_to_target(history, "test_accuracy", 0.7) == 1
    assert rounds_to_target(history, "test_accuracy", 0.8) == 3
    assert rounds_to_target(history, "test_accuracy", 0.95) is None
    assert rounds_to_target(history, "test_accuracy", None) is None
    losses = [{"round": 1, "test_loss": 2.0}, {"round": 2, "test_loss": 0.9}]
    assert rounds_to_target(losses, "test_loss", 1.0) == 2  # lower is better for losses


def test_sweep_runs_writes_summaries_and_resumes(tmp_path, tiny_config):
    base = tiny_config(run={"rounds": 1})
    path = write_sweep(
        tmp_path,
        {
            "name": "tiny",
            "target": 0.0,
            "grid": {"partition.num_clients": [2, 4]},
            "variants": {"lora": {}, "full": {"peft.method": "full"}},
        },
        base=base,
    )
    out = tmp_path / "out"
    notes: list[str] = []
    rows = run_sweep(path, out, progress=False, note=notes.append)
    assert [r["cell"] for r in rows] == [
        "num_clients=2__lora",
        "num_clients=2__full",
        "num_clients=4__lora",
        "num_clients=4__full",
    ]
    for r in rows:
        assert 0 <= r["final"] <= 1 and r["rounds_to_target"] == 0 and len(r["curve"]) == 2
    full, lora = rows[1], rows[0]
    assert full["peft.method"] == "full" and full["trainable"] > lora["trainable"]
    assert (out / "summary.csv").read_text().count("\n") == 5
    table = (out / "summary.md").read_text()
    assert "| init | trains | trainable |" in table and "pretrained init trains full" in table
    assert (out / "curves.png").stat().st_size > 0
    assert (out / "final-vs-partition.num_clients.png").stat().st_size > 0

    # Resume: finished cells are kept; an unfinished one (no cell.json) runs again.
    (out / "num_clients=4__full" / "cell.json").unlink()
    before = json.loads((out / "num_clients=2__lora" / "cell.json").read_text())
    notes.clear()
    again = run_sweep(path, out, progress=False, note=notes.append)
    assert sum("finished earlier, kept" in n for n in notes) == 3
    assert again[0] == before
    assert again[3]["final"] == pytest.approx(rows[3]["final"])  # the resumed cell reproduces


def test_markdown_says_when_cells_train_different_parts():
    from fedfm.reporting.sweep import SweepSpec

    spec = SweepSpec(name="s", base=None, grid={"partition.alpha": [0.1]}, variants={"a": {}, "b": {}})
    row = {"partition.alpha": 0.1, "final": 0.5, "best": 0.6, "rounds_to_target": None, "trainable": 10}
    rows = [
        {**row, "variant": "a", "model.init": "pretrained", "peft.method": "lora"},
        {**row, "variant": "b", "model.init": "random", "peft.method": "full"},
    ]
    md = markdown_table(spec, rows)
    assert "random init trains full" in md and "| 0.1 | a | pretrained | lora | 10 | 0.500 | 0.600 |" in md


def test_default_config_is_a_valid_base():
    assert RunConfig().model.init == "pretrained"


def test_markdown_showscounted_costs_when_cells_have_them():
    from fedfm.reporting.sweep import SweepSpec, counted_costs

    history = [
        {"round": 0},
        {"round": 1, "client_flops_mean": 2e9, "client_peak_memory_bytes": 5e6},
        {"round": 2, "client_flops_mean": 4e9, "client_peak_memory_bytes": 7e6},
    ]
    assert counted_costs(history) == {"client_flops": 3e9, "client_memory": 7e6}
    assert counted_costs([{"round": 1}]) == {}
    spec = SweepSpec(name="s", base=None, grid={}, variants={"a": {}})
    row = {"variant": "a", "model.init": "pretrained", "peft.method": "lora", "final": 0.5, "best": 0.6}
    md = markdown_table(spec, [{**row, **counted_costs(history), "bytes": 12_300_000, "wall_s": 3.0}])
    assert "client GFLOPs / round" in md and "| 3.0 | 7.0 | 12.3 |" in md
