"""Personal tensors stay home (``personalization.method``): the client half sends only the shared
part of an update; the server half makes it whole again with zeros at the personal tensors
(whatever a client sent there), so they are never aggregated and the global personal part never
moves. Position 5: right after validation's client half and before every other transform, so
clipping, noise, compression and masking see only what travels: secure aggregation's layout is
the shared part's, client-level DP's sensitivity is the shared update's norm, and the personal
part of every aggregate (noise included) is set back to zero."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from fedfm.algorithms.clusters import as_cluster, cluster_index, cluster_update, cluster_view, combine
from fedfm.algorithms.personal import (
    PERSONAL_METHODS,
    dense_again,
    personal_method,
    personalizes,
    shared_part,
)
from fedfm.transforms.base import Passthrough, transform
from fedfm.types import Aggregate, ClientResult, Update


class PersonalParts(Passthrough):
    name = "personal"

    def __init__(self, method: str, is_personal=None) -> None:
        self.method = method
        self.is_personal = is_personal if is_personal is not None else PERSONAL_METHODS.get(method)

    def prepare(self, rnd) -> dict:
        rnd.personal = self.is_personal  # secure aggregation masks only the shared part
        rnd.sends = partial(_shared, self.is_personal)  # and a decoder expects only that part
        return {}

    def client(self, payload, step):
        if not isinstance(payload, Update):
            return payload
        return replace(payload, delta=shared_part(payload.delta, self.is_personal))

    def server(self, stream, rnd, reduce):
        def whole():
            for item in stream:
                if isinstance(item, ClientResult) and isinstance(item.update, Update):
                    delta = dense_again(item.update.delta, rnd.reference(item.client_id), self.is_personal)
                    item = replace(item, update=replace(item.update, delta=delta))
                yield item

        def shared_only(items):  # a secure round's sums, DP's noise: the personal part stays zero
            aggregate = reduce(items)
            return replace(aggregate, delta=dense_again(aggregate.delta, rnd.params, self.is_personal))

        return whole(), shared_only


class Clusters(Passthrough):
    """IFCA (``personalization.method = "ifca"``): the server half makes each client's update for
    its cluster whole against the stacked state (zeros elsewhere, whatever else it sent) and
    replaces the reduce by one reduce per cluster over the clients that picked it. An update
    without a valid cluster index is rejected with the reason."""

    name = "clusters"

    def __init__(self, k: int) -> None:
        self.k = k

    def prepare(self, rnd) -> dict:
        rnd.sends = _named_cluster  # a decoder expects the cluster the client names
        return {}

    def server(self, stream, rnd, reduce):
        k = self.k

        def whole():
            for item in stream:
                if isinstance(item, ClientResult) and isinstance(item.update, Update):
                    j = cluster_index(item.update.metrics.get("cluster"), k)
                    reference = rnd.reference(item.client_id)
                    if j is None:
                        shown = item.update.metrics.get("cluster")
                        rnd.tally.reject(item.client_id, f"cluster index {shown!r} is not one of 0..{k - 1}")
                        continue
                    wanted = set(cluster_view(reference, j))
                    if set(cluster_view(item.update.delta, j)) != wanted or len(item.update.delta) != len(
                        wanted
                    ):
                        rnd.tally.reject(
                            item.client_id, f"the update does not hold exactly cluster {j}'s tensors"
                        )
                        continue
                    delta = cluster_update(item.update.delta, reference, j)
                    item = replace(item, update=replace(item.update, delta=delta))
                yield item

        def per_cluster(items):
            groups: dict[int, list] = {}
            for item in items:
                groups.setdefault(int(item.update.metrics["cluster"]), []).append(item)
            if not groups:
                return reduce(iter(()))  # the reduce's own empty-cohort error
            merged = {j: reduce(iter(members)).delta for j, members in sorted(groups.items())}
            return Aggregate(combine(merged, rnd.params))

        return whole(), per_cluster


def _shared(is_personal, held, metrics):
    return shared_part(held, is_personal)


def _named_cluster(held, metrics):
    j = cluster_index(metrics.get("cluster"), None)
    if j is None:
        return held  # no valid index: the update is rejected after decoding
    return as_cluster(cluster_view(held, j), j) or held


def _check(cfg) -> None:
    from fedfm.algorithms.objectives import make_objective
    from fedfm.privacy.guarantees import dp_mode
    from fedfm.registry import registry_for

    p, who = cfg.personalization, f"personalization.method = {cfg.personalization.method!r}"
    method = PERSONAL_METHODS.get(p.method)
    if method.needs == "lora" and cfg.peft.method != "lora":
        raise ValueError(f"{who} keeps LoRA factors personal: peft.method must be 'lora'")
    if make_objective(cfg.strategy).uses_control_variates:
        raise ValueError(f"{who} with strategy.objective = 'scaffold' is not built (its control variates "
                         "would have to skip the personal tensors)")  # fmt: skip
    if method.needs == "head" and not registry_for("task").get(cfg.task.kind).has_head:
        raise ValueError(
            f"{who} keeps a classification head personal; task.kind = {cfg.task.kind!r} has none"
        )
    if method.clustered and (dp_mode(cfg).active or cfg.secagg.enabled):
        raise ValueError(
            f"{who} reveals each client's cluster to the server, which secure aggregation would hide; "
            "it is refused with secagg.enabled and privacy.dp (mask per cluster is not built)"
        )
    if method.clustered:
        _check_ifca(cfg, who)
    if method.sends_nothing and (dp_mode(cfg).active or cfg.secagg.enabled):
        raise ValueError(f"{who} sends nothing: privacy.dp and secagg.enabled have nothing to protect")
    if method.phases and dp_mode(cfg).example_level:
        raise ValueError(
            f"{who} with privacy.dp = 'example': its extra local steps (the head's, the personal "
            "adapter's) are not DP-SGD steps; use privacy.dp = 'client'"
        )
    changes_model = registry_for("sharing mode").get(cfg.sharing.mode).changes_model
    if changes_model or not registry_for("protocol").get(cfg.run.protocol).rounds:
        raise ValueError(
            f"{who} runs federated rounds without computation sharing (sharing.mode, run.protocol)"
        )
    if (
        cfg.peft.rank_tiers
        or registry_for("LoRA aggregation mode").get(cfg.strategy.lora_aggregation).lora_aware
    ):
        raise ValueError(f"{who}: peft.rank_tiers and strategy.lora_aggregation must keep their defaults")


def _check_ifca(cfg, who: str) -> None:
    from fedfm.algorithms.robust import min_cohort
    from fedfm.algorithms.server_optimizers import make_server_optimizer
    from fedfm.attacks import ATTACKS
    from fedfm.data.synthetic import synthetic_mode

    if cfg.task.baselines:
        raise ValueError(f"{who}: task.baselines compares one global model; turn it off")
    s = cfg.strategy
    if getattr(make_server_optimizer(s), "stateful", True):
        raise ValueError(
            f"{who}: strategy.server_optimizer = {s.server_optimizer!r} (or server_momentum) keeps state "
            "that would move a cluster nobody picked; use 'sgd' without momentum"
        )
    if min_cohort(s) > 1:
        raise ValueError(
            f"{who}: strategy.aggregator = {s.aggregator!r} needs a minimum cohort per cluster, which one "
            "small cluster would fail for all; use mean, median or trimmed_mean"
        )
    if ATTACKS.get(cfg.attack.kind).craft is not None:
        raise ValueError(
            f"{who}: attack.kind = {cfg.attack.kind!r} crafts one update for attackers of any cluster"
        )
    if synthetic_mode(cfg).loads:
        raise ValueError(f"{who}: synthetic.mode trains one global model on the server; turn it off")


def _check_all(cfg) -> None:
    p = cfg.personalization
    if (personalizes(p) or p.finetune_steps) and cfg.data.client_test_fraction == 0:
        raise ValueError(
            "personalization is scored on each client's own held-out data: set data.client_test_fraction > 0"
        )
    if personalizes(p):
        _check(cfg)


@transform("personal", 5, check=_check_all)
def personal_parts(cfg) -> PersonalParts | Clusters | None:
    p = cfg.personalization
    if not personalizes(p):
        return None
    method = personal_method(p)
    return Clusters(p.clusters) if method.clustered else PersonalParts(p.method, method)
