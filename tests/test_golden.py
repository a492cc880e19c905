"""Golden runs: the metrics of eight reference experiments, held to 1e-6 on every metric.

Recorded (one torch thread, reproducible privacy noise) before the round is redesigned, so that a
refactor that changes what users get fails here: every round and client record must match its
golden line key for key, numbers to 1e-6, except wall-clock fields (names ending in ``_s``).
Re-record only for an intended change of behaviour, and say so in the commit:

    FEDFM_RECORD_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

import fedfm

GOLDEN = Path(__file__).parent / "golden"
RECORD = os.environ.get("FEDFM_RECORD_GOLDEN") == "1"
SEEDED = {"noise_seed": 1}


def scaffold_topk(tiny, _):
    return tiny(
        strategy={"objective": "scaffold"},
        training={"optimizer": "sgd", "lr": 0.05, "local_steps": 3},
        compression={"method": "topk", "ratio": 0.2},
        sampling={"fraction": 0.75},
    )


def dp_adaptive(tiny, _):
    privacy = {"dp": "client", "noise_multiplier": 1.0, "clip_norm": 0.5, "adaptive_clipping": True}
    return tiny(strategy={"weighting": "uniform"}, privacy={**privacy, **SEEDED, "clipped_count_stddev": 2.0})


def secagg(tiny, _):
    return tiny(secagg={"enabled": True})


def exact_lora_tiers(tiny, _):
    return tiny(strategy={"lora_aggregation": "exact"}, peft={"rank_tiers": [2, 4]})


def flora_stack(tiny, _):
    return tiny(strategy={"lora_aggregation": "stack"})


def backdoor_krum(tiny, _):
    return tiny(
        partition={"num_clients": 6},
        attack={"kind": "backdoor", "fraction": 0.2, "target_label": 0},
        strategy={"aggregator": "krum", "byzantine": 1},
    )


def instruction_dp_secagg(_, instruction):
    privacy = {"dp": "client", "noise": "distributed", "noise_multiplier": 1.0, "clip_norm": 0.5, **SEEDED}
    return instruction(strategy={"weighting": "uniform"}, privacy=privacy, secagg={"enabled": True})


def default_experiment(_, __):
    # its first three rounds: the recorded file holds all seven (recorded before the redesign), and
    # rounds 1–3 of a 3-round run are those of the 7-round run (nothing depends on the total);
    # the other four would add 90 s to CI for no new code path
    return {"run": {"threads": 1, "rounds": 3}}


CASES = {
    f.__name__: f
    for f in (
        scaffold_topk,
        dp_adaptive,
        secagg,
        exact_lora_tiers,
        flora_stack,
        backdoor_krum,
        instruction_dp_secagg,
        default_experiment,
    )
}


def comparable(record):
    """A record without its wall-clock fields (any key ending in ``_s``), recursively."""
    if isinstance(record, dict):
        return {k: comparable(v) for k, v in record.items() if not k.endswith("_s")}
    if isinstance(record, list):
        return [comparable(v) for v in record]
    return record


def same(got, want, where: str) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), (
            f"{where}: keys {sorted(got)} != {sorted(want)}"
        )
        for k in want:
            same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            same(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert isinstance(got, (int, float)) and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6), (
            f"{where}: {got!r} != {want!r}"
        )
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


@pytest.mark.parametrize("name", list(CASES))
def test_golden_run(name, tiny_config, instruction_config, tmp_path):
    cfg = CASES[name](tiny_config, instruction_config)
    result = fedfm.run(cfg, output=tmp_path / name, progress=False)
    lines = [comparable(json.loads(x)) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    path = GOLDEN / f"{name}.jsonl"
    if RECORD:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text("".join(json.dumps(x, sort_keys=True) + "\n" for x in lines))
        pytest.skip(f"recorded {path}")
    rounds = result.config.run.rounds  # a recording may hold more rounds than the test runs
    want = [w for w in map(json.loads, path.read_text().splitlines()) if w.get("round", 0) <= rounds]
    assert len(lines) == len(want), f"{name}: {len(lines)} records, golden has {len(want)}"
    for i, (got, expected) in enumerate(zip(lines, want, strict=True)):
        same(got, expected, f"{name} line {i + 1}")
