"""Run one small experiment per plug-in and write what each shows (``python -m fedfm_plugins.check
CONFIG_JSON OUT_JSON``); ``tests/test_plugins.py`` runs it in a fresh process, so the plug-ins'
registrations never leak into other tests."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import fedfm
import fedfm_plugins  # noqa: F401  (registers the plug-ins)
from fedfm.checkpoint import load_checkpoint
from fedfm.reporting.metrics import read_jsonl


def delta(run_dir: Path, initial) -> float:
    after = load_checkpoint(run_dir / "checkpoint").params
    return float(sum((after[k] - initial[k]).abs().sum() for k in initial))


def main(base: dict, out: Path) -> None:
    def run(name, **sections):
        cfg = {s: dict(v) for s, v in base.items()}
        for s, v in sections.items():
            cfg.setdefault(s, {}).update(v)
        return fedfm.run(cfg, output=out.parent / name, progress=False)

    sgd = {"optimizer": "sgd", "max_grad_norm": None}
    plain = run("plain", training=sgd)
    start = load_checkpoint(plain.run_dir / "checkpoint")  # after one plain round from θ0
    from fedfm.config import make_config
    from fedfm.experiment import build_task, prepare_data
    from fedfm.models.state import get_trainable_state

    theta0 = get_trainable_state(build_task(make_config(base), prepare_data(make_config(base)))[0].trainable)
    moved = {k: start.params[k] - theta0[k] for k in theta0}
    half = run("half", training=sgd, strategy={"server_optimizer": "plugin-half"})
    half_params = load_checkpoint(half.run_dir / "checkpoint").params
    half_error = max(float((half_params[k] - theta0[k] - 0.5 * moved[k]).abs().max()) for k in theta0)
    tagged = run("tag", pipeline={"extra": ["plugin-tag"]})
    clients = [r for r in read_jsonl(tagged.run_dir / "metrics.jsonl") if r.get("event") == "client"]
    reverse = run("reverse", run={"engine": "plugin-reverse"}, sampling={"fraction": 1.0})
    order = [r["client"] for r in read_jsonl(reverse.run_dir / "metrics.jsonl") if r.get("event") == "client"]
    heavy = run("heavy", partition={"method": "plugin-heavy", "num_clients": 4})
    sizes = [c["num_train"] for c in json.loads((heavy.run_dir / "partition.json").read_text())["clients"]]
    top2 = run("top2", task={"kind": "plugin-top2"})
    report = {
        "plain_moved": float(sum(v.abs().sum() for v in moved.values())),
        "frozen_moved": delta(
            run("frozen", training=sgd, strategy={"objective": "plugin-frozen"}).run_dir, theta0
        ),
        "zero_moved": delta(run("zero", strategy={"aggregator": "plugin-zero"}).run_dir, theta0),
        "half_error": half_error,
        "tags": sorted(r.get("plugin_tag") for r in clients),
        "tag_rejected": tagged.history[-1]["rejected"],
        "tag_num_clients": tagged.history[-1]["num_clients"],
        "reverse_order": order,
        "heavy_sizes": sizes,
        "top2": top2.history[-1].get("test_top2_accuracy"),
        "top1": top2.history[-1].get("test_accuracy"),
    }
    out.write_text(json.dumps(report))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
