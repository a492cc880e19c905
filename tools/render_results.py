"""Render measured tables into the docs from their results files, between markers.

A table lives in a doc between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``; NAME is
a renderer below, which reads its JSON under ``benchmarks/results/``. ``python
tools/render_results.py`` rewrites every marked table; ``--check`` exits 1 when a doc differs
from what its results file renders (``tests/test_docs.py`` runs the check, so a number edited by
hand, or a results file updated without its table, is caught).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"


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


RENDERERS = {"scale-server": scale_server}
BLOCK = re.compile(r"(<!-- results:([\w-]+) -->\n)(.*?\n)?(<!-- /results:\2 -->)", re.S)


def render(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + RENDERERS[m.group(2)]() + "\n" + m.group(4), text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a doc differs from its rendering")
    args = ap.parse_args()
    stale = []
    for doc in sorted(DOCS.glob("*.md")):
        text = doc.read_text()
        new = render(text)
        if new != text:
            stale.append(doc.name)
            if not args.check:
                doc.write_text(new)
    if args.check and stale:
        print(f"tables differ from their results files: {', '.join(stale)} (python tools/render_results.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
