"""Run the chosen attacks on a run folder or a config, within a time budget, and write the results.

On a **run folder** the attacks use its config and its checkpoint: the global model of its last
round is the model the inversion's victim starts from (a round ≥ 2 state, so LoRA's B ≠ 0) and
the final model membership inference attacks; ``audit.json`` and ``audit.md`` land in the folder
and its report gains an audit section. On a **config** the model the victim starts from is the
state after one client's round-1 training; membership inference needs the final model, so it runs
the experiment first (into the output folder; its cost is the run's). ``--budget`` (minutes):
before each attack its cost is estimated from a measured probe (one client's local training, one
chunk of the vocabulary sweep) and the attack is skipped, with the reason, when it would not fit.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedfm.audit import AUDITS
from fedfm.types import Params

AUDIT_JSON, AUDIT_MD = "audit.json", "audit.md"


@dataclass
class AuditContext:
    """The built run an attack works on, and what it may need."""

    cfg: object
    data: object
    bundle: object
    task: object
    start: Params  # the model the run began from
    final: Params | None  # the run's last global model (a run folder), else None until trained
    seed: int
    note: object = print
    run_dir: Path | None = None
    trained_dir: Path | None = None  # a config's run, trained by the audit (membership, observed)
    _warm: Params | None = field(default=None, repr=False)
    _train_s: float | None = field(default=None, repr=False)

    @property
    def attacked_state(self) -> Params:
        """What the victim starts from: the run's last global model, or after one warm-up round."""
        if self.final is not None:
            return self.final
        if self._warm is None:
            from fedfm.audit.inversion import warm_start

            self._warm = warm_start(self.bundle, self.task, self.data, self.cfg, self.seed)
        return self._warm

    def reference_task(self):
        """The task over the server's test split as training data (membership's reference model)."""
        from fedfm.tasks import task_kind
        from fedfm.tasks.setup import FederatedData

        d = self.data
        swapped = FederatedData(d.test, d.test, [], [])
        return task_kind(self.cfg).build(self.cfg, swapped, self.bundle)

    def client_train_s(self) -> float:
        """Seconds one client's local training takes on this config (measured once)."""
        if self._train_s is None:
            from fedfm.audit.inversion import train_client

            t = time.perf_counter()
            rows = self.data.client_train[0]
            train_client(
                self.bundle, self.task, 0, rows, self.start, self.cfg.training, self.seed, best=False
            )
            self._train_s = time.perf_counter() - t
        return self._train_s


def estimate_s(name: str, ctx: AuditContext, options) -> float:
    """A cost estimate for attack ``name`` with ``options`` on ``ctx`` (seconds)."""
    from fedfm.algorithms.sampling import cohort_size

    cfg = ctx.cfg
    cohort = cohort_size(ctx.data.num_clients, cfg.sampling.clients_per_round, cfg.sampling.fraction)
    run_s = 0.0 if ctx.final is not None else cfg.run.rounds * cohort * ctx.client_train_s()
    if name == "inversion":
        sweep = _sweep_probe_s(ctx) * math.ceil(len(ctx.bundle.tokenizer) / 256)
        return 4 * sweep + ctx.client_train_s() * 2 + 0.1 * options.clients
    if name == "canaries":
        return 2e-10 * cfg.run.rounds * options.canaries * min(ctx.bundle.num_trainable(), 65_536) + 1.0
    if name == "observed":
        return run_s
    if name == "membership":
        step = ctx.client_train_s() / max(1, cfg.training.steps_for(len(ctx.data.client_train[0])))
        return run_s + step * (options.reference_steps + 4 * options.limit / cfg.training.batch_size)
    return 0.0


def _sweep_probe_s(ctx: AuditContext) -> float:
    """Seconds for one 256-token chunk of the vocabulary sweep at the run's length."""
    import torch

    from fedfm.audit.dager import inputs_at, linears_in_call_order

    probe = ctx.task.batch(ctx.task.train, ctx.data.client_train[0][:1], ctx.bundle.device)
    inputs = {k: v for k, v in probe.items() if k in ("input_ids", "attention_mask")}
    linears = linears_in_call_order(ctx.bundle.model, ctx.bundle.trainable, inputs)
    if not linears:
        return 0.0
    ids = torch.zeros((256, ctx.cfg.model.max_length), dtype=torch.long, device=ctx.bundle.device)
    t = time.perf_counter()
    inputs_at(ctx.bundle.model, linears[0][1], {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return (time.perf_counter() - t) * 3  # the span test and bookkeeping beside the forward


def parse_options(names: list[str], settings: list[str]) -> dict:
    """``NAME.FIELD=VALUE`` settings → each attack's validated options (a bad field is named)."""
    from pydantic import ValidationError

    given: dict[str, dict] = {n: {} for n in names}
    for item in settings:
        key, sep, value = item.partition("=")
        name, dot, option = key.strip().partition(".")
        if not sep or not dot:
            raise ValueError(f"--set {item!r}: write ATTACK.OPTION=VALUE, e.g. inversion.batch=2")
        if name not in AUDITS:
            raise ValueError(f"--set {item!r}: no attack {name!r} (attacks: {', '.join(AUDITS.names())})")
        given.setdefault(name, {})[option] = _value(value.strip())
    out = {}
    for name, values in given.items():
        try:
            out[name] = AUDITS.get(name).options(**values)
        except ValidationError as err:
            problem = err.errors()[0]
            where = ".".join(str(p) for p in problem["loc"])
            raise ValueError(f"--set {name}.{where}: {problem['msg']}") from None
    return out


def _value(text: str):
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def build_context(source: Path, seed: int, note=print, overrides=()) -> AuditContext:
    """The run folder's or the config's run, built (data, model, task), with its models."""
    import copy

    from fedfm.api import _coerce, natural_clients
    from fedfm.config import load_config
    from fedfm.models.state import get_trainable_state
    from fedfm.tasks.setup import build_task, prepare_data

    run_dir = source if source.is_dir() else None
    if run_dir is not None:
        if not (run_dir / "config.toml").is_file():
            raise ValueError(f"{run_dir} is not a fedfm run folder (no config.toml)")
        cfg = load_config(run_dir / "config.toml", overrides)
    else:
        cfg = natural_clients(_coerce(source, overrides))
    note(f"audit: building {cfg.run.name} ({cfg.model.name}, peft {cfg.peft.method}, {cfg.data.name})")
    data = prepare_data(cfg)
    bundle, task = build_task(cfg, data)
    start = copy.deepcopy(get_trainable_state(bundle.trainable))
    final = None
    if run_dir is not None:
        from fedfm.server.checkpoint import load_checkpoint

        state = load_checkpoint(run_dir / "checkpoint")
        if state is None:
            raise ValueError(f"{run_dir} has no finished round to audit (no checkpoint)")
        if state.merged:
            raise ValueError(
                f"{run_dir}: stacked LoRA merges into the base weights; its audit is not supported"
            )
        final = {k: v.clone() for k, v in state.params.items()}
    return AuditContext(cfg, data, bundle, task, start, final, seed, note, run_dir)


def train_final(ctx: AuditContext, out: Path, why: str = "membership") -> None:
    """Run the config's experiment into ``out/run`` and take its final global model."""
    from fedfm.api import run
    from fedfm.server.checkpoint import load_checkpoint

    ctx.note(f"audit: {why} needs the run's final model; running the experiment into {out / 'run'}")
    result = run(ctx.cfg, output=out / "run", progress=False)
    state = load_checkpoint(result.run_dir / "checkpoint")
    ctx.final = {k: v.clone() for k, v in state.params.items()}
    ctx.trained_dir = result.run_dir


def audit(
    source: str | Path,
    attacks: list[str] | None = None,
    budget_min: float | None = None,
    settings: list[str] = (),
    out: str | Path | None = None,
    seed: int = 0,
    note=print,
) -> dict:
    """Run ``attacks`` (default: all) on a run folder or config; write audit.json and audit.md
    into the run folder (or ``out``); return what was written."""
    import fedfm.audit.kinds  # noqa: F401  (the registered attacks)

    names = list(attacks or AUDITS.names())
    for name in names:
        if name not in AUDITS:
            raise ValueError(f"no attack {name!r} (attacks: {', '.join(AUDITS.names())})")
    options = parse_options(names, list(settings))
    source = Path(source)
    began = time.perf_counter()
    ctx = build_context(source, seed, note)
    folder = (
        Path(out)
        if out
        else (
            ctx.run_dir
            or Path(ctx.cfg.run.output_root) / f"audit-{ctx.cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
    )
    folder.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in names:
        kind, opts = AUDITS.get(name), options[name]
        if budget_min is not None:
            left = budget_min * 60 - (time.perf_counter() - began)
            need = estimate_s(name, ctx, opts)
            if need > left:
                why = f"over the budget: needs about {need / 60:.1f} min, {max(left, 0) / 60:.1f} left"
                results[name] = {"skipped": why}
                note(f"audit: {name} skipped ({results[name]['skipped']})")
                continue
        note(f"audit: {name} — {kind.describe}")
        t = time.perf_counter()
        if kind.needs_final and ctx.final is None:
            train_final(ctx, folder, name)
        results[name] = {
            **kind.run(ctx, opts),
            "options": opts.model_dump(),
            "wall_s": round(time.perf_counter() - t, 1),
        }
    written = {
        "source": str(source),
        "config": ctx.cfg.run.name,
        "seed": seed,
        "budget_min": budget_min,
        "wall_s": round(time.perf_counter() - began, 1),
        "attacks": results,
    }
    (folder / AUDIT_JSON).write_text(json.dumps(written, indent=1, default=float) + "\n")
    (folder / AUDIT_MD).write_text(markdown(written))
    if ctx.run_dir is not None and (ctx.run_dir / "metrics.jsonl").is_file():
        from fedfm.reporting.outputs import write_outputs

        write_outputs(ctx.run_dir)  # the report gains the audit's section
    note(f"audit: {folder / AUDIT_MD}")
    return written


def markdown(written: dict) -> str:
    """The audit's tables, one per attack."""
    parts = [f"# Audit of {written['config']}\n", f"Source: `{written['source']}`; seed {written['seed']}; "
             f"{written['wall_s']:.0f} s.\n"]  # fmt: skip
    for name, result in written["attacks"].items():
        parts.append(f"\n## {name}\n")
        if "skipped" in result:
            parts.append(f"Skipped: {result['skipped']}.\n")
            continue
        parts.append(AUDITS.get(name).table(result))
    return "\n".join(parts)
