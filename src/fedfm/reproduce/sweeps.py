"""A sweep's cells as measurements: the cells that differ only in ``run.seed`` form one group
(a table row); each group's final and best metric, the metric at round 0, the bytes moved, the
wall time, and any other metric the entry names (its last value in the run, see
``fedfm.reporting.sweep.final_values``), one value per seed."""

from __future__ import annotations

from fedfm.reproduce.results import Measurement


def metric_kind(metric: str) -> str:
    """How a metric is judged, from its name: FLOPs, weights and peak memory as
    ``training.count_costs`` counts them (from tensor shapes, so exact on any machine), bytes
    exact, quality metrics against the committed interval."""
    if any(word in metric for word in ("flops", "memory", "weights", "cut_bytes")):
        return "count"
    if "bytes" in metric:
        return "bytes"
    if "accuracy" in metric:
        return "accuracy"
    if "perplexity" in metric:
        return "perplexity"
    if "loss" in metric:
        return "loss"
    return "score"


def sweep_measurements(
    rows: list[dict], axes: list[str], metric: str, metrics: list[str] = ()
) -> list[Measurement]:
    """``rows``: the sweep's ``cell.json`` rows; ``axes``: its swept fields (``run.seed`` among
    them); ``metric``: the sweep's metric; ``metrics``: more of each cell's final values (a cell
    without one leaves that measurement out of its group)."""
    kind = metric_kind(metric)
    keys = [a for a in axes if a != "run.seed"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(str(r.get(a)) for a in keys), []).append(r)
    found = []
    for key, cells in groups.items():
        group = dict(zip(keys, key, strict=True))
        cells = sorted(cells, key=lambda r: int(r.get("run.seed", 0)))
        seeds = [int(r.get("run.seed", 0)) for r in cells]

        def add(name, k, values, group=group, seeds=seeds):
            if all(v is not None for v in values):
                found.append(Measurement(name, k, [float(v) for v in values], seeds, group))

        add(f"final {metric}", kind, [r["final"] for r in cells])
        add(f"best {metric}", kind, [r["best"] for r in cells])
        add(f"round 0 {metric}", kind, [_round0(r) for r in cells])
        add("bytes moved", "bytes", [r.get("bytes") for r in cells])
        add("wall seconds", "seconds", [r.get("wall_s") for r in cells])
        for name in metrics:
            add(name, metric_kind(name), [(r.get("last") or {}).get(name, r.get(name)) for r in cells])
    return found


def _round0(row: dict) -> float | None:
    curve = row.get("curve") or []
    return next((v for t, v in curve if int(t) == 0), None)
