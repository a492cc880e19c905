"""Run one small experiment per plug-in and write what each shows (``python -m fedfm_plugins.check
CONFIG_JSON OUT_JSON``); ``tests/test_plugins.py`` runs it in a fresh process, so the plug-ins'
registrations never leak into other tests."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import tomli_w
import torch

import fedfm
import fedfm_plugins  # noqa: F401  (registers the plug-ins)
from fedfm.reporting.metrics import read_jsonl
from fedfm.server.checkpoint import load_checkpoint


def delta(run_dir: Path, initial) -> float:
    after = load_checkpoint(run_dir / "checkpoint").params
    return float(sum((after[k] - initial[k]).abs().sum() for k in initial))


def main(base: dict, out: Path) -> None:
    def run(name, **sections):
        cfg = {s: dict(v) for s, v in base.items()}
        for s, v in sections.items():
            cfg.setdefault(s, {}).update(v)
        return fedfm.run(cfg, output=out.parent / name, progress=False)

    def run_toml(name, **sections):
        """A run whose config is read from a TOML file (how a user sets a plug-in's options)."""
        cfg = {s: dict(v) for s, v in base.items()}
        for s, v in sections.items():
            cfg.setdefault(s, {}).update(v)
        path = out.parent / f"{name}.toml"
        path.write_text(tomli_w.dumps(cfg))
        return fedfm.run(fedfm.load_config(path), output=out.parent / name, progress=False)

    def params(result):
        return load_checkpoint(result.run_dir / "checkpoint").params

    def moved_by(result, keep):
        after = params(result)
        return float(sum((after[k] - theta0[k]).abs().sum() for k in after if keep(k)))

    sgd = {"optimizer": "sgd", "max_grad_norm": "null"}
    plain = run("plain", training=sgd)
    start = load_checkpoint(plain.run_dir / "checkpoint")  # after one plain round from θ0
    from fedfm.config import make_config
    from fedfm.models.state import get_trainable_state
    from fedfm.tasks.setup import build_task, prepare_data

    theta0 = get_trainable_state(build_task(make_config(base), prepare_data(make_config(base)))[0].trainable)
    moved = {k: start.params[k] - theta0[k] for k in theta0}
    half = run("half", training=sgd, strategy={"server_optimizer": "plugin-half"})
    half_params = load_checkpoint(half.run_dir / "checkpoint").params
    half_error = max(float((half_params[k] - theta0[k] - 0.5 * moved[k]).abs().max()) for k in theta0)
    quarter = params(
        run_toml(
            "quarter", training=sgd, strategy={"server_optimizer": "plugin-half", "plugin_step_scale": 0.25}
        )
    )
    quarter_error = max(float((quarter[k] - theta0[k] - 0.25 * moved[k]).abs().max()) for k in theta0)
    tagged = run("tag", pipeline={"extra": ["plugin-tag"], "plugin_tag_refuse": 2})
    clients = [r for r in read_jsonl(tagged.run_dir / "metrics.jsonl") if r.get("event") == "client"]
    reverse = run("reverse", run={"engine": "plugin-reverse"}, sampling={"fraction": 1.0})
    order = [r["client"] for r in read_jsonl(reverse.run_dir / "metrics.jsonl") if r.get("event") == "client"]
    heavy = run("heavy", partition={"method": "plugin-heavy", "num_clients": 4})
    sizes = [c["num_train"] for c in json.loads((heavy.run_dir / "partition.json").read_text())["clients"]]
    heavier = run_toml(
        "heavier", partition={"method": "plugin-heavy", "num_clients": 4, "plugin_rows_each": 2}
    )
    heavier_sizes = [
        c["num_train"] for c in json.loads((heavier.run_dir / "partition.json").read_text())["clients"]
    ]
    forward = run_toml("forward", run={**base["run"], "engine": "plugin-reverse", "plugin_reverse": False})
    forward_order = [
        r["client"] for r in read_jsonl(forward.run_dir / "metrics.jsonl") if r.get("event") == "client"
    ]
    top2 = run("top2", task={"kind": "plugin-top2"})
    top1 = run_toml("top1", task={"kind": "plugin-top2", "plugin_top_k": 1}).history[-1]
    # a model, a dataset, a LoRA mode, a personalization method, a sharing mode, a protocol and a
    # payload type, each with its own option read from TOML
    model_dir = base["model"]["name"]
    shallow = run_toml("shallow", model={**base["model"], "name": "plugin-shallow", "plugin_base": model_dir})
    headed = run_toml("head", data={**base["data"], "name": "plugin-head", "plugin_rows": 20})
    head_rows = sum(
        c["num_train"] for c in json.loads((headed.run_dir / "partition.json").read_text())["clients"]
    )
    plain_rows = sum(
        c["num_train"] for c in json.loads((plain.run_dir / "partition.json").read_text())["clients"]
    )
    lora = {"lora_aggregation": "plugin-scaled"}
    still = run_toml("lora0", training=sgd, strategy={**lora, "plugin_lora_scale": 0.0})
    scaled_one = params(run_toml("lora1", training=sgd, strategy={**lora, "plugin_lora_scale": 1.0}))
    plain_params = params(plain)
    pattern = run_toml(
        "pattern", training=sgd, data={**base["data"], "client_test_fraction": 0.25},
        personalization={"method": "plugin-pattern", "plugin_personal_pattern": "lora_A"},
    )  # fmt: skip
    bottom = run_toml("bottom", sharing={"mode": "plugin-bottom", "plugin_keep_layers": 1})
    stopped = run_toml(
        "stop", run={**base["run"], "rounds": 3, "protocol": "plugin-stop", "plugin_stop_after": 1}
    )
    narrow = run_toml(
        "narrow", training=sgd, pipeline={"extra": ["plugin-narrow"], "plugin_narrow_dtype": "bfloat16"}
    )
    narrow_params = params(narrow)
    # options of plug-ins, from a TOML file: FedDyn's alpha, the count-trimmed mean's count
    every = {"fraction": 1.0}
    toml = out.parent / "feddyn.toml"
    cfg = {s: dict(v) for s, v in base.items()}
    cfg.update(training={**cfg.get("training", {}), **sgd, "max_grad_norm": "null"}, sampling=every)
    cfg["strategy"] = {**cfg.get("strategy", {}), "objective": "plugin-feddyn", "feddyn_alpha": 0.5}
    toml.write_text(tomli_w.dumps(cfg))
    feddyn = fedfm.run(fedfm.load_config(toml), output=out.parent / "feddyn", progress=False)
    prox = run("fedprox", training=sgd, sampling=every, strategy={"objective": "fedprox", "mu": 0.5})
    dyn_params = load_checkpoint(feddyn.run_dir / "checkpoint").params
    prox_params = load_checkpoint(prox.run_dir / "checkpoint").params
    twice = max(
        float((dyn_params[k] - theta0[k] - 2 * (prox_params[k] - theta0[k])).abs().max()) for k in theta0
    )
    try:
        fedfm.load_config(toml, ["strategy.feddyn_alfa=1.0"])
        misspelt = ""
    except fedfm.ConfigError as err:
        misspelt = str(err)
    four = {"method": "iid", "num_clients": 4}
    trim = {"aggregator": "plugin-trim", "trim_count": 1}
    by_count = run("trim", partition=four, sampling=every, training=sgd, strategy=trim)
    by_ratio = run(
        "trimmed", partition=four, sampling=every, training=sgd,
        strategy={"aggregator": "trimmed_mean", "trim_ratio": 0.25},
    )  # fmt: skip
    a, b = (load_checkpoint(r.run_dir / "checkpoint").params for r in (by_count, by_ratio))
    saved = (by_count.run_dir / "config.toml").read_text()
    rounded = run("round", compression={"method": "plugin-round", "round_decimals": 0})
    kept = run("round8", compression={"method": "plugin-round", "round_decimals": 8})
    undone = run(
        "factor", training=sgd, attack={"kind": "plugin-factor", "fraction": 1.0, "plugin_factor": -1.0}
    )
    undone_params = load_checkpoint(undone.run_dir / "checkpoint").params
    lined = run("lines", run={"trackers": ["plugin-lines"], "plugin_lines_file": "mine.jsonl"})
    lines = (lined.run_dir / "mine.jsonl").read_text().splitlines()
    from fedfm.deploy.view import client_config_toml  # what a deployed client is told

    told = client_config_toml(fedfm.load_config(toml, ["strategy.trim_count=3"]))
    told_model = client_config_toml(fedfm.load_config(out.parent / "shallow.toml"))
    report = {
        "plain_moved": float(sum(v.abs().sum() for v in moved.values())),
        "frozen_moved": delta(
            run("frozen", training=sgd, strategy={"objective": "plugin-frozen"}).run_dir, theta0
        ),
        "zero_moved": delta(run("zero", strategy={"aggregator": "plugin-zero"}).run_dir, theta0),
        "half_error": half_error,
        "quarter_error": quarter_error,
        "heavier_sizes": heavier_sizes,
        "forward_order": forward_order,
        "top1_plugin": top1.get("test_top1_accuracy"),
        "top1_task": top1.get("test_accuracy"),
        "shallow_layers": sorted(
            {k.split(".layer.")[1].split(".")[0] for k in params(shallow) if ".layer." in k}
        ),
        "plain_layers": sorted({k.split(".layer.")[1].split(".")[0] for k in plain_params if ".layer." in k}),
        "head_rows": head_rows,
        "plain_rows": plain_rows,
        "lora0_lora_moved": moved_by(still, lambda k: "lora_" in k),
        "lora0_other_moved": moved_by(still, lambda k: "lora_" not in k),
        "lora1_error": max(float((scaled_one[k] - plain_params[k]).abs().max()) for k in plain_params),
        "pattern_a_moved": moved_by(pattern, lambda k: "lora_A" in k),
        "plain_a_moved": moved_by(plain, lambda k: "lora_A" in k),
        "pattern_b_moved": moved_by(pattern, lambda k: "lora_B" in k),
        "bottom_layers": sorted(
            {k.split(".layer.")[1].split(".")[0] for k in params(bottom) if ".layer." in k}
        ),
        "stop_rounds": [r["round"] for r in stopped.history],
        "narrow_bytes_up": narrow.history[-1]["bytes_up"],
        "plain_bytes_up": plain.history[-1]["bytes_up"],
        "narrow_error": max(float((narrow_params[k] - plain_params[k]).abs().max()) for k in plain_params),
        "narrow_moved": delta(narrow.run_dir, theta0),
        "tags": sorted(r.get("plugin_tag") for r in clients),
        "tag_rejected": tagged.history[-1]["rejected"],
        "tag_num_clients": tagged.history[-1]["num_clients"],
        "reverse_order": order,
        "heavy_sizes": sizes,
        "top2": top2.history[-1].get("test_top2_accuracy"),
        "top1": top2.history[-1].get("test_accuracy"),
        "feddyn_moved": delta(feddyn.run_dir, theta0),
        "feddyn_twice_fedprox_error": twice,
        "feddyn_misspelt": misspelt,
        "trim_count_error": max(float((a[k] - b[k]).abs().max()) for k in a),
        "trim_count_saved": "trim_count = 1" in saved,
        "round0_moved": delta(rounded.run_dir, theta0),
        "round8_moved": delta(kept.run_dir, theta0),
        "factor_error": max(float((undone_params[k] - theta0[k] + moved[k]).abs().max()) for k in theta0),
        "lines_rounds": [json.loads(x)["round"] for x in lines],
        "client_told_alpha": "feddyn_alpha = 0.5" in told,
        "client_told_trim": "trim_count" in told,
        "client_told_model_option": "plugin_layers = 1" in told_model,
    }
    out.write_text(json.dumps(report))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
