"""The two baselines that say whether federation is worth it, trained after a run on its data.

* **local-only**: every client fine-tunes alone from the same starting point, for as many steps
  as it would take if it joined every round (rounds × its local steps), and is evaluated on its
  own held-out data and on all held-out data.
* **centralized**: the clients' data pooled, trained for as many steps as the federation took in
  total (Σ over rounds of the cohort's local steps), evaluated the same way.

A client's *own* held-out data is the server test rows of the groups it trains on (its category
in a natural partition, its classes otherwise). Both baselines use the run's client training
code (same optimizer, batch size, learning rate, seeds derived from the run seed) with the plain
objective; the federated row is the run's final global model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedfm.client.program import num_local_steps, train_from
from fedfm.models.state import set_trainable_state
from fedfm.reporting.tables import baselines_markdown as markdown
from fedfm.server.parts import RunParts
from fedfm.types import Params


def own_test_rows(parts: RunParts, client: int) -> np.ndarray:
    groups = np.unique(parts.data.train.labels[parts.data.client_train[client]])
    return np.flatnonzero(np.isin(parts.data.test.labels, groups))


def _scores(parts: RunParts, params: Params, rows) -> dict:
    set_trainable_state(parts.bundle.trainable, params)
    m = parts.task.evaluate(
        parts.bundle.model, parts.task.test, rows, parts.cfg.eval.batch_size, parts.bundle.device
    )
    return {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}


def _train(parts: RunParts, rows: np.ndarray, steps: int, key: int, start: Params) -> Params:
    cfg = parts.cfg
    return train_from(parts.bundle, parts.task, rows, start, steps, cfg.training, cfg.run.seed, key)[0]


def _mean(rows: list[dict]) -> dict:
    keys = rows[0].keys() if rows else []
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}


def run_baselines(parts: RunParts, final: Params, progress=None) -> dict:
    cfg, data = parts.cfg, parts.data
    start = parts.initial_params
    steps = [num_local_steps(len(rows), cfg.training) for rows in data.client_train]
    rounds = cfg.run.rounds
    total = sum(steps[k] for t in range(1, rounds + 1) for k in parts.sample(t))
    clients = range(data.num_clients)
    note = progress or (lambda text: None)

    def row(params_of, kind: str) -> dict:
        own = [_scores(parts, params_of(k), own_test_rows(parts, k)) for k in clients]
        all_data = [_scores(parts, params_of(k), None) for k in clients] if kind == "local-only" else None
        return {
            "setting": kind,
            "all_held_out": _mean(all_data) if all_data else _scores(parts, params_of(0), None),
            "own_held_out_mean": _mean(own),
            "own_held_out_worst": max(own, key=lambda r: r["loss"]),
        }

    note("baselines: evaluating the federated global model")
    results = [row(lambda k: final, "federated")]
    note(f"baselines: local-only, {data.num_clients} clients × {rounds} rounds of local steps each")
    from fedfm.reporting.console import Eta

    eta, local = Eta(len(clients)), {}
    for i, k in enumerate(clients):
        local[k] = _train(parts, data.client_train[k], rounds * steps[k], k, start)
        eta.step(i + 1)
        if len(clients) > 1 and i + 1 < len(clients):
            note(f"baselines: local-only, {i + 1}/{len(clients)} clients trained (ETA {eta.left()})")
    results.append(row(lambda k: local[k], "local-only"))
    note(f"baselines: centralized, {total} steps on the pooled data")
    pooled = np.sort(np.concatenate(data.client_train))
    central = _train(parts, pooled, total, -1, start)
    results.append(row(lambda k: central, "centralized"))
    return {"rounds": rounds, "federated_total_steps": total, "local_steps": steps, "rows": results}


def write_baselines(run_dir: Path, baselines: dict) -> None:
    (run_dir / "baselines.json").write_text(json.dumps(baselines, indent=1))
    (run_dir / "baselines.md").write_text(markdown(baselines) + "\n")
