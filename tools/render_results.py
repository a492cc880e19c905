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


RENDERERS = {
    "llama-1b": llama_1b,
    "scale-server": scale_server,
    "secagg-large": secagg_large,
    "two-processes": two_processes,
    "full-finetuning": full_finetuning,
}
BLOCK = re.compile(r"(<!-- results:([\w./-]+) -->\n)(.*?\n)?(<!-- /results:\2 -->)", re.S)


def rendered(name: str) -> str:
    return RENDERERS[name]() if name in RENDERERS else generic(name)


def render(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + rendered(m.group(2)) + "\n" + m.group(4), text)


def unsourced_problems() -> list[str]:
    """Tables with measured-looking numbers outside markers and not listed in unsourced.toml,
    and listed tables that no longer exist."""
    from fedfm.reproduce.render import numeric_tables

    listed = tomllib.loads(UNSOURCED.read_text()).get("table", [])
    known = {(t["file"], t["header"]) for t in listed}
    seen, problems = set(), []
    for doc in documents():
        rel = str(doc.relative_to(ROOT))
        for line, header in numeric_tables(doc.read_text()):
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
