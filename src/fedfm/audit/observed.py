"""What the server sees in the clear per client, and a cheap property attack on it.

Without secure aggregation or DP, every client's record reaches the server: its training loss and
its example count each round (``metrics.jsonl``'s client records). The example count is the
client's data size, exactly. The property attacked here: **is the client's data skewed?** — its
label distribution's normalised entropy below the federation's median (``partition.json``). A
client whose data is mostly one class fits it faster, so the attack scores each client by minus
its mean training loss over the rounds it took part in; AUC over the clients (10 clients give a
coarse AUC: say so when reading it). Under secure aggregation or client-level DP the server
records no per-client loss or count, and the attack is refused with that reason.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from fedfm.audit.scores import auc


def normalised_entropy(counts: list[float]) -> float:
    """H(p) / ln K of a label histogram (0: one class; 1: uniform); 0 for an empty one."""
    c = np.asarray(counts, float)
    total = c.sum()
    if total <= 0 or len(c) < 2:
        return 0.0
    p = c[c > 0] / total
    return float(-(p * np.log(p)).sum() / math.log(len(c)))


def observed_attack(run_dir: Path) -> dict:
    """The property attack on a run folder's client records, with what else they reveal."""
    records = [
        json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]
    clients = [r for r in records if r.get("event") == "client" and "train_loss" in r]
    if not clients:
        return {
            "skipped": "the server recorded no per-client training loss (secure aggregation or DP hides it)"
        }
    partition = json.loads((run_dir / "partition.json").read_text())
    entropy = {
        c["client"]: normalised_entropy(list(c["label_counts"].values())) for c in partition["clients"]
    }
    losses: dict[int, list[float]] = {}
    for r in clients:
        if math.isfinite(r["train_loss"]):
            losses.setdefault(int(r["client"]), []).append(float(r["train_loss"]))
    seen = sorted(k for k in losses if k in entropy)
    if len(seen) < 4:
        return {"skipped": f"only {len(seen)} clients reported a loss: too few to score"}
    median = float(np.median([entropy[k] for k in seen]))
    skewed = [k for k in seen if entropy[k] < median]
    balanced = [k for k in seen if entropy[k] >= median]
    score = {k: -float(np.mean(losses[k])) for k in seen}
    sizes_exact = all(
        int(r["num_examples"])
        == next(c["num_train"] for c in partition["clients"] if c["client"] == r["client"])
        for r in clients
        if "num_examples" in r
    )
    return {
        "rows": [
            {
                "clients": len(seen),
                "skewed": len(skewed),
                "property_auc": auc([score[k] for k in skewed], [score[k] for k in balanced]),
                "data_size_exact": sizes_exact,
            }
        ]
    }
