"""Plug-ins from outside the package, one of every kind: an objective (FedDyn, both halves), a
server optimizer, an aggregator, a transform, a partitioner, a task, an engine, a compression
method, an attack, a tracker, a model, a dataset, a LoRA aggregation mode, a personalization
method, a sharing mode, a protocol and a payload type, each with an option of its own read from a
TOML file, registered by ``tests/plugins/fedfm_plugins`` with the public decorators only, each
used by a run whose result shows its effect and its option's (a fallback to a built-in fails).
They run in a fresh process, so their registrations do not leak into the other tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PLUGINS = Path(__file__).parent / "plugins"


def test_plugins_registered_outside_the_package_are_used(tiny_config, tmp_path):
    base = tiny_config(run={"rounds": 1, "threads": 1})
    (tmp_path / "base.json").write_text(json.dumps(base))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")])),
    }
    out = tmp_path / "out" / "report.json"
    out.parent.mkdir()
    subprocess.run(
        [sys.executable, "-m", "fedfm_plugins.check", str(tmp_path / "base.json"), str(out)],
        env=env, check=True, timeout=600,
    )  # fmt: skip
    r = json.loads(out.read_text())
    assert r["plain_moved"] > 0  # a built-in round moves the model ...
    assert r["frozen_moved"] == 0  # ... the plug-in objective trains as itself: frozen
    assert r["zero_moved"] == 0  # the plug-in aggregator decides the aggregate
    assert r["half_error"] < 1e-6  # the plug-in server optimizer takes half the FedAvg step
    assert r["tags"] == [0.0, 1.0, 3.0]  # the client half ran on every client; the server half ...
    assert r["tag_rejected"] == [{"client": 2, "reason": "plugin-tag: client 2 refused"}]
    assert r["tag_num_clients"] == 3  # ... refused the client its option names before the aggregate
    assert r["reverse_order"] == [3, 2, 1, 0]  # the plug-in engine ran the cohort
    assert r["heavy_sizes"][1:] == [1, 1, 1] and r["heavy_sizes"][0] > 1  # the plug-in partitioner
    assert r["top2"] is not None and r["top2"] >= r["top1"]  # the plug-in task evaluated
    # FedDyn, both halves, its alpha read from a TOML file: in round 1 twice FedProx's step
    assert r["feddyn_moved"] > 0 and r["feddyn_twice_fedprox_error"] < 1e-5
    assert "did you mean strategy.feddyn_alpha" in r["feddyn_misspelt"]
    # the plug-in aggregator's own option is bound: trimming 1 of 4 equals trimmed_mean at 0.25
    assert r["trim_count_error"] < 1e-6 and r["trim_count_saved"]
    # a compression method, an attack and a tracker, each with its own option
    assert r["round0_moved"] == 0 < r["round8_moved"]  # round_decimals = 0 rounds the update away
    assert r["factor_error"] < 1e-6  # plugin_factor = -1 from every client undoes the plain round
    # a deployed client is told the options of the plug-ins it runs (FedDyn's α), not the server's
    assert r["client_told_alpha"] and not r["client_told_trim"]
    assert r["client_told_model_option"]  # a client builds the model itself: it needs the model's options
    assert r["lines_rounds"] == [0, 1]  # the tracker wrote its file under the name its option gave
    # the options of the first plug-ins, each changing what they do
    assert r["quarter_error"] < 1e-6  # plugin_step_scale = 0.25: a quarter of the FedAvg step
    assert r["heavier_sizes"][1:] == [2, 2, 2]  # plugin_rows_each = 2
    assert r["forward_order"] == [0, 1, 2, 3]  # plugin_reverse = false: the cohort in order
    assert r["top1_plugin"] == r["top1_task"]  # plugin_top_k = 1: top-1 is the task's own accuracy
    # a model (the base folder cut to plugin_layers = 1 of its 2 layers)
    assert r["plain_layers"] == ["0", "1"] and r["shallow_layers"] == ["0"]
    # a dataset (the first plugin_rows = 20 rows of the CSV, 15 of them for training)
    assert r["head_rows"] == 15 < r["plain_rows"]
    # a LoRA aggregation mode: scale 0 keeps every LoRA factor, the head still moves; scale 1 is
    # the factor mean, which for equal ranks is the plain round exactly
    assert r["lora0_lora_moved"] == 0 < r["lora0_other_moved"] and r["lora1_error"] == 0
    # a personalization method keeping what plugin_personal_pattern names (lora_A) home: the global
    # lora_A never moves, though a plain round moves it, and lora_B does
    assert r["pattern_a_moved"] == 0 < r["plain_a_moved"] and r["pattern_b_moved"] > 0
    assert r["bottom_layers"] == ["0"]  # a sharing mode: clients train plugin_keep_layers = 1 layers
    assert r["stop_rounds"] == [0, 1]  # a protocol: plugin_stop_after = 1 of 3 rounds
    # a payload type (bfloat16 deltas, made and read back by its transform): fewer bytes up, the
    # same round to bfloat16's precision
    assert r["narrow_bytes_up"] < 0.7 * r["plain_bytes_up"]
    assert r["narrow_moved"] > 0 and r["narrow_error"] < 1e-4
