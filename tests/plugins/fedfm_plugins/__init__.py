"""A plug-in package outside ``src/``: one of each extension kind, registered with the public
decorators only, each with an option of its own and an effect a run shows (so a silent fallback
is caught). A component's options are a pydantic model given at registration; its fields join the
config section that names the component, and the component reads them from there (or, for a
function or class, as keyword-only parameters of the same name).

- objective ``plugin-frozen``: zeroes every gradient, so with SGD no client moves.
- server optimizer ``plugin-half`` (option ``strategy.plugin_step_scale``, default ½): θ + s·Δ.
- aggregator ``plugin-zero``: an all-zero aggregate (the global model stays where it is).
- transform ``plugin-tag`` (position 45, named in ``pipeline.extra``; option
  ``pipeline.plugin_tag_refuse``): the client half adds the metric ``plugin_tag``; the server half
  refuses that client.
- partitioner ``plugin-heavy`` (option ``partition.plugin_rows_each``): client 0 holds all rows
  but that many per other client.
- task ``plugin-top2`` (option ``task.plugin_top_k``): classification whose evaluation also
  reports ``test_top{k}_accuracy``.
- engine ``plugin-reverse`` (option ``run.plugin_reverse``): the in-process engine, running each
  cohort in reverse order.
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
- model ``plugin-shallow`` (options ``model.plugin_base``, ``model.plugin_layers``): a model
  folder cut to its first layers.
- dataset ``plugin-head`` (option ``data.plugin_rows``): the first rows of a CSV.
- LoRA aggregation mode ``plugin-scaled`` (option ``strategy.plugin_lora_scale``): the factor
  mean, each factor's step scaled.
- personalization method ``plugin-pattern`` (option ``personalization.plugin_personal_pattern``):
  the tensors whose name holds the pattern stay with the client.
- sharing mode ``plugin-bottom`` (option ``sharing.plugin_keep_layers``): clients hold and train
  only the FM's bottom layers; the server evaluates their model.
- protocol ``plugin-stop`` (option ``run.plugin_stop_after``): the rounds protocol, stopped early.
- payload type ``plugin-narrow`` with the transform that makes it (option
  ``pipeline.plugin_narrow_dtype``): the delta travels at half precision; the server half widens
  it back before validation.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, Field

from fedfm.algorithms.aggregators import AGGREGATORS
from fedfm.algorithms.lora import LORA_AGGREGATION, FactorMean, LoraMode
from fedfm.algorithms.objectives import OBJECTIVES, LocalHook, Objective, proximal_term
from fedfm.algorithms.personal import PERSONAL_METHODS, PersonalMethod
from fedfm.algorithms.server_optimizers import SERVER_OPTIMIZERS
from fedfm.attacks import ATTACKS, AttackKind
from fedfm.data.partition import PARTITIONERS
from fedfm.data.sources import DATASETS
from fedfm.engines import InProcessEngine, engine
from fedfm.models.resolve import MODELS
from fedfm.protocols import PROTOCOLS, Protocol
from fedfm.reporting.trackers import TRACKERS
from fedfm.sharing import SHARING_MODES, SharingMode
from fedfm.tasks import TASKS
from fedfm.transforms import transform
from fedfm.transforms.base import Passthrough
from fedfm.transforms.compression import CODECS, Codec
from fedfm.types import ClientResult, Update, payload


def _frozen_hook(global_params, ctx, client_state, device):
    def zero(trainable):
        for p in trainable.values():
            if p.grad is not None:
                p.grad.zero_()

    return LocalHook(adjust_gradients=zero)


OBJECTIVES.register("plugin-frozen")(lambda **_: Objective("plugin-frozen", _frozen_hook))


class HalfOptions(BaseModel):
    plugin_step_scale: float = Field(0.5, gt=0, description="The part of FedAvg's step plugin-half takes.")


@dataclasses.dataclass(frozen=True)
class HalfStep:
    scale: float = 0.5

    def init(self, params):
        return {}

    def step(self, params, delta, state):
        return {k: p + self.scale * delta[k] for k, p in params.items()}, state


SERVER_OPTIMIZERS.register("plugin-half", options=HalfOptions)(
    lambda *, plugin_step_scale=0.5, **_: HalfStep(plugin_step_scale)
)


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


class HeavyOptions(BaseModel):
    plugin_rows_each: int = Field(1, ge=1, description="Rows each client but the first holds (plugin-heavy).")


@PARTITIONERS.register("plugin-heavy", options=HeavyOptions)
def heavy(labels, groups, cfg, rng):
    n, k, m = len(labels), cfg.num_clients, cfg.plugin_rows_each
    order = rng.permutation(n)
    first = n - (k - 1) * m
    return [order[:first], *[order[first + i * m : first + (i + 1) * m] for i in range(k - 1)]]


class TopOptions(BaseModel):
    plugin_top_k: int = Field(2, ge=1, description="plugin-top2 also reports top-k accuracy for this k.")


@dataclasses.dataclass(frozen=True)
class Top2:
    inner: object
    batch_size: int
    k: int = 2
    status: str = "evaluating (top-k)"

    @torch.no_grad()
    def __call__(self, bundle, task):
        record = self.inner(bundle, task)
        hits = 0
        for start in range(0, len(task.test), self.batch_size):
            rows = np.arange(start, min(start + self.batch_size, len(task.test)))
            b = task.batch(task.test, rows, bundle.device)
            logits = bundle.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            top = logits.topk(min(self.k, logits.shape[-1]), dim=-1).indices
            hits += int((top == b["labels"][:, None]).any(dim=-1).sum())
        record[f"test_top{self.k}_accuracy"] = hits / max(len(task.test), 1)
        return record


_classification = TASKS.get("classification")
TASKS.register("plugin-top2", options=TopOptions)(
    dataclasses.replace(
        _classification,
        evaluator=lambda cfg, data: Top2(
            _classification.evaluator(cfg, data), cfg.eval.batch_size, cfg.task.plugin_top_k
        ),
    )
)


class ReverseOptions(BaseModel):
    plugin_reverse: bool = Field(True, description="plugin-reverse runs each cohort backwards.")


@engine("plugin-reverse", options=ReverseOptions)
class ReverseEngine(InProcessEngine):
    """Composition would do as well; a subclass keeps the plug-in short. Its option is in
    ``[run]``, which the engine's setup carries (``setup.options``)."""

    def __init__(self, setup):
        super().__init__(setup)
        self.reverse = setup.options.plugin_reverse

    def run_cohort(self, global_params, cohort, ctx):
        return super().run_cohort(global_params, list(reversed(cohort)) if self.reverse else cohort, ctx)


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
    from fedfm.algorithms.robust import Cohort, coordinate_trimmed_mean

    return Cohort(updates).map(lambda x: coordinate_trimmed_mean(x, trim_count))


trim_by_count.bounds_influence = True  # a capability a deployment asks (one client's influence is bounded)


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


# ------------------------------------------------------------------------------------------------
# model, dataset, LoRA aggregation mode, personalization method, sharing mode, protocol, payload


class ShallowOptions(BaseModel):
    plugin_base: str = Field("", description="The model folder plugin-shallow cuts down.")
    plugin_layers: int = Field(1, ge=1, description="Layers plugin-shallow keeps.")


@MODELS.register("plugin-shallow", options=ShallowOptions)
def shallow(*, plugin_base: str = "", plugin_layers: int = 1) -> str:
    """``plugin_base`` with only its first ``plugin_layers`` layers: a folder beside it whose
    config says so (the weights and tokenizer are the base's, linked)."""
    base = Path(plugin_base)
    folder = base.parent / f"{base.name}-{plugin_layers}-layers"
    if not folder.is_dir():
        folder.mkdir()
        for f in base.iterdir():
            if f.name != "config.json":
                (folder / f.name).symlink_to(f.resolve())
        config = json.loads((base / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": plugin_layers}))
    return str(folder)


class HeadOptions(BaseModel):
    plugin_rows: int = Field(40, ge=2, description="Rows of the CSV plugin-head keeps (its first ones).")


@DATASETS.register("plugin-head", options=HeadOptions)
def first_rows(cfg):
    train, test = DATASETS.get("csv")(cfg)
    return train.subset(np.arange(min(cfg.plugin_rows, len(train)))), test


class ScaledOptions(BaseModel):
    plugin_lora_scale: float = Field(
        1.0, ge=0, description="What plugin-scaled multiplies each LoRA factor's step by."
    )


class ScaledFactorMean(FactorMean):
    """The weighted mean of each factor, its step scaled by ``plugin_lora_scale``."""

    def __init__(self, *, plugin_lora_scale: float = 1.0) -> None:
        super().__init__()
        self.scale = plugin_lora_scale

    def result(self, total, rank, prefix, a_key, b_key, like):
        return {k: self.scale * v for k, v in super().result(total, rank, prefix, a_key, b_key, like).items()}


LORA_AGGREGATION.register("plugin-scaled", options=ScaledOptions)(LoraMode(ScaledFactorMean))


class PatternOptions(BaseModel):
    plugin_personal_pattern: str = Field("classifier", description="Tensors whose name holds this stay home.")


def _matching(key: str, *, plugin_personal_pattern: str = "classifier") -> bool:
    return plugin_personal_pattern in key


PERSONAL_METHODS.register("plugin-pattern", options=PatternOptions)(PersonalMethod(_matching))


class BottomOptions(BaseModel):
    plugin_keep_layers: int = Field(
        1, ge=1, description="Bottom layers of the FM plugin-bottom clients train."
    )


def _bottom_view(cfg):
    kept = list(range(cfg.sharing.plugin_keep_layers))
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"layers": kept})})


SHARING_MODES.register("plugin-bottom", options=BottomOptions)(
    SharingMode(_bottom_view, lambda cfg, labels: None)
)


class StopOptions(BaseModel):
    plugin_stop_after: int = Field(1, ge=1, description="Rounds plugin-stop runs at most.")


def _stop_early(cfg, run_dir, **options):
    rounds = min(cfg.run.rounds, cfg.run.plugin_stop_after)
    short = cfg.model_copy(update={"run": cfg.run.model_copy(update={"rounds": rounds})})
    return PROTOCOLS.get("rounds").run(short, run_dir, **options)


PROTOCOLS.register("plugin-stop", options=StopOptions)(Protocol(_stop_early, rounds=True))


@payload
@dataclasses.dataclass(frozen=True)
class Narrow:
    """A payload kind: the delta at half precision (``kind`` is its wire name)."""

    kind = "plugin-narrow"
    dense = False
    delta: dict
    num_examples: int
    metrics: dict = dataclasses.field(default_factory=dict)

    def tensors(self):
        return {"p": self.delta}

    @classmethod
    def from_wire(cls, groups, num_examples, metrics):
        return cls(groups.get("p", {}), num_examples, metrics)


class NarrowOptions(BaseModel):
    plugin_narrow_dtype: str = Field(
        "float16", pattern="^(float16|bfloat16)$", description="plugin-narrow's dtype."
    )


@dataclasses.dataclass
class NarrowParts(Passthrough):
    """Sends a dense update as a ``Narrow`` payload; the server half widens it back."""

    dtype: str = "float16"
    name = "plugin-narrow"

    def client(self, payload, step):
        if not isinstance(payload, Update):
            return payload
        delta = {k: v.to(getattr(torch, self.dtype)) for k, v in payload.delta.items()}
        return Narrow(delta, payload.num_examples, dict(payload.metrics))

    def server(self, stream, rnd, reduce):
        def widened(items):
            for item in items:
                if isinstance(item, ClientResult) and isinstance(item.update, Narrow):
                    u = item.update
                    wide = Update({k: v.float() for k, v in u.delta.items()}, u.num_examples, u.metrics)
                    item = dataclasses.replace(item, update=wide)
                yield item

        return widened(stream), reduce


transform("plugin-narrow", 42, named=True, options=NarrowOptions)(
    lambda cfg: NarrowParts(cfg.pipeline.plugin_narrow_dtype)
)
