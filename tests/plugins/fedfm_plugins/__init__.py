"""A plug-in package outside ``src/``: one of each extension kind, registered with the public
decorators only, each with an effect a run shows (so a silent fallback is caught).

- objective ``plugin-frozen``: zeroes every gradient, so with SGD no client moves.
- server optimizer ``plugin-half``: θ + ½·Δ.
- aggregator ``plugin-zero``: an all-zero aggregate (the global model stays where it is).
- transform ``plugin-tag`` (position 45, named in ``pipeline.extra``; option
  ``pipeline.plugin_tag_refuse``): the client half adds the metric ``plugin_tag``; the server half
  refuses that client.
- partitioner ``plugin-heavy``: client 0 holds all rows but one per other client.
- task ``plugin-top2``: classification whose evaluation also reports ``test_top2_accuracy``.
- engine ``plugin-reverse``: the in-process engine, running each cohort in reverse order.
- aggregator ``plugin-trim`` with its own option ``strategy.trim_count``: the coordinate-wise mean
  after dropping the ``trim_count`` largest and smallest values (``trimmed_mean`` by a count).
- compression method ``plugin-round`` (option ``compression.round_decimals``): every entry of the
  update rounded to that many decimals (0 rounds a small update to nothing).
- attack ``plugin-factor`` (option ``attack.plugin_factor``): attackers send factor × their
  honest update (−1 with every client attacking undoes a round exactly).
- tracker ``plugin-lines`` (option ``run.plugin_lines_file``): each round record as a JSON line
  in that file of the run folder.
- objective ``plugin-feddyn``: FedDyn (Acar et al., ICLR 2021) as a complete plug-in, both halves,
  with its own option ``strategy.feddyn_alpha``. Client k minimises
  L_k(θ) − ⟨g_k, θ⟩ + α/2·‖θ − θᵗ⁻¹‖² and then sets g_k ← g_k − α(θ_k − θᵗ⁻¹) (its state); the
  server keeps h ← h − α·(|P|/N)·Δ̄ and moves θ by Δ̄ − h/α (its server half). In round 1 (g = 0,
  h = 0) the client objective is FedProx's with μ = α, so with every client in the cohort FedDyn
  moves θ exactly twice as far as FedProx: what ``check.py`` measures.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import torch
from pydantic import BaseModel, Field

from fedfm.algorithms.aggregators import AGGREGATORS
from fedfm.algorithms.objectives import OBJECTIVES, LocalHook, Objective, proximal_term
from fedfm.algorithms.server_optimizers import SERVER_OPTIMIZERS
from fedfm.attacks import ATTACKS, AttackKind
from fedfm.data.partition import PARTITIONERS
from fedfm.engines import InProcessEngine, engine
from fedfm.reporting.trackers import TRACKERS
from fedfm.tasks import TASKS
from fedfm.transforms import transform
from fedfm.transforms.base import Passthrough
from fedfm.transforms.compression import CODECS, Codec
from fedfm.types import ClientResult


def _frozen_hook(global_params, ctx, client_state, device):
    def zero(trainable):
        for p in trainable.values():
            if p.grad is not None:
                p.grad.zero_()

    return LocalHook(adjust_gradients=zero)


OBJECTIVES.register("plugin-frozen")(lambda **_: Objective("plugin-frozen", _frozen_hook))


@dataclasses.dataclass(frozen=True)
class HalfStep:
    def init(self, params):
        return {}

    def step(self, params, delta, state):
        return {k: p + 0.5 * delta[k] for k, p in params.items()}, state


SERVER_OPTIMIZERS.register("plugin-half")(lambda **_: HalfStep())


@AGGREGATORS.register("plugin-zero")
def zero_aggregate(updates):
    out = None
    for delta, _ in updates:
        out = {k: torch.zeros_like(v) for k, v in delta.items()}
    return out


class TagOptions(BaseModel):
    plugin_tag_refuse: int = Field(1, ge=0, description="The client plugin-tag's server half refuses.")


@dataclasses.dataclass
class Tag(Passthrough):
    refuse: int = 1
    name = "plugin-tag"

    def client(self, payload, step):
        metrics = {**payload.metrics, "plugin_tag": float(step.job.client_id)}
        return dataclasses.replace(payload, metrics=metrics)

    def server(self, stream, rnd, reduce):
        def refuse_one(items):
            for item in items:
                if isinstance(item, ClientResult) and item.client_id == self.refuse:
                    rnd.tally.reject(self.refuse, f"plugin-tag: client {self.refuse} refused")
                    continue
                yield item

        return refuse_one(stream), reduce


transform("plugin-tag", 45, named=True, options=TagOptions)(lambda cfg: Tag(cfg.pipeline.plugin_tag_refuse))


@PARTITIONERS.register("plugin-heavy")
def heavy(labels, groups, cfg, rng):
    n, k = len(labels), cfg.num_clients
    order = rng.permutation(n)
    return [order[: n - (k - 1)], *[order[n - (k - 1) + i : n - (k - 1) + i + 1] for i in range(k - 1)]]


@dataclasses.dataclass(frozen=True)
class Top2:
    inner: object
    batch_size: int
    status: str = "evaluating (top-2)"

    @torch.no_grad()
    def __call__(self, bundle, task):
        record = self.inner(bundle, task)
        hits = 0
        for start in range(0, len(task.test), self.batch_size):
            rows = np.arange(start, min(start + self.batch_size, len(task.test)))
            b = task.batch(task.test, rows, bundle.device)
            logits = bundle.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            top = logits.topk(min(2, logits.shape[-1]), dim=-1).indices
            hits += int((top == b["labels"][:, None]).any(dim=-1).sum())
        record["test_top2_accuracy"] = hits / max(len(task.test), 1)
        return record


_classification = TASKS.get("classification")
TASKS.register("plugin-top2")(
    dataclasses.replace(
        _classification,
        evaluator=lambda cfg, data: Top2(_classification.evaluator(cfg, data), cfg.eval.batch_size),
    )
)


@engine("plugin-reverse")
class ReverseEngine(InProcessEngine):
    """Composition would do as well; a subclass keeps the plug-in short."""

    def run_cohort(self, global_params, cohort, ctx):
        return super().run_cohort(global_params, list(reversed(cohort)), ctx)


class FedDynOptions(BaseModel):
    feddyn_alpha: float = Field(0.1, gt=0, description="FedDyn's α: the dynamic regulariser's weight.")


def _feddyn_hook(alpha, global_params, ctx, client_state, device):
    anchor = {k: v.to(device) for k, v in global_params.items()}
    g = {k: v.to(device) for k, v in (client_state or {}).items()}  # ∇L_k at its last model; 0 at first

    def penalty(trainable):
        linear = sum((g[k] * w).sum() for k, w in trainable.items() if k in g)
        return proximal_term(trainable, anchor, alpha) - linear

    def finish(final, steps, lr):
        new_g = {k: (g[k].cpu() if k in g else 0) - alpha * (final[k] - global_params[k]) for k in final}
        return None, new_g

    return LocalHook(penalty=penalty, finish=finish)


@dataclasses.dataclass(frozen=True)
class FedDynServer:
    alpha: float

    def init(self, params):
        return {k: torch.zeros_like(v) for k, v in params.items()}

    def correct(self, delta, h, cohort, num_clients):
        h = {k: h[k] - self.alpha * (cohort / num_clients) * d for k, d in delta.items()}
        return {k: d - h[k] / self.alpha for k, d in delta.items()}, h


@OBJECTIVES.register("plugin-feddyn", options=FedDynOptions)
def feddyn(*, feddyn_alpha: float = 0.1, **_):
    return Objective(
        "plugin-feddyn",
        functools.partial(_feddyn_hook, feddyn_alpha),
        server_part=FedDynServer(feddyn_alpha),
    )


class TrimOptions(BaseModel):
    trim_count: int = Field(1, ge=0, description="Updates dropped at each end, per coordinate.")


@AGGREGATORS.register("plugin-trim", options=TrimOptions)
def trim_by_count(updates, *, trim_count: int = 1):
    from fedfm.algorithms.robust import _stack, coordinate_trimmed_mean, unflatten

    x, _, like = _stack(updates)
    return unflatten(coordinate_trimmed_mean(x, trim_count), like)


class RoundOptions(BaseModel):
    round_decimals: int = Field(6, ge=0, le=12, description="Decimals plugin-round keeps.")


def _round_encode(delta, cfg, generator, residual):
    return {k: torch.round(v, decimals=cfg.round_decimals) for k, v in delta.items()}, None


def _round_decode(payload, cfg, like):
    return payload


CODECS.register("plugin-round", options=RoundOptions)(Codec(_round_encode, _round_decode))


class FactorOptions(BaseModel):
    plugin_factor: float = Field(-1.0, description="What plugin-factor attackers multiply their update by.")


ATTACKS.register("plugin-factor", options=FactorOptions)(
    AttackKind(corrupt=lambda plan, delta, g: {k: plan.settings.plugin_factor * v for k, v in delta.items()})
)


class LinesOptions(BaseModel):
    plugin_lines_file: str = Field("lines.jsonl", description="plugin-lines' file in the run folder.")


@TRACKERS.register("plugin-lines", options=LinesOptions)
class Lines:
    def __init__(self, cfg, run_dir, resume_after):
        self.path = run_dir / cfg.run.plugin_lines_file

    def round(self, record):
        with self.path.open("a") as fh:
            fh.write(json.dumps({k: v for k, v in record.items() if isinstance(v, (int, float, str))}) + "\n")

    def clients(self, t, records):
        pass

    def finish(self, run_dir, final):
        pass
