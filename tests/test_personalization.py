"""Personalized federated fine-tuning: which tensors stay with each client, that they never move
the global state, resume with personal state, and the per-client scores."""

from __future__ import annotations

import json

import pytest
import torch

import fedfm
from fedfm.algorithms.personal import (
    PERSONAL_PARTS,
    client_start,
    dense_again,
    kept_personal,
    lora_b,
    shared_part,
)
from fedfm.config import ConfigError, make_config
from fedfm.server.checkpoint import ClientStore, load_checkpoint
from fedfm.server.personalization import summarize

A = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
B = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"
HEAD = "base_model.model.classifier.modules_to_save.weight"


def test_each_method_names_its_personal_tensors():
    fedsa, fedper = PERSONAL_PARTS.get("fedsa"), PERSONAL_PARTS.get("fedper")
    assert [fedsa(k) for k in (A, B, HEAD)] == [False, True, False]
    assert [fedper(k) for k in (A, B, HEAD)] == [False, False, True]
    assert fedper("score.weight") and not fedper("base_model.model.scoreboard.weight")


def test_a_clients_start_and_kept_state_by_hand():
    g = {A: torch.tensor([1.0, 2.0]), B: torch.tensor([0.0, 0.0])}
    assert client_start(g, None) == g
    mine = {B: torch.tensor([5.0, -1.0])}
    start = client_start(g, mine)
    assert torch.equal(start[A], g[A]) and torch.equal(start[B], mine[B])
    delta = {A: torch.tensor([0.5, 0.5]), B: torch.tensor([1.0, 1.0])}
    assert torch.equal(kept_personal(start, delta, [B])[B], torch.tensor([6.0, 0.0]))
    fedsa = PERSONAL_PARTS.get("fedsa")
    assert list(shared_part(delta, fedsa)) == [A]
    # whatever a client sends at a personal tensor, the aggregate sees zeros there
    whole = dense_again({A: delta[A], B: torch.tensor([9.0, 9.0])}, g, fedsa)
    assert torch.equal(whole[B], torch.zeros(2)) and torch.equal(whole[A], delta[A])


def test_summaries_take_the_worst_clients_by_the_metrics_direction():
    acc = summarize([0.9, 0.5, 0.7], "a")
    assert acc["a_mean"] == pytest.approx(0.7) and acc["a_worst10"] == 0.5
    ppl = summarize([10.0, 30.0, 20.0], "p", higher_is_better=False)
    assert ppl["p_worst10"] == 30.0 and ppl["p_std"] == pytest.approx(8.1649658)


def _lines(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def personal_config(tiny_config, method, **sections):
    return make_config(
        tiny_config(
            personalization={"method": method, **sections.pop("personalization", {})},
            data={"client_test_fraction": 0.3},
            sampling={"fraction": 1.0},
            **sections,
        )
    )


@pytest.mark.parametrize("method", ["fedsa", "fedper", "fedrep", "local"])
def test_personal_tensors_stay_home_and_never_move_the_global_state(tiny_config, tmp_path, method):
    cfg = personal_config(tiny_config, method)
    plain = fedfm.run(personal_config(tiny_config, "none"), output=tmp_path / "plain", progress=False)
    result = fedfm.run(cfg, output=tmp_path / method, progress=False)
    is_personal = PERSONAL_PARTS.get(method)
    start = load_checkpoint(result.run_dir / "checkpoint").params
    from fedfm.models.state import get_trainable_state
    from fedfm.tasks.setup import build_bundle, prepare_data

    init_params = get_trainable_state(build_bundle(cfg, prepare_data(cfg).train.label_names).trainable)
    keys = [k for k in start if is_personal(k)]
    assert keys and all(torch.equal(start[k], init_params[k]) for k in keys)  # the global part never moved
    store = ClientStore(result.run_dir / "checkpoint").all()
    assert set(store) == set(range(cfg.partition.num_clients))
    own = [store[k]["personal"] for k in store]
    assert all(set(p) == set(keys) for p in own)
    assert any(not torch.equal(p[k], start[k]) for p in own for k in keys)  # each trained its own
    rounds = [r for r in _lines(result.run_dir) if r.get("event") == "round" and r["round"] > 0]
    plain_rounds = [r for r in _lines(plain.run_dir) if r.get("event") == "round" and r["round"] > 0]
    assert rounds[-1]["bytes_up"] < plain_rounds[-1]["bytes_up"]  # the personal tensors do not travel
    final = rounds[-1]
    for name in ("global", "personal"):
        assert 0 <= final[f"{name}_local_accuracy_worst10"] <= final[f"{name}_local_accuracy_mean"] <= 1
    assert (result.run_dir / "personal" / "client-0" / "adapter_config.json").is_file()
    report = (result.run_dir / "report.html").read_text()
    assert "Personalization: every client on its own test split" in report
    assert (result.run_dir / "personal.png").is_file()


def test_a_resumed_run_continues_with_every_clients_personal_state(tiny_config, tmp_path):
    whole = fedfm.run(personal_config(tiny_config, "fedsa"), output=tmp_path / "whole", progress=False)
    fedfm.run(
        personal_config(tiny_config, "fedsa", run={"rounds": 1}), output=tmp_path / "part", progress=False
    )
    resumed = fedfm.run(resume=tmp_path / "part", overrides=["run.rounds=2"], progress=False)
    a, b = (ClientStore(r.run_dir / "checkpoint").all() for r in (whole, resumed))
    for k in a:
        for key, t in a[k]["personal"].items():
            torch.testing.assert_close(b[k]["personal"][key], t)
    key = "personal_local_accuracy_mean"
    assert resumed.final_metrics[key] == pytest.approx(whole.final_metrics[key])


def test_local_fine_tuning_after_fl_is_scored_per_client(tiny_config, tmp_path):
    cfg = personal_config(tiny_config, "none", personalization={"finetune_steps": 3}, run={"rounds": 1})
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    event = next(r for r in _lines(result.run_dir) if r.get("event") == "personalization")
    assert event["finetune_steps"] == 3 and 0 <= event["finetuned_local_accuracy_mean"] <= 1
    assert len(event["finetuned_by_client"]) == cfg.partition.num_clients
    assert "Local fine-tuning after FL" in (result.run_dir / "report.html").read_text()


@pytest.mark.parametrize(
    "sections, field",
    [
        ({"peft": {"method": "head"}}, "peft.method"),
        ({"strategy": {"objective": "scaffold"}}, "scaffold"),
        ({"data": {"client_test_fraction": 0.0}}, "client_test_fraction"),
    ],
)
def test_personalization_refuses_what_it_cannot_run(tiny_config, sections, field):
    raw = tiny_config(personalization={"method": "fedsa"}, data={"client_test_fraction": 0.3})
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    with pytest.raises(ConfigError, match=field):
        make_config(raw)


def test_fedrep_trains_the_head_alone_then_the_body_alone(tiny_config):
    """Phase by phase on the tiny model: the head phase moves only the head, the body phase only
    the body, and the update is their sum."""
    from fedfm.algorithms.objectives import Objective
    from fedfm.algorithms.personal import PersonalSpec
    from fedfm.client.program import ClientJob, fedrep_update
    from fedfm.models.state import get_trainable_state
    from fedfm.tasks.setup import build_task, prepare_data
    from fedfm.types import RoundContext

    cfg = personal_config(tiny_config, "fedrep")
    data = prepare_data(cfg)
    bundle, task = build_task(cfg, data)
    start = get_trainable_state(bundle.trainable)
    job, ctx = ClientJob(0, data.client_train[0]), RoundContext(round=1, seed=0)
    spec = PersonalSpec("fedrep", head_steps=2)
    one_step = cfg.training.model_copy(update={"local_steps": 1})
    update, _ = fedrep_update(bundle, task, job, start, ctx, one_step, Objective("plain"), spec)
    is_head = PERSONAL_PARTS.get("fedrep")
    assert any(float(v.abs().max()) > 0 for k, v in update.delta.items() if is_head(k))
    assert any(float(v.abs().max()) > 0 for k, v in update.delta.items() if not is_head(k))
    assert "head_train_loss" in update.metrics
    assert all(p.requires_grad for p in bundle.trainable.values())  # nothing left frozen


def test_ditto_keeps_a_whole_personal_adapter_pulled_towards_the_global_one(tiny_config, tmp_path):
    from fedfm.algorithms.personal import PersonalSpec
    from fedfm.client.program import ClientJob, ditto_personal
    from fedfm.models.state import get_trainable_state
    from fedfm.tasks.setup import build_task, prepare_data
    from fedfm.types import RoundContext

    cfg = personal_config(tiny_config, "ditto")
    data = prepare_data(cfg)
    bundle, task = build_task(cfg, data)
    w = get_trainable_state(bundle.trainable)
    far = {k: v + 1.0 for k, v in w.items()}  # a personal adapter far from the global state
    job, ctx = ClientJob(0, data.client_train[0]), RoundContext(round=1, seed=0)

    def distance(lam):
        v = ditto_personal(
            bundle, task, job, far, w, ctx, cfg.training, PersonalSpec("ditto", lam=lam, personal_steps=3)
        )
        return sum(float((v[k] - w[k]).pow(2).sum()) for k in w)

    assert distance(5.0) < distance(0.0)  # λ pulls the personal adapter towards the global one
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    store = ClientStore(result.run_dir / "checkpoint").all()
    assert all(set(store[k]["personal"]) == set(w) for k in store)  # a whole second adapter
    final = load_checkpoint(result.run_dir / "checkpoint").params
    assert any(not torch.equal(store[0]["personal"][k], final[k]) for k in final)  # its own, not the global
    rounds = [r for r in _lines(result.run_dir) if r.get("event") == "round"]
    assert 0 <= rounds[-1]["personal_local_accuracy_worst10"] <= rounds[-1]["personal_local_accuracy_mean"]


# ---------------------------------------------------------------- IFCA (clustered FL)


def test_cluster_choice_and_state_by_hand():
    import numpy as np

    from fedfm.algorithms.clusters import (
        as_cluster,
        choose_cluster,
        cluster_update,
        cluster_view,
        combine,
        num_clusters,
        stack_clusters,
    )

    params = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}
    stacked = stack_clusters(params, 3)
    assert num_clusters(stacked) == 3 and set(stacked) == {f"cluster{j}/{k}" for j in range(3) for k in "wb"}
    stacked["cluster1/w"] += 1
    assert torch.equal(cluster_view(stacked, 1)["w"], torch.tensor([2.0, 3.0]))
    assert torch.equal(cluster_view(stacked, 0)["w"], params["w"])  # copies, not views
    assert choose_cluster([0.5, 0.2, 0.9], np.random.default_rng(0)) == 1
    ties = {choose_cluster([0.3, 0.3, 0.3], np.random.default_rng(s)) for s in range(20)}
    assert ties == {0, 1, 2}  # all equal (the first round): a random initial assignment
    sent = {**as_cluster({"w": torch.ones(2), "b": torch.ones(1)}, 2), "cluster0/w": torch.full((2,), 9.0)}
    whole = cluster_update(sent, stacked, 2)
    assert torch.equal(whole["cluster2/w"], torch.ones(2)) and torch.equal(
        whole["cluster0/w"], torch.zeros(2)
    )
    merged = combine({2: whole}, stacked)
    assert torch.equal(merged["cluster2/b"], torch.ones(1)) and torch.equal(
        merged["cluster1/w"], torch.zeros(2)
    )


def test_the_server_averages_each_cluster_over_its_own_clients_and_rejects_a_bad_index():
    from fedfm.server.round import ServerRound
    from fedfm.transforms.personal import Clusters
    from fedfm.types import Aggregate, ClientResult, Update

    params = {"cluster0/w": torch.zeros(2), "cluster1/w": torch.zeros(2)}
    rnd = ServerRound(1, [0, 1, 2, 3, 4], 0, params, None, lambda c: params, 100)

    def result(client, cluster, delta, n):
        return ClientResult(client, update=Update(delta, n, {"cluster": cluster, "train_loss": 1.0}))

    arriving = [
        result(0, 0, {"cluster0/w": torch.ones(2)}, 1),
        result(1, 0, {"cluster0/w": torch.full((2,), 3.0)}, 3),
        result(2, 1, {"cluster1/w": torch.full((2,), 2.0)}, 1),
        result(3, 5, {"cluster1/w": torch.ones(2)}, 1),  # no such cluster
        # a client of cluster 1 that also writes into cluster 0
        result(4, 1, {"cluster1/w": torch.ones(2), "cluster0/w": torch.full((2,), 100.0)}, 1),
    ]

    def weighted_mean(items):
        items = list(items)
        total = sum(r.update.num_examples for r in items)
        return Aggregate(
            {k: sum(r.update.delta[k] * r.update.num_examples for r in items) / total for k in params}
        )

    stream, reduce = Clusters(2).server(iter(arriving), rnd, weighted_mean)
    aggregate = reduce(stream)
    assert torch.allclose(aggregate.delta["cluster0/w"], torch.full((2,), 2.5))  # (1·1 + 3·3) / 4
    assert torch.allclose(aggregate.delta["cluster1/w"], torch.full((2,), 2.0))
    assert rnd.tally.rejected == [
        {"client": 3, "reason": "cluster index 5 is not one of 0..1"},
        {"client": 4, "reason": "the update does not hold exactly cluster 1's tensors"},
    ]


def test_ifca_trains_k_cluster_models_and_resumes(tiny_config, tmp_path):
    cfg = personal_config(tiny_config, "ifca", personalization={"clusters": 2}, run={"rounds": 2})
    whole = fedfm.run(cfg, output=tmp_path / "whole", progress=False)
    params = load_checkpoint(whole.run_dir / "checkpoint").params
    assert {k.split("/")[0] for k in params} == {"cluster0", "cluster1"}
    rounds = [r for r in _lines(whole.run_dir) if r.get("event") == "round" and r["round"] > 0]
    clients = [r for r in _lines(whole.run_dir) if r.get("event") == "client"]
    assert all(sum(r["cluster_sizes"]) == r["num_clients"] for r in rounds)
    assert {c["cluster"] for c in clients} <= {0, 1} and all("cluster_loss" in c for c in clients)
    assert len(rounds[-1]["test_accuracy_by_cluster"]) == 2
    final = rounds[-1]
    assert 0 <= final["personal_local_accuracy_worst10"] <= final["personal_local_accuracy_mean"] <= 1
    assignment = json.loads((whole.run_dir / "clusters" / "assignment.json").read_text())
    assert set(assignment) == {str(k) for k in range(cfg.partition.num_clients)}
    assert all(
        (whole.run_dir / "clusters" / f"cluster-{j}" / "adapter_config.json").is_file() for j in (0, 1)
    )
    assert (whole.run_dir / "adapter" / "adapter_config.json").is_file()
    fedfm.run(
        personal_config(tiny_config, "ifca", personalization={"clusters": 2}, run={"rounds": 1}),
        output=tmp_path / "part",
        progress=False,
    )
    resumed = fedfm.run(resume=tmp_path / "part", overrides=["run.rounds=2"], progress=False)
    again = load_checkpoint(resumed.run_dir / "checkpoint").params
    for key, t in params.items():
        torch.testing.assert_close(again[key], t)


@pytest.mark.parametrize(
    "sections, field",
    [
        ({"secagg": {"enabled": True}}, "reveals each client's cluster"),
        ({"task": {"baselines": True}}, "task.baselines"),
    ],
)
def test_ifca_refuses_secure_aggregation_and_baselines(tiny_config, sections, field):
    raw = tiny_config(personalization={"method": "ifca"}, data={"client_test_fraction": 0.3}, **sections)
    with pytest.raises(ConfigError, match=field):
        make_config(raw)


# ---------------------------------------------------------------- privacy over the shared part


def _init_params(cfg):
    from fedfm.models.state import get_trainable_state
    from fedfm.tasks.setup import build_bundle, prepare_data

    return get_trainable_state(build_bundle(cfg, prepare_data(cfg).train.label_names).trainable)


@pytest.mark.parametrize("noise", ["central", "distributed", "dp-sgd"])
def test_dp_and_secure_aggregation_cover_only_the_shared_part(tiny_config, tmp_path, noise):
    dp = {"dp": "client", "noise_multiplier": 0.5, "clip_norm": 0.5, "noise": noise, "noise_seed": 1}
    if noise == "dp-sgd":  # example-level: the personal B trains with DP-SGD too, and stays home
        dp = {"dp": "example", "noise_multiplier": 1.0, "clip_norm": 1.0, "noise_seed": 1}
    secure = (
        {"secagg": {"enabled": True, "neighbors": 2, "clip_range": 2.0}} if noise == "distributed" else {}
    )
    sections = {"privacy": dp, "strategy": {"weighting": "uniform"}, "run": {"rounds": 2}, **secure}
    cfg = personal_config(tiny_config, "fedsa", **sections)
    result = fedfm.run(cfg, output=tmp_path / "fedsa", progress=False)
    rounds = [r for r in _lines(result.run_dir) if r.get("event") == "round" and r["round"] > 0]
    assert all("skipped" not in r for r in rounds) and rounds[-1]["epsilon"] > 0
    final, start = load_checkpoint(result.run_dir / "checkpoint").params, _init_params(cfg)
    personal = [k for k in final if lora_b(k)]
    assert personal and all(torch.equal(final[k], start[k]) for k in personal)  # no noise landed there
    assert all(not torch.equal(final[k], start[k]) for k in final if not lora_b(k))  # the shared part moved
    if noise == "distributed":  # the Skellam vector is the shared part's: the B matrices are not in it
        ledger = load_checkpoint(result.run_dir / "checkpoint").privacy["ledger"]
        plain = fedfm.run(make_config({**cfg.model_dump(), "personalization": {"method": "none"}}),
                          output=tmp_path / "plain", progress=False)  # fmt: skip
        everything = load_checkpoint(plain.run_dir / "checkpoint").privacy["ledger"]
        assert ledger[0]["mechanism"] == "skellam" and ledger[0]["l1"] < everything[0]["l1"]
        report = rounds[-1]["secagg"]
        assert (
            report
            and rounds[-1]["bytes_up"]
            < [r for r in _lines(plain.run_dir) if r.get("round") == 2][0]["bytes_up"]
        )


def test_personal_methods_refuse_what_their_privacy_cannot_cover(tiny_config):
    raw = tiny_config(
        personalization={"method": "fedrep"},
        data={"client_test_fraction": 0.3},
        privacy={"dp": "example", "noise_multiplier": 1.0},
    )
    with pytest.raises(ConfigError, match="not DP-SGD steps"):
        make_config(raw)
    raw = tiny_config(
        personalization={"method": "local"}, data={"client_test_fraction": 0.3}, secagg={"enabled": True}
    )
    with pytest.raises(ConfigError, match="sends nothing"):
        make_config(raw)


# ---------------------------------------------------------------- personal state on the batched engine


@pytest.fixture(scope="module")
def still_bert(tmp_path_factory):
    """The tiny BERT without dropout of its own: a grouped client then computes what it does alone."""
    from conftest import save_tiny_bert

    return save_tiny_bert(
        tmp_path_factory.mktemp("still"), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )


@pytest.mark.parametrize("method", ["fedsa", "ifca"])
def test_the_batched_engine_carries_personal_state_as_the_in_process_one(
    tiny_config, still_bert, tmp_path, method
):
    from test_ray_engine import assert_same_run

    extra = {"personalization": {"method": method}, "model": {"name": str(still_bert), "max_length": 16}}
    single = fedfm.run(personal_config(tiny_config, method, **extra), output=tmp_path / "one", progress=False)
    grouped_cfg = personal_config(
        tiny_config, method, run={"engine": "batched"}, batched={"clients_per_group": 3}, **extra
    )
    grouped = fedfm.run(grouped_cfg, output=tmp_path / "grouped", progress=False)
    if method == "fedsa":  # the same global state and every client's personal B
        assert_same_run(single, grouped)
        assert all("personal" in s for s in ClientStore(grouped.run_dir / "checkpoint").all().values())
    else:  # each client picked the same cluster and trained it as it does alone
        a, b = (load_checkpoint(r.run_dir / "checkpoint").params for r in (single, grouped))
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)
        clusters = [
            [c["cluster"] for c in _lines(r.run_dir) if c.get("event") == "client"] for r in (single, grouped)
        ]
        assert clusters[0] == clusters[1]


@pytest.mark.parametrize("method", ["fedrep", "ditto"])
def test_two_phase_methods_refuse_the_batched_engine(tiny_config, method):
    raw = tiny_config(
        personalization={"method": method}, data={"client_test_fraction": 0.3}, run={"engine": "batched"}
    )
    with pytest.raises(ConfigError, match="two phases"):
        make_config(raw)


@pytest.mark.parametrize(
    "method, sections",
    [
        (
            "fedsa",
            {"strategy": {"objective": "fedprox", "mu": 0.01, "server_optimizer": "adam", "server_lr": 0.01}},
        ),  # fmt: skip
        ("ifca", {"strategy": {"aggregator": "median"}}),
        ("fedper", {"compression": {"method": "topk", "ratio": 0.5}}),
        ("ifca", {"compression": {"method": "q8"}}),
        ("ditto", {"strategy": {"aggregator": "trimmed_mean", "trim_ratio": 0.2}}),
    ],
    ids=["fedsa-fedprox-fedadam", "ifca-median", "fedper-topk", "ifca-q8", "ditto-trimmed-mean"],
)
def test_methods_compose_with_the_existing_strategies(tiny_config, tmp_path, method, sections):
    cfg = personal_config(tiny_config, method, run={"rounds": 2}, **sections)
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    rounds = [r for r in _lines(result.run_dir) if r.get("event") == "round" and r["round"] > 0]
    assert all(r["num_clients"] == cfg.partition.num_clients and not r["rejected"] for r in rounds)
    assert 0 <= rounds[-1]["personal_local_accuracy_mean"] <= 1


def test_the_cli_runs_a_personalization_method(tiny_config, tmp_path):
    import subprocess
    import sys

    import tomli_w

    path = tmp_path / "exp.toml"
    raw = tiny_config(run={"rounds": 1}, data={"client_test_fraction": 0.3})
    path.write_text(tomli_w.dumps(raw))
    done = subprocess.run(
        [sys.executable, "-m", "fedfm.cli", "run", str(path), "--output", str(tmp_path / "r"), "--set",
         "personalization.method=ifca", "--set", "personalization.clusters=2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "own" in done.stdout and "worst10" in done.stdout  # the console shows the clients' own scores
    assert (tmp_path / "r" / "clusters" / "assignment.json").is_file()


def test_ifca_rejects_a_hostile_cluster_index_or_a_partial_update_and_survives_nan_losses():
    import numpy as np

    from fedfm.algorithms.clusters import choose_cluster, cluster_index
    from fedfm.server.round import ServerRound
    from fedfm.transforms.personal import Clusters
    from fedfm.types import Aggregate, ClientResult, Update

    assert [cluster_index(v, 3) for v in (0, 2.0, True, float("nan"), float("inf"), 1.5, "1", 3, -1)] == [
        0, 2, None, None, None, None, None, None, None,
    ]  # fmt: skip
    assert choose_cluster([float("nan"), 0.4, 0.2], np.random.default_rng(0)) == 2
    assert choose_cluster([float("nan")] * 3, np.random.default_rng(0)) in (0, 1, 2)
    params = {"cluster0/w": torch.zeros(2), "cluster0/b": torch.zeros(1), "cluster1/w": torch.zeros(2),
              "cluster1/b": torch.zeros(1)}  # fmt: skip
    rnd = ServerRound(1, [0, 1, 2, 3], 0, params, None, lambda c: params, 100)
    arriving = [
        ClientResult(
            0, update=Update({"cluster0/w": torch.ones(2), "cluster0/b": torch.ones(1)}, 1, {"cluster": 0})
        ),
        ClientResult(1, update=Update({}, 10**6, {"cluster": 0})),  # nothing, with a huge weight
        ClientResult(2, update=Update({"cluster1/w": torch.ones(2)}, 1, {"cluster": 1})),  # b missing
        ClientResult(3, update=Update({"cluster1/w": torch.ones(2)}, 1, {"cluster": float("nan")})),
    ]
    stream, reduce = Clusters(2).server(
        iter(arriving), rnd, lambda items: Aggregate(list(items)[0].update.delta)
    )
    assert torch.equal(reduce(stream).delta["cluster0/w"], torch.ones(2))
    assert [r["client"] for r in rnd.tally.rejected] == [1, 2, 3]


@pytest.mark.parametrize(
    "sections, field",
    [
        ({"strategy": {"server_optimizer": "adam"}}, "server_optimizer"),
        ({"strategy": {"aggregator": "krum", "byzantine": 0}}, "minimum cohort"),
        ({"attack": {"kind": "alie", "fraction": 0.25}}, "crafts"),
    ],
)
def test_ifca_refuses_what_would_move_or_stall_a_cluster(tiny_config, sections, field):
    raw = tiny_config(personalization={"method": "ifca"}, data={"client_test_fraction": 0.3}, **sections)
    with pytest.raises(ConfigError, match=field):
        make_config(raw)
