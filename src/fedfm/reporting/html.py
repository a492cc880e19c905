"""A self-contained HTML report: config, per-round table, plots (inline PNG) and partition.

Later capabilities add sections (privacy budget, bytes sent, generations) through ``SECTIONS``.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable
from pathlib import Path

# Extra sections: functions (history) -> HTML fragment or "" — registered by later features.
SECTIONS: list[Callable[[list[dict]], str]] = []

TABLE_KEYS = [
    ("round", "round"),
    ("clients", "num_clients"),
    ("train loss", "train_loss"),
    ("test loss", "test_loss"),
    ("test accuracy", "test_accuracy"),
    ("test macro-F1", "test_macro_f1"),
    ("test perplexity", "test_perplexity"),
    ("ROUGE-L", "rouge_l"),
    ("reward accuracy", "test_reward_accuracy"),
    ("reward margin", "test_reward_margin"),
    ("client acc mean", "client_accuracy_mean"),
    ("client acc worst 10%", "client_accuracy_worst10"),
    ("attack success", "attack_success_rate"),
    ("ε", "epsilon"),
    ("clip norm", "clip_norm"),
    ("bytes up", "bytes_up"),
    ("bytes down", "bytes_down"),
    ("elapsed (s)", "elapsed_s"),
]

STYLE = """
body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f3f3f3}pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px}
img{max-width:100%;margin:.5em 0}.warn{color:#a60}.wide{overflow-x:auto;max-width:100%}
"""


def human_bytes(n: float) -> str:
    """``812 B``, ``4.3 KB``, ``17.2 MB``, ``1.05 GB`` (decimal units, as links are rated)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:,.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{n:,.0f} B"


def _cell(value, key: str = "") -> str:
    if value is None:
        return "–"
    if "bytes" in key and isinstance(value, int | float):
        return human_bytes(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(Path(path).stem)}" src="data:image/png;base64,{data}">'


def _round_table(history: list[dict]) -> str:
    keys = [(h, k) for h, k in TABLE_KEYS if any(r.get(k) is not None for r in history)]
    head = "".join(f"<th>{h}</th>" for h, _ in keys)
    rows = "".join(
        "<tr>" + "".join(f"<td>{_cell(r.get(k), k)}</td>" for _, k in keys) + "</tr>" for r in history
    )
    return f"<table><tr>{head}</tr>{rows}</table>"


def _problems(history: list[dict]) -> str:
    from fedfm.reporting.problems import problems

    items = [f"<li>round {r['round']}: {html.escape(line)}</li>" for r in history for line in problems(r)]
    return f"<h2>Failed and rejected clients</h2><ul>{''.join(items)}</ul>" if items else ""


def _partition_table(partition: dict) -> str:
    names = partition["label_names"]
    head = "<th>client</th><th>train</th><th>local test</th>" + "".join(
        f"<th>{html.escape(n)}</th>" for n in names
    )
    rows = "".join(
        f"<tr><td>{c['client']}</td><td>{c['num_train']}</td><td>{c['num_local_test']}</td>"
        + "".join(f"<td>{c['label_counts'][n]}</td>" for n in names)
        + "</tr>"
        for c in partition["clients"]
    )
    return f"<div class=wide><table><tr>{head}</tr>{rows}</table></div>"  # many labels: it scrolls


def _mb(n: float) -> str:
    return human_bytes(n)


def communication_section(history: list[dict]) -> str:
    """Total bytes moved, next to what full fine-tuning of the same model would have moved."""
    rounds = [r for r in history if r.get("bytes_up") is not None]
    if not rounds:
        return ""
    last = rounds[-1]
    moved = last["bytes_up_total"] + last["bytes_down_total"]
    full = sum(r["full_finetune_bytes"] for r in rounds)
    return (
        "<h2>Communication</h2><table><tr><th></th><th>upload</th><th>download</th><th>total</th></tr>"
        f"<tr><td>this run</td><td>{_mb(last['bytes_up_total'])}</td><td>{_mb(last['bytes_down_total'])}</td>"
        f"<td>{_mb(moved)}</td></tr><tr><td>full fine-tuning, same cohorts</td><td>{_mb(full / 2)}</td>"
        f"<td>{_mb(full / 2)}</td><td>{_mb(full)}</td></tr></table>"
        f"<p>{full / max(moved, 1):,.0f}× less than sending every weight both ways.</p>"
    )


SECTIONS.append(communication_section)


def _epsilon(value: float | None) -> str:
    return "∞" if value is None else f"{value:.3f}"  # metrics.jsonl stores a non-finite ε as null


def privacy_section(history: list[dict]) -> str:
    """Which guarantee the run has, the (ε, δ) it ended with, and secure aggregation's cost."""
    from fedfm.privacy.guarantees import GUARANTEES, MECHANISMS, SEEDED

    rounds = [r for r in history if r.get("round", 0) > 0]
    dp = next((r for r in reversed(history) if r.get("dp")), None)
    kind = dp.get("dp", "client") if dp else "none"
    parts = [f"<h2>Privacy</h2><p>Differential privacy — {html.escape(GUARANTEES[kind])}.</p>"]
    if dp:
        parts.append(
            f"<p>After round {dp['round']}: <b>ε = {_epsilon(dp['epsilon'])}</b> at δ = {dp['delta']:g} "
            f"(noise multiplier {dp['noise_multiplier']:.4f}, clip norm {dp['clip_norm']:.4g}"
            + (f"; {html.escape(MECHANISMS[dp['mechanism']])}" if dp.get("mechanism") in MECHANISMS else "")
            + ").</p>"
        )
        if dp.get("noise") == "seeded":
            parts.append(f"<p class='warning'><b>Warning:</b> {html.escape(SEEDED)}.</p>")
    if any(r.get("unbounded") for r in rounds):
        from fedfm.transforms.validation import UNBOUNDED_WARNING

        parts.append(f"<p class='warning'><b>Warning:</b> {html.escape(UNBOUNDED_WARNING)}.</p>")
    secure = [r["secagg"] for r in rounds if r.get("secagg")]
    if secure:
        up = sum(s["bytes_up"] for s in secure) / len(secure)
        down = sum(s["bytes_down"] for s in secure) / len(secure)
        server = sum(s["server_s"] for s in secure) / len(secure)
        parts.append(
            f"<p>Secure aggregation (the server saw only sums): per round {_mb(up)} up, {_mb(down)} "
            f"down, {server:.2f} s of unmasking at the server; {secure[-1]['field_bits']}-bit field.</p>"
        )
    elif rounds:
        parts.append("<p>Secure aggregation: off (the server saw each client's update).</p>")
    return "".join(parts)


SECTIONS.append(privacy_section)


BY_GROUP = {
    "test_perplexity_by_group": "perplexity",
    "test_reward_accuracy_by_group": "reward accuracy",
    "test_reward_margin_by_group": "reward margin",
}


def generations_section(history: list[dict]) -> str:
    """Instruction tuning and preference alignment: the per-group metric (perplexity, reward
    accuracy) first vs last, and the greedy answers per round."""
    parts = []
    for key, name in BY_GROUP.items():
        evaluated = [r for r in history if r.get(key)]
        if not evaluated:
            continue
        first, last = evaluated[0], evaluated[-1]
        rows = "".join(
            f"<tr><td>{html.escape(g)}</td><td>{_cell(first[key].get(g))}</td><td>{_cell(p)}</td></tr>"
            for g, p in last[key].items()
        )
        parts.append(
            f"<h2>Held-out {name} per client group</h2><table><tr><th>group</th><th>round "
            f"{first['round']}</th><th>round {last['round']}</th></tr>{rows}</table>"
        )
    answered = [r for r in history if r.get("generations")]
    if answered:
        parts.append("<h2>Answers to fixed prompts (greedy), by round</h2>")
        for j, g in enumerate(answered[0]["generations"]):
            ref = f"<br><i>reference:</i> {html.escape(g['reference'])}" if g.get("reference") else ""
            rows = "".join(
                f"<tr><td>{r['round']}</td><td style='text-align:left'>"
                f"{html.escape(r['generations'][j]['answer'])}</td></tr>"
                for r in answered
                if j < len(r["generations"])
            )
            parts.append(
                f"<p><b>prompt:</b> {html.escape(g['prompt'])}{ref}</p>"
                f"<table><tr><th>round</th><th>answer</th></tr>{rows}</table>"
            )
    return "".join(parts)


SECTIONS.append(generations_section)


def personalization_section(history: list[dict]) -> str:
    """Each client scored on its own test split: the global model's and its personal model's
    mean, standard deviation and worst-10% mean per evaluated round."""
    key = next(
        (k for r in history for k in r if k.startswith("personal_local_") and k.endswith("_mean")), None
    )
    if key is None:
        return ""
    metric = key[len("personal_local_") : -len("_mean")]
    rows = "".join(
        f"<tr><td>{r['round']}</td>"
        + "".join(
            f"<td>{_cell(r.get(f'{who}_local_{metric}_{s}'))}</td>"
            for who in ("global", "personal")
            for s in ("mean", "std", "worst10")
        )
        + "</tr>"
        for r in history
        if key in r
    )
    head = "".join(
        f"<th>{who} {s}</th>" for who in ("global", "personal") for s in ("mean", "std", "worst 10%")
    )
    return (
        f"<h2>Personalization: every client on its own test split ({metric.replace('_', ' ')})</h2>"
        f"<table><tr><th>round</th>{head}</tr>{rows}</table>"
    )


SECTIONS.append(personalization_section)


def _count(n: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:,.2f} {prefix}{unit}"
    return f"{n:,.0f} {unit}"


def _held(sharing: dict) -> str:
    client, server = sharing["client_params"], sharing["server_params"]
    if "cut_layer" in sharing:  # split: the server holds the rest of one model
        return (
            f", the server the other {server:,} ({client / (client + server):.0%} of the model on the client)"
        )
    return f", the server's FM {server:,} ({client / server:.0%})"


def _sharing_text(sharing: dict) -> str:
    mode = html.escape(str(sharing.get("mode")))
    if "client_models" in sharing:  # knowledge transfer: small models of their own
        models = ", ".join(
            f"{html.escape(str(m['name']))}"
            + (f" (layers {m['layers']})" if m.get("layers") else "")
            + f": {m['params']:,}"
            for m in sharing["client_models"]
        )
        return (
            f"<p>Computation sharing: <b>transfer</b>. Client models {models} parameters; the FM "
            f"{sharing['server_params']:,}. Only logits on {sharing['transfer_examples']} transfer texts "
            "travel, each way.</p>"
        )
    text = f"<p>Computation sharing: <b>{mode}</b>. Clients hold {sharing['client_params']:,} parameters"
    if sharing.get("server_params"):
        text += _held(sharing)
    text += "."
    if "emulator_layers" in sharing:
        text += (
            f" Emulator layers {sharing['emulator_layers']} of the FM's {sharing['fm_layers']}; "
            f"clients tune layers {sharing['adapter_layers']}."
        )
    if "cut_layer" in sharing:
        text += f" The cut is after layer {sharing['cut_layer'] - 1}"
        text += " and before the head (U-shaped)" if sharing.get("u_shaped") else ""
        text += f"; {sharing['activation_bits']}-bit messages."
    return text + "</p>"


def computation_section(history: list[dict], sharing: dict | None) -> str:
    """What clients hold and spend: the sharing mode's model sizes, and counted costs per round."""
    parts = [_sharing_text(sharing)] if sharing else []
    counted = [r for r in history if r.get("client_flops_mean") is not None]
    if counted:
        rows = "".join(
            f"<tr><td>{r['round']}</td><td>{_count(r['client_flops_mean'], 'FLOP')}</td>"
            f"<td>{_count(r['client_peak_memory_bytes'], 'B')}</td></tr>"
            for r in counted
        )
        parts.append(
            "<p>Counted during local training (training.count_costs): FLOPs per client (mean over the "
            "cohort) and the largest client's peak memory.</p><table><tr><th>round</th><th>FLOPs per "
            f"client</th><th>peak memory</th></tr>{rows}</table>"
        )
    final = next((r for r in reversed(history) if "emulator_test_accuracy" in r), None)
    if final:
        parts.append(
            f"<p>Round {final['round']}: the FM with the clients' adapter plugged in scores "
            f"{final['test_accuracy']:.4f}; the emulator the clients trained on, "
            f"{final['emulator_test_accuracy']:.4f}.</p>"
        )
    clients = next((r for r in reversed(history) if "client_test_accuracy_mean" in r), None)
    if clients:
        parts.append(
            f"<p>Round {clients['round']}: the FM scores {clients['test_accuracy']:.4f}; the clients' own "
            f"models {clients['client_test_accuracy_mean']:.4f} on average (worst "
            f"{clients['client_test_accuracy_min']:.4f}).</p>"
        )
    return "<h2>Computation</h2>" + "".join(parts) if parts else ""


HEADLINES = (  # the first metric a run has is its headline
    ("test_accuracy", "final test accuracy", "{:.4f}"),
    ("test_perplexity", "final held-out perplexity", "{:.2f}"),
    ("test_reward_accuracy", "final held-out reward accuracy", "{:.4f}"),
)


def _headline(history: list[dict], partition: dict | None) -> str:
    for key, label, fmt in HEADLINES:
        final = next((r for r in reversed(history) if r.get(key) is not None), None)
        if final is None:
            continue
        text = f"<p><b>{label} {fmt.format(final[key])}</b> after round {final['round']} "
        text += f"({final.get('elapsed_s', 0):.0f} s)"
        counts = (partition or {}).get("test_label_counts") or {}
        if key == "test_accuracy" and sum(counts.values()):
            top = max(counts, key=counts.get)
            share = counts[top] / sum(counts.values())
            text += f"; the majority-class baseline (always {html.escape(str(top))!r}) scores {share:.4f}"
        first = next((r for r in history if r.get(key) is not None), None)
        if key == "test_perplexity" and first is not None and first is not final:
            text += f", from {fmt.format(first[key])} at round {first['round']}"
        return text + "</p>"
    return ""


def render_report(
    title: str, config_text: str, history: list[dict], partition: dict | None, plots, extra=(), samples=None
) -> str:
    headline = _headline(history, partition)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>fedfm: {html.escape(title)}</title>",
        f"<style>{STYLE}</style></head><body><h1>fedfm run: {html.escape(title)}</h1>{headline}",
        "<h2>Rounds</h2>",
        _round_table(history),
        "<h2>Plots</h2>",
        *(_img(p) for p in plots),
        _problems(history),
    ]
    parts += [section(history) for section in SECTIONS]
    parts += list(extra)
    if partition:
        parts += [
            f"<h2>Partition</h2><p>{partition['num_clients']} clients, {partition['method']}; "
            f"{partition['num_train']} training and {partition['num_test']} server test examples.</p>",
            _partition_table(partition),
        ]
        if samples is not None:  # image tasks: a few training images of each client
            parts += ["<h3>Sample images per client</h3>", _img(samples)]
    parts += [f"<h2>Configuration</h2><pre>{html.escape(config_text)}</pre></body></html>"]
    return "\n".join(parts)
