"""Plug-ins from outside the package: an objective (FedDyn, both halves), a server optimizer, an
aggregator, a transform, a partitioner, a task, an engine, a compression method, an attack and a
tracker, several with options of their own (read from TOML), registered by
``tests/plugins/fedfm_plugins`` with the public decorators only, each used by a run whose result
shows its effect (a fallback to a built-in fails).
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
    assert r["lines_rounds"] == [0, 1]  # the tracker wrote its file under the name its option gave
