"""Render measured tables into the docs from their results files, between markers.

A table lives in a doc (README.md or docs/*.md) between ``<!-- results:NAME -->`` and
``<!-- /results:NAME -->``. NAME is a renderer below, which reads its JSON under
``benchmarks/results/``; or ``sweep/FILE`` (``docs/results/FILE.json``, a sweep entry's groups as
mean ± 95% interval, ``fedfm.reproduce.render.sweep_table``); or ``claims`` (the claims of
``docs/results/claims.toml``, judged). ``python tools/render_results.py`` rewrites every marked
table; ``--check`` exits 1 when a doc differs from what its results file renders, or when a
table with measured-looking numbers stands outside markers without being listed in
``docs/results/unsourced.toml`` (``tests/test_docs.py`` runs the check, so a number edited by
hand, a results file updated without its table, or a new hand-written table is caught).
"""

# ruff: noqa: E501 (table text)
from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
UNSOURCED = DOCS / "results" / "unsourced.toml"


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def load_json(relative: str) -> dict:
    return json.loads((ROOT / relative).read_text())


def generic(name: str) -> str:
    """``sweep/FILE`` and ``claims``: rendered by fedfm.reproduce.render."""
    from fedfm.reproduce.render import claims_table, sweep_table

    if name == "claims":
        return claims_table(tomllib.loads((DOCS / "results" / "claims.toml").read_text())["claim"], load_json)
    kind, _, file = name.partition("/")
    if kind == "sweep":
        return sweep_table(load_json(f"docs/results/{file}.json"))
    raise KeyError(f"no renderer for results:{name}")


def scale_server() -> str:
    """benchmarks/scale.py: the deployed server at 1 GiB per update."""
    data = json.loads((RESULTS / "scale.json").read_text())
    m = data["machine"]
    names = {
        "mean": "streaming mean",
        "median": "spill + median",
        "old-mean": "before: joined in memory, mean",
    }
    head = "| path | senders | round (s) | server peak RSS (MB) | download MB/s | upload MB/s |"
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in data["runs"]:
        cells = [
            names[r["rule"]],
            str(r["senders"]),
            f"{r['round_wall_s']:.1f}",
            f"{r['server_peak_rss_mb']:,.0f}",
            f"{r['download_mb_s_per_sender']:.0f}",
            f"{r['upload_mb_s_per_sender']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    base = next(r for r in data["runs"] if r["rule"] == "mean")["server_rss_with_theta_mb"]
    cfg, ratio = data["config"], data["ratio_peak_mean_max_vs_min_senders"]
    lines += [
        "",
        f"{cfg['gib_per_update']:g} GiB per update ({cfg['tensors']} float32 tensors); MB/s are per sender. "
        f"The server holds θ itself ({base:,.0f} MB with the interpreter). Streaming mean, 8 senders "
        f"against 1: **{ratio:.2f}×** the peak (goal ≤ 1.5×). Machine: {m['cpus']} CPUs, "
        f"{m['torch_threads']} torch threads, torch {m['torch']}, Python {m['python']}; fedfm "
        f"{data['fedfm_version']}; whole benchmark {data['wall_s'] / 60:.1f} min; one run per row (seed 0).",
    ]
    return "\n".join(lines)


def secagg_large() -> str:
    """benchmarks/secagg_large.py: secure aggregation at 64–256 MiB per update."""
    data = json.loads((RESULTS / "secagg-large.json").read_text())
    lines = [
        "| update (MiB of float32) | dropped | client s | server s | client s / MiB | server s / MiB | "
        "peak RSS (MB) | upload ÷ float32 |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for size in data["sizes"]:
        for r in size["rows"]:
            cells = [
                str(size["mib"]),
                str(r["dropped"]),
                f"{r['client_s_per_client']:.2f}",
                f"{r['server_s']:.2f}",
                f"{r['client_s_per_mib']:.3f}",
                f"{r['server_s_per_mib']:.3f}",
                f"{size['peak_rss_mb']:,.0f}",
                f"{r['bytes_up_per_client'] * r['clients'] / (r['clients'] - r['dropped']) / r['plain_upload_bytes']:.2f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    cfg, m = data["config"], data["machine"]
    lines += [
        "",
        f"{cfg['protocol']}, {cfg['clients']} clients in one process, a {cfg['bits']}-bit field, one round per "
        f"row (peak RSS per size, both rows). Refused above {data['refused_above_values']:,} values. Machine: "
        f"{m['cpus']} CPUs, {m['torch_threads']} torch thread; fedfm {data['fedfm_version']}.",
    ]
    return "\n".join(lines)


def two_processes() -> str:
    """benchmarks/ranks.py: one client's local training on 2 processes against 1."""
    d = json.loads((RESULTS / "ranks.json").read_text())
    one, two, fsdp = d["one_process"], d["two_processes"], d["two_processes_fsdp"]
    held = " / ".join(f"{mb:.1f}" for mb in fsdp["held_mb_per_rank"])
    peaks = " / ".join(str(mb) for mb in fsdp["peak_rss_mb_per_rank"])
    return "\n".join(
        [
            "| client | threads | s / step | parameters held per rank (MB) | peak RSS per rank (MB) |",
            "| --- | ---: | ---: | ---: | ---: |",
            f"| 1 process | {one['threads']} | {one['seconds_per_step']:.3f} | {fsdp['model_mb']:.1f} | — |",
            f"| 2 processes (gloo) | {two['threads_each']} each | {two['seconds_per_step']:.3f} | "
            f"{fsdp['unsharded_held_mb_per_rank']:.1f} | {fsdp['unsharded_peak_rss_mb_rank_0']} (rank 0) |",
            f"| 2 processes, base sharded (`--fsdp`) | {fsdp['threads_each']} each | "
            f"{fsdp['seconds_per_step']:.3f} | {held} | {peaks} |",
            "",
            f"Ratio 2 ÷ 1: **{d['ratio_two_over_one']:.2f}** ({d['machine']['cpus']} CPUs; MiniLM LoRA r = 8, "
            f"batch {d['config']['training']['batch_size']} of {d['config']['model']['max_length']} tokens, "
            f"{d['config']['training']['local_steps']} steps; fedfm {d['fedfm_version']}). The updates differ by "
            f"up to {d['max_abs_update_difference']:.3g}: MiniLM's own dropout (0.1) draws its masks per rank. "
            f"Sharded against unsharded 2 processes: up to {fsdp['max_abs_update_difference_vs_unsharded']:.3g}; "
            f"sharded ÷ 1 process: {fsdp['ratio_over_one_process']:.2f}. Peak RSS includes loading the whole "
            "model on every rank before sharding it.",
        ]
    )


def full_finetuning() -> str:
    """benchmarks/fullft.py: deployed full fine-tuning, killed and resumed."""
    d = json.loads((RESULTS / "fullft.json").read_text())
    peak = d["server_peak_rss_mb"]
    return "\n".join(
        [
            "| update per client | clients | rounds recorded | bytes up per round | server peak RSS (MB) | wall |",
            "| ---: | ---: | --- | ---: | ---: | ---: |",
            f"| {d['update_bytes_per_client'] / 1e6:.0f} MB | {d['config']['partition']['num_clients']} | "
            f"{', '.join(map(str, d['rounds_recorded']))} (SIGKILL after round 1, resumed) | "
            f"{d['bytes_up_per_round'][0] / 1e6:.0f} MB | {peak['before_kill']:,.0f} before, "
            f"{peak['resumed']:,.0f} resumed | {d['wall_s'] / 60:.1f} min |",
            "",
            f"A random-init BERT of {d['config']['model']['parameters'] / 1e6:.0f}M parameters, `peft.method = "
            f'"full"`, plaintext on loopback, {d["machine"]["cpus"]} CPUs; fedfm {d["fedfm_version"]}. The '
            "checkpoint after round 1 was a safetensors file beside state.sqlite (more than 256 MiB of tensors).",
        ]
    )


def llama_1b() -> str:
    """benchmarks/llama1b.py: one federated LoRA round of a 1.17B decoder in bfloat16."""
    d = json.loads((RESULTS / "llama1b.json").read_text())
    shape, r, cfg = d["config"]["model_shape"], d["round"], d["config"]
    t = cfg["training"]
    return "\n".join(
        [
            "| model | clients | local steps | round (s) | run (s) | peak RSS (MB) | LoRA bytes up |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| {shape['parameters'] / 1e9:.2f}B, {shape['layers']} layers, {shape['dtype']} | {r['num_clients']} | "
            f"{t['local_steps']} × batch {t['batch_size']} | {r['round_s']:.1f} | {d['run_wall_s']:.1f} | "
            f"{d['run_peak_rss_mb']:,.0f} | {r['bytes_up'] / 1e6:.1f} MB |",
            "",
            f"Random weights (test loss {r['test_loss']:.2f}, as for a uniform guess over the vocabulary); the run "
            f"includes loading the model by path, the round and scoring {round(cfg['data']['max_examples'] * cfg['data']['test_fraction'])} "
            f"held-out sequences; making and saving the model took {d['make_model_s']:.0f} s more. "
            f"{d['machine']['cpus']} CPUs; fedfm {d['fedfm_version']}.",
        ]
    )


def communication() -> str:
    """benchmarks/communication.py: the default run under each compression or LoRA setting."""
    rows = json.loads((RESULTS / "communication.json").read_text())
    base = next(r for r in rows if r["setting"] == "none")["bytes_up_total"]
    lines = [
        "| setting | final acc | best acc | upload total | × smaller than none | download total |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['test_accuracy']:.3f} | {r['best_accuracy']:.3f} | {r['bytes_up_total'] / 1e6:.2f} MB "
            f"| {base / r['bytes_up_total']:.1f} | {r['bytes_down_total'] / 1e6:.2f} MB |"
        )
    full = rows[0]["full_finetune_bytes_total"]
    lines += [
        "",
        f"Full fine-tuning of the same cohorts would move {full / 1e6:,.0f} MB (up + down). One seed (0).",
    ]
    return "\n".join(lines)


def _privacy_rows() -> dict:
    """benchmarks/privacy.py's runs, keyed by (ε target, method)."""
    rows = json.loads((RESULTS / "privacy.json").read_text())
    return {(str(r["epsilon_target"]), r["method"]): r for r in rows}


def privacy_epsilon() -> str:
    """benchmarks/privacy.py: accuracy, z and the final clip norm against ε, LoRA and head only."""
    runs, lines = (
        _privacy_rows(),
        [
            "| ε (δ = 1e-5) | lora: accuracy | lora: z | lora: final C | head: accuracy | head: z | head: final C |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ],
    )
    for eps in ("1", "4", "8", "inf"):
        cols = []
        for method in ("lora", "head"):
            r = runs[(eps, method)]
            z, c = r["noise_multiplier"], r["final_clip_norm"]
            cols += [
                f"{r['test_accuracy']:.3f}",
                "–" if z is None else f"{z:.3f}",
                "–" if c is None else f"{c:.3f}",
            ]
        lines.append(f"| {'∞ (no DP)' if eps == 'inf' else eps} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def privacy_summary() -> str:
    """README: accuracy against ε, from benchmarks/privacy.py's runs."""
    runs = _privacy_rows()
    lines = ["| ε | 1 | 4 | 8 | ∞ (no DP) |", "| --- | --- | --- | --- | --- |"]
    for method, label in (
        ("lora", "LoRA + head (75,653 trainable)"),
        ("head", "head only (1,925 trainable)"),
    ):
        accs = [f"{runs[(e, method)]['test_accuracy']:.3f}" for e in ("1", "4", "8", "inf")]
        lines.append(f"| {label} | " + " | ".join(accs) + " |")
    return "\n".join(lines)


def benchmark(name: str):
    """A script under benchmarks/ as a module (its own table writer, reused here)."""
    import importlib

    folder = str(ROOT / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


def robustness() -> str:
    """benchmarks/robustness.py: final accuracy (backdoor: and ASR) per attack and aggregator,
    by the script's own table writer."""
    return benchmark("robustness").markdown(json.loads((RESULTS / "robustness.json").read_text()))


PERSONALIZATION = {
    "fedavg": "FedAvg",
    "fedsa-lora": "FedSA-LoRA",
    "fedper": "FedPer",
    "fedrep": "FedRep (2 head steps)",
    "ditto": "Ditto (λ = 0.1)",
    "ifca": "IFCA (k = 3)",
    "local-only": "local-only",
}


def personalization() -> str:
    """examples/sweeps/personalization.toml (reproduce entry ``personalization``): server test
    accuracy, each client on its own test split (global, personal, after local fine-tuning), bytes up."""
    from fedfm.reproduce.render import scaled, sweep_table

    data = load_json("docs/results/personalization.json")
    own = ("_local_accuracy_mean", "_local_accuracy_worst10")
    sweep = tomllib.loads((ROOT / data["config"]["sweep"]).read_text())["sweep"]
    steps = sweep.get("set", {}).get("personalization.finetune_steps", "?")
    columns = [
        ("server test acc", ["test_accuracy"]),
        ("global on own test: mean / worst", [f"global{s}" for s in own]),
        ("personal: mean / worst", [f"personal{s}" for s in own]),
        (f"after {steps} local FT steps: mean / worst", [f"finetuned{s}" for s in own]),
        ("MB up", ["bytes_up_total"], scaled(1e6, 1)),
    ]
    return sweep_table(data, columns=columns, labels=PERSONALIZATION)


def _audit(attack: str, columns: list) -> str:
    """One attack's rows of benchmarks/results/audit.json (benchmarks/audit.py) as a sweep table."""
    from fedfm.reproduce.render import sweep_table

    data = load_json("benchmarks/results/audit.json")
    keep = [
        {**m, "group": {k: v for k, v in m["group"].items() if k != "attack"}}
        for m in data["measurements"]
        if m["group"].get("attack") == attack
    ]
    return sweep_table({**data, "measurements": keep}, columns=columns)


def audit_inversion() -> str:
    return _audit(
        "inversion",
        [
            ("token precision", ["token_precision"]),
            ("token recall", ["token_recall"]),
            ("ROUGE-L", ["rouge_l"]),
            ("label-count error", ["label_count_error"]),
        ],
    )


def audit_canaries() -> str:
    return _audit(
        "canaries",
        [
            ("reported ε", ["reported epsilon"]),
            ("one-run 95% lower bound", ["one-run lower bound"]),
            ("estimate (Andrew et al.)", ["estimate"]),
        ],
    )


def audit_membership() -> str:
    return _audit(
        "membership",
        [
            ("final test accuracy", ["final test accuracy"]),
            ("loss attack: AUC / TPR at 1% FPR", ["loss_auc", "loss_tpr_at_1pct_fpr"]),
            ("calibrated: AUC / TPR at 1% FPR", ["calibrated_auc", "calibrated_tpr_at_1pct_fpr"]),
        ],
    )


def secagg() -> str:
    """benchmarks/secagg.py: per-round protocol costs of SecAgg and SecAgg+ by cohort and dropouts."""
    rows = json.loads((RESULTS / "secagg.json").read_text())["protocol"]
    lines = [
        "| clients | protocol | dropped | client s / client | server s | up / client | down / client | up ÷ plain fp32 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['protocol']} | {r['dropped']} | {r['client_s_per_client']:.3f} | {r['server_s']:.3f} | "
            f"{r['bytes_up_per_client'] / 1e6:.3f} MB | {r['bytes_down_per_client'] / 1e6:.3f} MB | "
            f"{r['bytes_up_per_client'] / r['plain_upload_bytes']:.2f} |"
        )
    return "\n".join(lines)


def batched() -> str:
    """benchmarks/batched.py: throughput, ratios and peak memory of each engine mode."""
    data = json.loads((RESULTS / "batched.json").read_text())
    names = {"minilm": "MiniLM", "smollm2": "SmolLM2-135M"}
    lines = [
        "| workload | mode | examples/s | wall ÷ centralized | speed-up vs in-process | peak RSS (MiB) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in data["results"]:
        for m in r["modes"]:
            lines.append(
                f"| {names[r['workload']]}, batch {r['batch_size']} | {m['mode']} | {m['examples_per_s']:.1f} | "
                f"{m['ratio_to_central']:.2f} | {m['speedup_vs_inprocess']:.2f} | {m['peak_mb']:.0f} |"
            )
    return "\n".join(lines)


def split_deploy() -> str:
    """benchmarks/split_deploy.py: split fine-tuning simulated and deployed, beside deployed LoRA."""
    data = json.loads((RESULTS / "split-deploy.json").read_text())
    labels = {
        "split-simulated": "split, simulated",
        "split-deployed": "split, deployed",
        "lora-deployed": "federated LoRA, deployed",
    }
    lines = [
        "| run | accuracy | wall time | bytes in the last round (up) | server peak RSS | client process peak RSS |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, label in labels.items():
        r = data[key]
        up = f"{r['last_round_bytes_up'] / 1e6:.1f} MB"
        if r["last_round_cut_bytes_up"]:
            up += f" ({r['last_round_cut_bytes_up'] / 1e6:.1f} MB of it the cut)"
        server, client = (
            f"{r[k]:,.0f} MB" if k in r else "—" for k in ("server_peak_rss_mb", "client_process_peak_rss_mb")
        )
        lines.append(
            f"| {label} | {r['test_accuracy']:.3f} | {r['run_wall_s']:.0f} s | {up} | {server} | {client} |"
        )
    return "\n".join(lines)


def overhead() -> str:
    """benchmarks/overhead.py: federation overhead against a central loop (README)."""
    d = json.loads((RESULTS / "overhead.json").read_text())
    a, b, c = d["a_central_vs_federated"], d["b_peak_rss_by_clients"], d["c_many_small_clients"]

    def middle(xs: list[float]) -> str:  # the two middle values of four repeats
        xs = sorted(xs)
        return f"{xs[1]:.2f}–{xs[2]:.2f} s"

    peaks = " / ".join(f"{r['peak_rss_mb']:.0f}" for r in b)
    counts = " / ".join(f"{r['clients']:,}" for r in b)
    return "\n".join(
        [
            "| measurement | central | federated | ratio |",
            "| --- | --- | --- | --- |",
            f"| (a) {a['steps']} steps, 10 clients × 48 examples, batch 16: wall time (median of 4, alternated in one process) "
            f"| {middle(a['central_wall_s'])} | {middle(a['federated_wall_s'])} | **×{a['time_ratio_median']:.3f}** "
            f"(minimums ×{a['time_ratio_min']:.3f}, CPU time ×{a['cpu_ratio_min']:.3f}) |",
            f"| (a) peak RSS (each in its own process) | {a['central_peak_rss_mb']:.0f} MB | {a['federated_peak_rss_mb']:.0f} MB "
            f"| **×{a['memory_ratio']:.3f}** |",
            f"| (b) peak RSS, 1,100 examples among {counts} clients (batch 1, 16 tokens) | | {peaks} MB | flat |",
            f"| (c) per-client overhead, 1,000 one-step clients vs the same 1,100 steps in one loop | | | "
            f"**{c['overhead_ms_per_client_min']:.1f} ms/client** (min; median {c['overhead_ms_per_client_median']:.1f}) — "
            f"×{c['time_ratio_min']:.2f} on this workload of ~30 ms steps |",
        ]
    )


def chatterbot_baselines() -> str:
    """fedfm run examples/chatterbot-smollm2.toml --baselines: federated, local-only, centralized."""
    rows = json.loads((RESULTS / "chatterbot-baselines.json").read_text())["rows"]
    lines = [
        "| setting | all held-out loss | all held-out perplexity | own held-out loss (mean) | own held-out perplexity (mean) | worst client's own loss |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        a, own, worst = r["all_held_out"], r["own_held_out_mean"], r["own_held_out_worst"]
        lines.append(
            f"| {r['setting']} | {a['loss']:.4f} | {a['perplexity']:.4f} | {own['loss']:.4f} | {own['perplexity']:.4f} | {worst['loss']:.4f} |"
        )
    return "\n".join(lines)


def gpu_classify() -> str:
    """benchmarks/gpu.py classify on the lent H200 and its host's CPU; the 2-core column is seed 0
    of the default experiment (docs/results/default-experiment.json)."""
    gpu = json.loads((RESULTS / "gpu-classify-h200.json").read_text())
    host = json.loads((RESULTS / "cpu16-classify-h200-host.json").read_text())
    from fedfm.reproduce.render import find

    local = json.loads((ROOT / "docs" / "results" / "default-experiment.json").read_text())
    wall, acc = (find(local, name, {}).by_seed()[0] for name in ("wall seconds", "final test_accuracy"))
    g, h = gpu["default_run"], host["default_run"]
    lt, ht = gpu["local_training_128_tokens_batch_32"], host["local_training_128_tokens_batch_32"]
    return "\n".join(
        [
            "| measurement | GPU (H200) | CPU, same host (16 cores) | CPU, development machine (2 cores) |",
            "| --- | --- | --- | --- |",
            f"| default experiment, end to end (`fedfm run`, 7 rounds) | **{g['wall_s']:.1f} s**, acc {g['final_accuracy']:.3f}, "
            f"peak GPU memory {g['peak_gpu_mb']:.0f} MB | {h['wall_s']:.1f} s, acc {h['final_accuracy']:.3f} | "
            f"{wall:.0f} s, acc {acc:.3f} |",
            f"| one client's local training, MiniLM, 128 tokens, batch 32 | **{lt['fp32']['examples_per_s']:,.0f} examples/s** (fp32); "
            f"{lt['bf16']['examples_per_s']:,.0f} with bf16 autocast | {ht['fp32']['examples_per_s']:.1f} examples/s | — |",
        ]
    )


def gpu_llm() -> str:
    """benchmarks/gpu.py llm on the lent H200."""
    d = json.loads((RESULTS / "gpu-llm-h200.json").read_text())
    labels = {
        "lora-fp32": "LoRA, fp32",
        "lora-bf16": "LoRA, bf16 autocast",
        "qlora-4bit-bf16": "QLoRA (4-bit NF4 base via bitsandbytes, bf16 compute)",
    }
    lines = ["| setting | examples/s | peak GPU memory |", "| --- | --- | --- |"]
    lines += [
        f"| {label} | {d[k]['examples_per_s']:.1f} | {d[k]['peak_gpu_mb']:,.0f} MB |"
        for k, label in labels.items()
    ]
    return "\n".join(lines)


RENDERERS = {
    "gpu-classify": gpu_classify,
    "gpu-llm": gpu_llm,
    "chatterbot-baselines": chatterbot_baselines,
    "overhead": overhead,
    "split-deploy": split_deploy,
    "batched": batched,
    "secagg": secagg,
    "robustness": robustness,
    "privacy-epsilon": privacy_epsilon,
    "privacy-summary": privacy_summary,
    "communication": communication,
    "llama-1b": llama_1b,
    "scale-server": scale_server,
    "secagg-large": secagg_large,
    "two-processes": two_processes,
    "full-finetuning": full_finetuning,
    "personalization": personalization,
    "audit-inversion": audit_inversion,
    "audit-canaries": audit_canaries,
    "audit-membership": audit_membership,
}
BLOCK = re.compile(r"(<!-- results:([\w./-]+) -->\n)(.*?\n)?(<!-- /results:\2 -->)", re.S)


def rendered(name: str) -> str:
    return RENDERERS[name]() if name in RENDERERS else generic(name)


def render(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + rendered(m.group(2)) + "\n" + m.group(4), text)


def unsourced_problems(texts: dict[str, str] | None = None) -> list[str]:
    """Tables with measured-looking numbers outside markers and not listed in unsourced.toml,
    and listed tables that no longer exist. ``texts``: relative path → text (default: the docs)."""
    from fedfm.reproduce.render import numeric_tables

    listed = tomllib.loads(UNSOURCED.read_text()).get("table", [])
    known = {(t["file"], t["header"]) for t in listed}
    seen, problems = set(), []
    if texts is None:
        texts = {str(doc.relative_to(ROOT)): doc.read_text() for doc in documents()}
    for rel, text in texts.items():
        for line, header in numeric_tables(text):
            seen.add((rel, header))
            if (rel, header) not in known:
                problems.append(f"{rel}:{line}: a table of measured numbers without a results file: {header}")
    problems += [f"{f}: listed in {UNSOURCED.name} but not found: {h}" for f, h in sorted(known - seen)]
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a doc differs from its rendering")
    args = ap.parse_args()
    stale = []
    for doc in documents():
        text = doc.read_text()
        new = render(text)
        if new != text:
            stale.append(doc.name)
            if not args.check:
                doc.write_text(new)
    if args.check and stale:
        print(f"tables differ from their results files: {', '.join(stale)} (python tools/render_results.py)")
        return 1
    problems = unsourced_problems() if args.check else []
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
