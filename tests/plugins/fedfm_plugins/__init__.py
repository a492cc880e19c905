"""A plug-in package outside ``src/``: one of each extension kind, registered with the public
decorators only, each with an effect a run shows (so a silent fallback is caught).

- objective ``plugin-frozen``: zeroes every gradient, so with SGD no client moves.
- server optimizer ``plugin-half``: θ + ½·Δ.
- aggregator ``plugin-zero``: an all-zero aggregate (the global model stays where it is).
- transform ``plugin-tag`` (position 45, named in ``pipeline.extra``): the client half adds the
  metric ``plugin_tag``; the server half refuses client 1.
- partitioner ``plugin-heavy``: client 0 holds all rows but one per other client.
- task ``plugin-top2``: classification whose evaluation also reports ``test_top2_accuracy``.
- engine ``plugin-reverse``: the in-process engine, running each cohort in reverse order.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from fedfm.algorithms.aggregators import AGGREGATORS
from fedfm.algorithms.objectives import OBJECTIVES, LocalHook, Objective
from fedfm.algorithms.server_optimizers import SERVER_OPTIMIZERS
from fedfm.data.partition import PARTITIONERS
from fedfm.engines import InProcessEngine, engine
from fedfm.tasks import TASKS
from fedfm.transforms import transform
from fedfm.transforms.base import Passthrough
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


class Tag(Passthrough):
    name = "plugin-tag"

    def client(self, payload, step):
        metrics = {**payload.metrics, "plugin_tag": float(step.job.client_id)}
        return dataclasses.replace(payload, metrics=metrics)

    def server(self, stream, rnd, reduce):
        def refuse_one(items):
            for item in items:
                if isinstance(item, ClientResult) and item.client_id == 1:
                    rnd.tally.reject(1, "plugin-tag: client 1 refused")
                    continue
                yield item

        return refuse_one(stream), reduce


transform("plugin-tag", 45, named=True)(lambda cfg: Tag())


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
