"""A newly registered component is asked what it can do, never what it is called: one that does
not declare a capability is treated as lacking it and refused at config time with the reason,
and the same component declaring it is accepted. Each check registers a copy of a built-in under a
new name (removed afterwards, so registries stay as the other tests expect)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import pytest

from fedfm.algorithms.aggregators import AGGREGATORS, weighted_mean
from fedfm.algorithms.server_optimizers import SERVER_OPTIMIZERS, ServerOptimizer
from fedfm.config import ConfigError, make_config
from fedfm.data.partition import PARTITIONERS
from fedfm.protocols import PROTOCOLS
from fedfm.sharing import SHARING_MODES
from fedfm.tasks import TASKS
from fedfm.transforms.compression import CODECS
from fedfm.transforms.validation import influence_bound


@contextlib.contextmanager
def registered(registry, name, item):
    registry.register(name)(item)
    try:
        yield name
    finally:
        del registry._items[name]


def _mean_copy(updates):
    return weighted_mean(updates)


def _refused(cfg: dict, *words: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_config(cfg)
    for word in words:
        assert word in str(err.value)


def test_an_aggregator_is_a_mean_for_secure_aggregation_only_if_it_says_so(tiny_config):
    secure = {"enabled": True}
    with registered(AGGREGATORS, "cap-mean", _mean_copy) as name:
        _refused(tiny_config(strategy={"aggregator": name}, secagg=secure), "secagg needs")
        _mean_copy.linear = True
        try:
            assert make_config(tiny_config(strategy={"aggregator": name}, secagg=secure)).secagg.enabled
        finally:
            del _mean_copy.linear


def test_an_aggregator_bounds_a_deployed_clients_influence_only_if_it_says_so(tiny_config):
    with registered(AGGREGATORS, "cap-rule", _mean_copy) as name:
        cfg = make_config(tiny_config(strategy={"aggregator": name}))
        assert influence_bound(cfg) is None  # undeclared: treated as the unbounded mean
        _mean_copy.bounds_influence = True
        try:
            assert name in influence_bound(cfg)
        finally:
            del _mean_copy.bounds_influence


def test_stack_merging_needs_a_server_step_that_adds_the_aggregate(tiny_config):
    lora = {"lora_aggregation": "stack"}

    @dataclasses.dataclass(frozen=True)
    class Step:  # θ + Δ, but a plug-in that does not say so is not assumed to
        def init(self, params):
            return {}

        def step(self, params, delta, state):
            return {k: p + delta[k] for k, p in params.items()}, state

    with registered(SERVER_OPTIMIZERS, "cap-step", lambda **_: Step()) as name:
        _refused(tiny_config(strategy={**lora, "server_optimizer": name}), "merges the average into the base")
    sgd = functools.partial(ServerOptimizer, "cap-sgd")
    with registered(SERVER_OPTIMIZERS, "cap-sgd", lambda *, lr=1.0, **_: sgd(lr=lr)) as name:
        assert (
            make_config(tiny_config(strategy={**lora, "server_optimizer": name})).strategy.server_optimizer
            == name
        )
        _refused(tiny_config(strategy={**lora, "server_optimizer": name, "server_lr": 0.5}), "server_lr")


def test_a_protocol_runs_rounds_only_if_it_says_so(tiny_config):
    personal = {"method": "fedsa"}
    data = {**tiny_config()["data"], "client_test_fraction": 0.25}
    rounds = PROTOCOLS.get("rounds")
    with registered(PROTOCOLS, "cap-loop", dataclasses.replace(rounds, rounds=False)) as name:
        _refused(tiny_config(run={"protocol": name}, personalization=personal, data=data), "federated rounds")
    with registered(PROTOCOLS, "cap-rounds", rounds) as name:
        assert make_config(tiny_config(run={"protocol": name}, personalization=personal, data=data))


def test_a_sharing_mode_changes_the_clients_model_unless_it_says_otherwise(tiny_config):
    personal = {"method": "fedsa"}
    data = {**tiny_config()["data"], "client_test_fraction": 0.25}
    none = SHARING_MODES.get("none")
    with registered(SHARING_MODES, "cap-view", dataclasses.replace(none, changes_model=True)) as name:
        _refused(
            tiny_config(sharing={"mode": name}, personalization=personal, data=data), "computation sharing"
        )
    with registered(SHARING_MODES, "cap-same", none) as name:
        assert make_config(tiny_config(sharing={"mode": name}, personalization=personal, data=data))


def test_a_task_has_a_layer_stack_to_cut_only_if_it_says_so(tiny_config):
    classification = TASKS.get("classification")
    split = {"mode": "split"}
    cut = {"cut_layer": 1}
    with registered(TASKS, "cap-flat", dataclasses.replace(classification, layer_stack=False)) as name:
        _refused(tiny_config(task={"kind": name}, sharing=split, split=cut), "layer stack")
        _refused(tiny_config(task={"kind": name}, sharing={"mode": "offsite"}), "layer stack")
    with registered(TASKS, "cap-stack", classification) as name:
        assert make_config(tiny_config(task={"kind": name}, sharing=split, split=cut)).sharing.mode == "split"


def test_a_compression_method_changes_the_update_unless_it_says_otherwise(tiny_config):
    secure = {"enabled": True}
    same = CODECS.get("none")
    with registered(CODECS, "cap-codec", dataclasses.replace(same, identity=False)) as name:
        _refused(tiny_config(compression={"method": name}, secagg=secure), "compression.method")
    with registered(CODECS, "cap-none", same) as name:
        assert make_config(tiny_config(compression={"method": name}, secagg=secure)).secagg.enabled


def test_a_partitioner_by_column_needs_the_column(tiny_config):
    natural = PARTITIONERS.get("natural")

    def by_site(labels, groups, cfg, rng):
        return natural(labels, groups, cfg, rng)

    with registered(PARTITIONERS, "cap-site", by_site) as name:
        assert make_config(tiny_config(partition={"method": name, "num_clients": 4}))
        by_site.by_column = True
        _refused(tiny_config(partition={"method": name, "num_clients": 4}), "partition.column is required")
