"""Validate a client update against the global state before it may touch the aggregate.

Checks: the same tensor names, shapes and dtypes as the global state; finite values; an L2
norm within ``validation.max_update_norm`` (if set); a positive example count no larger than
``validation.max_num_examples`` (default: the training set size). A failing update is dropped
with the client id and the reason, and never touches the aggregate.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedfm.transforms.base import Passthrough, transform
from fedfm.types import ClientResult, Update


def update_problem(
    update: Update,
    reference: Mapping[str, torch.Tensor],
    max_norm: float | None = None,
    max_examples: int | None = None,
) -> str | None:
    """``None`` for a valid update, else the first reason it is not."""
    if not isinstance(update.num_examples, int) or update.num_examples <= 0:
        return f"num_examples must be a positive integer, got {update.num_examples!r}"
    if max_examples is not None and update.num_examples > max_examples:
        return f"num_examples {update.num_examples} is implausible (more than {max_examples})"
    missing = sorted(set(reference) - set(update.delta))
    extra = sorted(set(update.delta) - set(reference))
    if missing or extra:
        return f"parameter names differ from the global state (missing {missing[:3]}, unexpected {extra[:3]})"
    for name, ref in reference.items():
        t = update.delta[name]
        if not isinstance(t, torch.Tensor):
            return f"{name}: not a tensor"
        if t.shape != ref.shape:
            return f"{name}: shape {tuple(t.shape)} != expected {tuple(ref.shape)}"
        if t.dtype != ref.dtype:
            return f"{name}: dtype {t.dtype} != expected {ref.dtype}"
        if not torch.isfinite(t).all():
            return f"{name}: contains NaN or Inf"
    if max_norm is not None:
        norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in update.delta.values())))
        if norm > max_norm:
            return f"update L2 norm {norm:.4g} exceeds validation.max_update_norm = {max_norm:.4g}"
    return None


class Validation(Passthrough):
    """Server half: every arriving dense update is checked against the global state as its sender
    holds it; a failing one is rejected with the client id and the reason. The last server half,
    so it sees exactly what the reduce will see. Accepted updates are tallied (loss, weight,
    control deltas) for the round record."""

    name = "validation"

    def __init__(self, max_norm: float | None) -> None:
        self.max_norm = max_norm

    def server(self, stream, rnd, reduce):
        return self._valid(stream, rnd), reduce

    def _valid(self, stream, rnd):
        for item in stream:
            if not isinstance(item, ClientResult):  # unmasked sums were checked by their transform
                yield item
                continue
            update = item.update
            problem = (
                update_problem(update, rnd.reference(item.client_id), self.max_norm, rnd.max_examples)
                if getattr(update, "dense", False)
                else f"expected a dense update, got a {type(update).__name__} payload"
            )
            if problem is not None:
                rnd.tally.reject(item.client_id, problem)
                continue
            rnd.tally.accept(item.client_id, update)
            yield item


UNBOUNDED_WARNING = (
    "validation.unbounded = true: nothing bounds one client's influence; one client can move the model "
    "arbitrarily far"
)


def influence_bound(cfg) -> str | None:
    """What bounds how far one deployed client can move the aggregate (a sentence), or None."""
    from fedfm.algorithms.aggregators import bounds_influence
    from fedfm.privacy.guarantees import dp_mode

    if cfg.validation.max_update_norm is not None:
        return f"validation.max_update_norm = {cfg.validation.max_update_norm:g} refuses larger updates"
    if dp_mode(cfg).client_level:
        return "client-level DP clips every update"
    if cfg.secagg.enabled:
        return "secure sums outside the range honest inputs can produce are refused"
    if bounds_influence(cfg.strategy):
        return f"strategy.aggregator = {cfg.strategy.aggregator!r} bounds each client's influence"
    return None


@transform("validation", 0)
def validation(cfg) -> Validation:
    return Validation(cfg.validation.max_update_norm)
