"""Grids of experiments: one run folder per cell, resumable, summarised as CSV, markdown and plots.

A sweep file is TOML::

    [sweep]
    name = "init-vs-noniid"
    base = "default.toml"          # the experiment every cell starts from (relative to this file)
    metric = "test_accuracy"       # what the tables and plots compare
    target = 0.85                  # optional: rounds to reach this value of the metric
    set = { "run.rounds" = 5 }     # optional: fixed overrides for every cell

    [sweep.grid]                   # the Cartesian product of these fields
    "partition.alpha" = [0.1, 0.5, 100.0]

    [sweep.variants.pretrained-lora]   # optional: named bundles of fields, one more axis
    "model.init" = "pretrained"
    [sweep.variants.random-full]
    "model.init" = "random"
    "peft.method" = "full"

Variants exist because some comparisons only make sense with several fields moving together
(a randomly initialised backbone must train every weight). Every cell's resolved config is
validated before the first cell runs, so a typo fails at once and names the field.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedfm.config import ConfigError, RunConfig, load_config


@dataclass(frozen=True)
class Cell:
    """One experiment of a sweep: its folder name, the swept values, and the overrides that make it."""

    name: str
    values: dict[str, Any]
    overrides: list[str]


@dataclass(frozen=True)
class SweepSpec:
    name: str
    base: Path | None
    metric: str = "test_accuracy"
    target: float | None = None
    fixed: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def axes(self) -> list[str]:
        return [*self.grid, *(["variant"] if self.variants else [])]


def _override(key: str, value: Any) -> str:
    """A ``--set`` string whose value parses back to the same TOML value."""
    import tomli_w

    return f"{key}={tomli_w.dumps({'v': value})[4:].strip()}"


def _slug(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(value)).strip("-") or "x"


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a sweep file; errors name the offending key."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"sweep file {path} not found") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from None
    s = raw.get("sweep")
    if not isinstance(s, dict):
        raise ConfigError(f"{path}: needs a [sweep] table")
    unknown = set(s) - {"name", "base", "metric", "target", "set", "grid", "variants"}
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key(s) {sorted(unknown)}")
    grid = s.get("grid", {})
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: sweep.grid.{key} must be a non-empty list of values")
    variants = s.get("variants", {})
    for name, fields in variants.items():
        if not isinstance(fields, dict):
            raise ConfigError(f"{path}: sweep.variants.{name} must be a table of config fields")
    if not grid and not variants:
        raise ConfigError(f"{path}: the sweep has no [sweep.grid] and no [sweep.variants]")
    base = s.get("base")
    return SweepSpec(
        name=s.get("name", path.stem),
        base=(path.parent / base) if base else None,
        metric=s.get("metric", "test_accuracy"),
        target=s.get("target"),
        fixed=dict(s.get("set", {})),
        grid=dict(grid),
        variants=dict(variants),
    )


def expand(spec: SweepSpec) -> list[Cell]:
    """The cells of a sweep: grid product (in file order) × variants, each named by its values."""
    keys = list(spec.grid)
    variants = list(spec.variants.items()) or [(None, {})]
    cells = []
    for combo in itertools.product(*(spec.grid[k] for k in keys)):
        for variant, fields in variants:
            values = dict(zip(keys, combo, strict=True))
            overrides = [_override(k, v) for k, v in spec.fixed.items()]
            overrides += [_override(k, v) for k, v in values.items()]
            overrides += [_override(k, v) for k, v in fields.items()]
            parts = [f"{k.rsplit('.', 1)[-1]}={_slug(v)}" for k, v in values.items()]
            if variant is not None:
                values["variant"] = variant
                parts.append(_slug(variant))
            cells.append(Cell("__".join(parts), values, overrides))
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise ConfigError("two sweep cells share a name: grid values must differ after slugging")
    return cells


def check_cells(spec: SweepSpec, cells: list[Cell]) -> dict[str, RunConfig]:
    """Resolve every cell's config before any work; a bad cell names itself and the field."""
    configs = {}
    for cell in cells:
        try:
            configs[cell.name] = load_config(spec.base, cell.overrides)
        except ConfigError as err:
            raise ConfigError(f"sweep cell {cell.name}: {err}") from None
    return configs


def rounds_to_target(history: list[dict], metric: str, target: float | None) -> int | None:
    """The first round whose ``metric`` reaches ``target`` (lower is better for loss and perplexity)."""
    if target is None:
        return None
    lower = lower_is_better(metric)
    for r in history:
        v = r.get(metric)
        if v is not None and (v <= target if lower else v >= target):
            return int(r["round"])
    return None


def lower_is_better(metric: str) -> bool:
    return any(word in metric for word in ("loss", "perplexity"))


def cell_summary(cell: Cell, cfg: RunConfig, history: list[dict], spec: SweepSpec, extra: dict) -> dict:
    """One summary row: the swept values, what trained, and the metric at the end, best and to target."""
    curve = [(int(r["round"]), r[spec.metric]) for r in history if r.get(spec.metric) is not None]
    values = [v for _, v in curve]
    best = (min if lower_is_better(spec.metric) else max)(values) if values else None
    return {
        "cell": cell.name,
        **cell.values,
        "model.init": cfg.model.init,
        "peft.method": cfg.peft.method,
        "final": values[-1] if values else None,
        "best": best,
        "rounds_to_target": rounds_to_target(history, spec.metric, spec.target),
        "rounds": cfg.run.rounds,
        "curve": curve,
        **extra,
    }


def bytes_moved(history: list[dict]) -> int | None:
    """Upload + download over the whole run (the last round's running totals)."""
    last = next((r for r in reversed(history) if "bytes_up_total" in r), None)
    return None if last is None else int(last["bytes_up_total"] + last.get("bytes_down_total", 0))


def counted_costs(history: list[dict]) -> dict:
    """With ``training.count_costs``: a client's mean FLOPs per round, the largest peak memory and
    weights held, the server's mean FLOPs per round for a client's part (split learning), and the
    bytes that crossed the cut over the run."""
    rounds = [r for r in history if r.get("client_flops_mean") is not None]
    if not rounds:
        return {}
    costs = {
        "client_flops": sum(r["client_flops_mean"] for r in rounds) / len(rounds),
        "client_memory": max(r["client_peak_memory_bytes"] for r in rounds),
    }
    if all("client_weights_bytes_max" in r for r in rounds):
        costs["client_weights"] = max(r["client_weights_bytes_max"] for r in rounds)
    if all("server_flops_mean" in r for r in rounds):
        costs["server_flops"] = sum(r["server_flops_mean"] for r in rounds) / len(rounds)
    cut = [r["cut_bytes_up"] + r.get("cut_bytes_down", 0) for r in history if "cut_bytes_up" in r]
    if cut:
        costs["cut_bytes"] = int(sum(cut))
    return costs


def final_values(history: list[dict], run_dir: Path | None = None) -> dict[str, float]:
    """Every numeric metric's last recorded value over the run's rounds, with the scores of local
    fine-tuning after FL (``{"event": "personalization"}`` in ``metrics.jsonl``) where there are
    some: what a results table may quote beyond the sweep's own metric."""
    skip = {"round", "elapsed_s", "time"}
    rows = list(history)
    path = None if run_dir is None else Path(run_dir) / "metrics.jsonl"
    if path is not None and path.is_file():
        events = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
        rows += [
            {k: v for k, v in e.items() if k.startswith("finetuned_")}
            for e in events
            if e.get("event") == "personalization"
        ]
    last: dict[str, float] = {}
    for r in rows:
        for k, v in r.items():
            if k not in skip and isinstance(v, int | float) and not isinstance(v, bool):
                last[k] = float(v)
    return last


def wall_time(history: list[dict]) -> float:
    return max((r.get("elapsed_s") or 0.0 for r in history), default=0.0)


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def markdown_table(spec: SweepSpec, rows: list[dict]) -> str:
    """The comparison table; it names what trains in each cell so like is compared with like."""
    target = f"rounds to {spec.target:g}" if spec.target is not None else None
    head = [*spec.axes, "init", "trains", "trainable", f"final {spec.metric}", "best"]
    head += [*([target] if target else []), "wall s"]
    costs = any(r.get("client_flops") is not None for r in rows)
    if costs:
        head += ["client GFLOPs / round", "client peak MB", "MB moved"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cols = [str(r.get(a)) for a in spec.axes] + [r["model.init"], r["peft.method"]]
        cols.append(f"{r['trainable']:,}" if r.get("trainable") else "—")
        cols += [_fmt(r["final"]), _fmt(r["best"])]
        if target:
            cols.append(_fmt(r["rounds_to_target"]) if r["rounds_to_target"] is not None else "not reached")
        cols.append(f"{r['wall_s']:.0f}" if r.get("wall_s") is not None else "—")
        if costs:
            flops, memory, moved = r.get("client_flops"), r.get("client_memory"), r.get("bytes")
            cols.append(f"{flops / 1e9:,.1f}" if flops is not None else "—")
            cols.append(f"{memory / 1e6:,.1f}" if memory is not None else "—")
            cols.append(f"{moved / 1e6:,.1f}" if moved is not None else "—")
        lines.append("| " + " | ".join(cols) + " |")
    methods = sorted({(r["model.init"], r["peft.method"]) for r in rows})
    if len(methods) > 1:
        lines.append(
            "\nCells differ in what trains ("
            + "; ".join(f"{i} init trains {m}" for i, m in methods)
            + "): compare cells with the same 'trains' for the effect of initialisation alone."
        )
    return "\n".join(lines)


def _mean_std(values: list[float]) -> str:
    import statistics

    if not values:
        return "—"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {std:.3f}"


def seed_table(spec: SweepSpec, rows: list[dict], out: Path | None = None) -> str:
    """Cells that differ only in ``run.seed``, summarised: mean ± sample std of the final and
    best metric, rounds to target (mean over the seeds that reached it, and how many did), and
    bytes moved (read from the cell's metrics.jsonl when its row predates the field)."""
    axes = [a for a in spec.axes if a != "run.seed"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(str(r.get(a)) for a in axes), []).append(r)
    target = f"rounds to {spec.target:g}" if spec.target is not None else None
    head = [*axes, "seeds", f"final {spec.metric}", "best", *([target] if target else []), "MB moved"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for key, group in groups.items():
        cols = [*key, str(len(group)), _mean_std([r["final"] for r in group if r["final"] is not None])]
        cols.append(_mean_std([r["best"] for r in group if r["best"] is not None]))
        if target:
            reached = [r["rounds_to_target"] for r in group if r["rounds_to_target"] is not None]
            mean = f"{sum(reached) / len(reached):.1f}" if reached else "—"
            cols.append(f"{mean} ({len(reached)}/{len(group)} reached)")
        moved = [b for b in (_row_bytes(r, out) for r in group) if b is not None]
        cols.append(f"{sum(moved) / len(moved) / 1e6:.2f}" if moved else "—")
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def _row_bytes(row: dict, out: Path | None) -> int | None:
    if row.get("bytes") is not None or out is None:
        return row.get("bytes")
    path = out / row["cell"] / "metrics.jsonl"
    if not path.is_file():
        return None
    from fedfm.reporting.metrics import read_jsonl

    return bytes_moved([r for r in read_jsonl(path) if r.get("event") == "round"])


def write_summary(out: Path, spec: SweepSpec, rows: list[dict]) -> None:
    """summary.csv (one row per cell, no curves), summary.md, the two plots, and with several
    ``run.seed`` values summary-seeds.md (mean ± std over seeds)."""
    flat = [{k: v for k, v in r.items() if k not in ("curve", "last")} for r in rows]
    keys = list(dict.fromkeys(k for r in flat for k in r))
    with (out / "summary.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(flat)
    (out / "summary.md").write_text(f"# sweep {spec.name}\n\n{markdown_table(spec, rows)}\n")
    if len(spec.grid.get("run.seed", [])) > 1:
        (out / "summary-seeds.md").write_text(
            f"# sweep {spec.name}: over seeds\n\n{seed_table(spec, rows, out)}\n"
        )
    plot_curves(spec, rows, out / "curves.png")
    numeric = [a for a in spec.grid if all(isinstance(v, (int, float)) for v in spec.grid[a])]
    if numeric:
        plot_final_against(spec, rows, numeric[0], out / f"final-vs-{numeric[0]}.png")


def _finish(fig, ax, xlabel: str, ylabel: str, legend_size: int, path: Path) -> Path:
    from fedfm.reporting.plots import pyplot

    plt = pyplot()

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_curves(spec: SweepSpec, rows: list[dict], path: Path) -> Path:
    from fedfm.reporting.plots import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for r in rows:
        if r["curve"]:
            x, y = zip(*r["curve"], strict=True)
            ax.plot(x, y, marker=".", label=r["cell"])
    if spec.target is not None:
        ax.axhline(spec.target, color="grey", linestyle=":", label=f"target {spec.target:g}")
    return _finish(fig, ax, "round", spec.metric, 6, path)


def plot_final_against(spec: SweepSpec, rows: list[dict], axis: str, path: Path) -> Path:
    """Final metric against one numeric swept field, one line per combination of the other axes."""
    from fedfm.reporting.plots import pyplot

    plt = pyplot()

    others = [a for a in spec.axes if a != axis]
    lines: dict[tuple, list[tuple[float, float]]] = {}
    for r in rows:
        if r["final"] is not None:
            lines.setdefault(tuple(r.get(a) for a in others), []).append((r[axis], r["final"]))
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=100)
    for key, pts in lines.items():
        x, y = zip(*sorted(pts), strict=True)
        label = ", ".join(f"{a}={v}" for a, v in zip(others, key, strict=True)) or spec.metric
        ax.plot(x, y, marker="o", label=label)
    xs = [float(v) for v in spec.grid[axis]]
    if min(xs) > 0 and max(xs) / min(xs) >= 20:
        ax.set_xscale("log")
    return _finish(fig, ax, axis, f"final {spec.metric}", 7, path)


def summary_rows(out: str | Path) -> list[dict]:
    """The finished cells of a sweep folder (for notebooks and docs)."""
    return [json.loads(p.read_text()) for p in sorted(Path(out).glob("*/cell.json"))]


__all__ = [
    "Cell",
    "SweepSpec",
    "cell_summary",
    "expand",
    "final_values",
    "load_sweep",
    "markdown_table",
    "rounds_to_target",
    "summary_rows",
]
