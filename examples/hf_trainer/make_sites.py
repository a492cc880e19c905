"""Write each site's data for the examples: siteK.csv (text,label) from the packaged BBC News
corpus, or with ``--kind chat`` chatK.jsonl (instruction/response) from the chatterbot corpus.

Usage: ``python examples/hf_trainer/make_sites.py --sites 2 --per-site 150`` (add
``--kind chat`` for the SFT example).
"""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np

from fedfm.data.sources import bbc_news, package_folder


def chat_pairs() -> list[dict]:
    """Every chatterbot turn paired with the next (English), as fedfm's own loader pairs them."""
    import yaml

    root = package_folder("chatterbot_corpus", extra="llm") / "data" / "english"
    pairs = []
    for path in sorted(root.glob("*.yml")):
        for conversation in (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get(
            "conversations"
        ) or []:
            turns = [str(t).strip() for t in conversation if t is not None]
            pairs += [
                {"instruction": a, "response": b} for a, b in zip(turns, turns[1:], strict=False) if a and b
            ]
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--per-site", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kind", choices=["classify", "chat"], default="classify")
    args = ap.parse_args()
    if args.kind == "chat":
        pairs = chat_pairs()
        order = np.random.default_rng(args.seed).permutation(len(pairs))
        for k in range(args.sites):
            rows = order[k * args.per_site : (k + 1) * args.per_site]
            with open(f"chat{k}.jsonl", "w") as fh:
                fh.writelines(json.dumps(pairs[i]) + "\n" for i in rows)
            print(f"chat{k}.jsonl: {len(rows)} pairs")
        return
    data, _ = bbc_news(None)
    order = np.random.default_rng(args.seed).permutation(len(data.texts))
    for k in range(args.sites):
        rows = order[k * args.per_site : (k + 1) * args.per_site]
        with open(f"site{k}.csv", "w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(["text", "label"])
            out.writerows([data.texts[i][:2000], data.label_names[data.labels[i]]] for i in rows)
        print(f"site{k}.csv: {len(rows)} rows")


if __name__ == "__main__":
    main()
