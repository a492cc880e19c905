"""fedfm audit's measured tables (docs/audit.md): each attack undefended and under each defense,
over seeds, in the reproduce results format.

- inversion (MiniLM, BBC News; the victim is client ``seed``): the default experiment as it is;
  LoRA's form in its best case (rank 16, 16 tokens, so B·T ≤ r); full fine-tuning of layer 0
  (the first layer's weights, 32 tokens); each under "your configuration", best case, secure
  aggregation of 5 and client DP at ε = 8. SmolLM2-135M instruction tuning (chatterbot, rank 64,
  64 tokens): one seed, best case and your configuration, marked as such.
- canaries: the default experiment with central client DP at ε = 2 (the sound mechanism, and the
  noise divided by 10), and examples/dp-secagg.toml's central-noise twin (ε = 8, adaptive clipping).
- observed: on the same runs, the property attack on the per-client losses the server records
  (none under DP: it records none).
- membership: the default experiment undefended and with central client DP at ε = 8 (uniform
  weighting, as DP needs; ``privacy.noise_seed`` = the seed, so its noise comes back the same),
  final accuracy beside the attacks' AUC.

    python benchmarks/audit.py --out benchmarks/results/audit.json            # 3 seeds
    python benchmarks/audit.py --out /tmp/audit.quick.json --quick            # 1 seed, 2 rounds
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import tomli_w

ROOT = Path(__file__).resolve().parents[1]


def default(**changes) -> dict:
    raw = tomllib.loads((ROOT / "examples" / "default.toml").read_text())
    raw["run"]["threads"] = 1
    for section, values in changes.items():
        raw.setdefault(section, {}).update(values)
    return raw


INVERSION = {
    "default experiment": {},
    "LoRA r=16, 16 tokens": {"peft": {"r": 16}, "model": {"max_length": 16}},
    "full, layer 0": {"peft": {"method": "full", "layers": [0]}, "model": {"max_length": 32}},
}


def inversion(raw: dict, seed: int, note) -> list[dict]:
    from fedfm.audit.inversion import InversionAudit, default_settings, warm_start
    from fedfm.config import RunConfig
    from fedfm.tasks.setup import build_task, prepare_data

    raw = json.loads(json.dumps(raw))
    raw["run"]["seed"] = seed
    cfg = RunConfig.model_validate(raw)
    data = prepare_data(cfg)
    bundle, task = build_task(cfg, data)
    start = warm_start(bundle, task, data, cfg, seed)
    audit = InversionAudit(cfg, bundle, task, data, start, victim=seed % data.num_clients, batch=1)
    lora = cfg.peft.method == "lora"
    return audit.run(default_settings(clients=5, epsilon=8.0, lora=lora), seed, progress=note)


def smollm2(seed: int, note) -> list[dict]:
    from fedfm.audit.inversion import InversionAudit, default_settings, warm_start
    from fedfm.config import RunConfig
    from fedfm.tasks.setup import build_task, prepare_data

    raw = tomllib.loads((ROOT / "examples" / "chatterbot-smollm2.toml").read_text())
    raw["run"].update({"threads": 1, "seed": seed})
    raw["model"]["max_length"] = 64
    raw["peft"]["r"] = 64
    cfg = RunConfig.model_validate(raw)
    data = prepare_data(cfg)
    bundle, task = build_task(cfg, data)
    start = warm_start(bundle, task, data, cfg, seed)
    audit = InversionAudit(cfg, bundle, task, data, start, victim=seed, batch=1)
    return audit.run(default_settings()[:2], seed, progress=note)


def canaries(seed: int) -> list[dict]:
    from fedfm.audit.canaries import canary_audit, central_plan
    from fedfm.config import RunConfig, load_config

    rows = []
    dp2 = RunConfig.model_validate(
        default(privacy={"dp": "client", "target_epsilon": 2.0}, strategy={"weighting": "uniform"})
    )
    shipped = load_config(
        ROOT / "examples" / "dp-secagg.toml", ["privacy.noise=central", "secagg.enabled=false"]
    )
    for name, cfg, factor in (
        ("default, ε = 2", dp2, 1.0),
        ("default, ε = 2, noise ÷ 10 (broken)", dp2, 0.1),
        ("examples/dp-secagg.toml, central twin", shipped, 1.0),
    ):
        plan = central_plan(cfg, cfg.partition.num_clients, 100_000)
        rows.append({"config": name, **canary_audit(plan, 400, seed, noise_factor=factor)})
    return rows


def membership(raw: dict, seed: int, folder: Path, note) -> dict:
    from fedfm.audit.kinds import MembershipOptions, run_membership
    from fedfm.audit.runner import build_context, train_final

    raw = json.loads(json.dumps(raw))
    raw["run"]["seed"] = seed
    path = folder / "config.toml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(raw))
    ctx = build_context(path, seed, note)
    train_final(ctx, folder)
    (row,) = run_membership(ctx, MembershipOptions())["rows"]
    records = [json.loads(x) for x in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    row["final_test_accuracy"] = [r["test_accuracy"] for r in records if "test_accuracy" in r][-1]
    from fedfm.audit.observed import observed_attack

    seen = observed_attack(folder / "run")  # what the server saw per client in the clear
    row["property_auc"] = seen["rows"][0]["property_auc"] if "rows" in seen else None
    return row


def main() -> int:
    from fedfm.reproduce.results import Measurement, stamp, write

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true", help="seed 0, 2 rounds, no SmolLM2")
    args = ap.parse_args()
    seeds = [0] if args.quick else args.seeds
    rounds = {"run": {"rounds": 2}} if args.quick else {}
    began = time.perf_counter()

    def note(s):
        print(f"[{time.perf_counter() - began:6.0f}s] {s}", flush=True)

    values: dict[tuple, list] = {}

    def add(name, kind, group, seed, value):
        if value is not None:
            values.setdefault((name, kind, tuple(group.items())), []).append((seed, float(value)))

    for seed in seeds:
        for label, changes in INVERSION.items():
            note(f"inversion: {label}, seed {seed}")
            for r in inversion(default(**changes), seed, note):
                group = {"attack": "inversion", "config": label, "setting": r["setting"]}
                for key in ("token_precision", "token_recall", "rouge_l", "label_count_error"):
                    add(key, "score", group, seed, r.get(key))
        note(f"canaries, seed {seed}")
        for r in canaries(seed):
            group = {"attack": "canaries", "config": r["config"]}
            add("reported epsilon", "epsilon", group, seed, r["reported_epsilon"])
            add("one-run lower bound", "score", group, seed, r["epsilon_lower_bound"])
            add("estimate", "score", group, seed, r["epsilon_estimate"])
        with tempfile.TemporaryDirectory(prefix="fedfm-audit-") as tmp:
            for label, privacy in (
                ("none", {}),
                ("client DP, ε = 8", {"dp": "client", "target_epsilon": 8.0, "noise_seed": seed}),
            ):
                note(f"membership: {label}, seed {seed}")
                changes = {
                    **rounds,
                    "privacy": privacy,
                    **({"strategy": {"weighting": "uniform"}} if privacy else {}),
                }
                r = membership(default(**changes), seed, Path(tmp) / label.replace(" ", "_"), note)
                group = {"attack": "membership", "defense": label}
                add("final test accuracy", "accuracy", group, seed, r["final_test_accuracy"])
                for key in (
                    "loss_auc",
                    "loss_tpr_at_1pct_fpr",
                    "calibrated_auc",
                    "calibrated_tpr_at_1pct_fpr",
                ):
                    add(key, "score", group, seed, r[key])
                add(
                    "property_auc", "score", {"attack": "observed", "defense": label}, seed, r["property_auc"]
                )
    if not args.quick:
        note("inversion: SmolLM2-135M, seed 0 (one seed)")
        for r in smollm2(0, note):
            group = {
                "attack": "inversion",
                "config": "SmolLM2-135M, LoRA r=64, 64 tokens (1 seed)",
                "setting": r["setting"],
            }
            for key in ("token_precision", "token_recall", "rouge_l"):
                add(key, "score", group, 0, r.get(key))
    found = [
        Measurement(name, kind, [v for _, v in pairs], [s for s, _ in pairs], dict(group))
        for (name, kind, group), pairs in values.items()
    ]
    config = {"script": "benchmarks/audit.py", "quick": args.quick, "inversion": INVERSION}
    write(
        args.out,
        stamp("audit/audit", config, seeds, torch_threads=1),
        found,
        time.perf_counter() - began,
        args.quick,
    )
    note(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
