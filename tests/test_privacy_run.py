"""Whole runs with differential privacy and secure aggregation on the tiny model."""

import json

import pytest
import torch

import fedfm
from fedfm.algorithms.aggregators import weighted_mean
from fedfm.config import make_config
from fedfm.server.checkpoint import load_checkpoint


def records(run_dir, event="round"):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["event"] == event]


DP = {"dp": "client", "noise_multiplier": 1.0, "clip_norm": 0.5}


def test_secure_aggregation_gives_the_plain_weighted_mean(tiny_config, tmp_path):
    plain = fedfm.run(tiny_config(run={"rounds": 2}), output=tmp_path / "plain", progress=False)
    cfg = tiny_config(run={"rounds": 2}, secagg={"enabled": True, "quantization_bits": 30, "clip_range": 4.0})
    secure = fedfm.run(cfg, output=tmp_path / "secure", progress=False)
    a = load_checkpoint(plain.run_dir / "checkpoint").params
    b = load_checkpoint(secure.run_dir / "checkpoint").params
    for k in a:  # equal up to fixed-point error (step 4 / 2^29 per entry and round)
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    last = records(secure.run_dir)[-1]
    assert last["num_clients"] == 4 and last["secagg"]["bytes_up"] > 0
    assert last["train_loss"] == pytest.approx(records(plain.run_dir)[-1]["train_loss"], abs=1e-4)
    clients = records(secure.run_dir, "client")
    assert all(set(c) == {"event", "round", "client", "num_examples"} for c in clients)


def test_secure_aggregation_round_fails_cleanly_when_too_many_drop(tiny_config, tmp_path):
    from fedfm.engines.inprocess import InProcessEngine

    original = InProcessEngine.run_cohort

    def flaky(self, params, cohort, ctx):  # all but one client fail after keys were shared
        for i, result in enumerate(original(self, params, cohort, ctx)):
            if i == 0:
                yield result
            else:
                from fedfm.types import ClientFailure, ClientResult

                c = result.client_id
                yield ClientResult(c, failure=ClientFailure(c, "train", "network cut"))

    from fedfm.server.driver import RunFailedError

    InProcessEngine.run_cohort = flaky
    try:
        cfg = tiny_config(run={"rounds": 2}, secagg={"enabled": True})
        with pytest.raises(RunFailedError) as failed:  # no round delivered: the run says so
            fedfm.run(cfg, output=tmp_path / "r", progress=False)
        result = failed.value.result
    finally:
        InProcessEngine.run_cohort = original
    rounds = records(result.run_dir)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all("secure aggregation failed" in r["skipped"] for r in rounds[1:])
    assert "only 1 responded" in rounds[1]["skipped"]


def test_client_dp_reports_epsilon_every_round_and_resumes_to_the_same(tiny_config, tmp_path):
    cfg = tiny_config(run={"rounds": 3}, strategy={"weighting": "uniform"}, privacy={**DP, "noise_seed": 3})
    full = fedfm.run(cfg, output=tmp_path / "full", progress=False)
    rounds = records(full.run_dir)
    eps = [r["epsilon"] for r in rounds]
    assert eps[0] == 0 and eps[1] < eps[2] < eps[3]
    assert all(r["delta"] == 1e-5 and r["noise_multiplier"] == 1.0 for r in rounds)
    short = fedfm.run({**cfg, "run": {**cfg["run"], "rounds": 1}}, output=tmp_path / "p", progress=False)
    resumed = fedfm.run(resume=short.run_dir, overrides=["run.rounds=3"], progress=False)
    assert [r["epsilon"] for r in records(resumed.run_dir)] == eps
    assert resumed.final_metrics["test_loss"] == full.final_metrics["test_loss"]
    assert "client-level" in (full.run_dir / "report.html").read_text()


def test_target_epsilon_calibrates_noise_and_the_budget_stops_the_run(tiny_config, tmp_path):
    cfg = tiny_config(
        run={"rounds": 3},
        strategy={"weighting": "uniform"},
        privacy={"dp": "client", "target_epsilon": 8.0},
    )
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    last = records(result.run_dir)[-1]
    assert last["epsilon"] == pytest.approx(8.0, rel=1e-3) and last["epsilon"] <= 8.0
    z = last["noise_multiplier"]
    # the same budget with more rounds: the calibrated z no longer fits, the run stops at round 3
    resumed = fedfm.run(resume=result.run_dir, overrides=["run.rounds=5"], progress=False)
    assert resumed.stopped and "privacy budget" in resumed.stopped
    assert records(resumed.run_dir, "stopped")[0]["round"] == 3
    assert load_checkpoint(result.run_dir / "checkpoint").round == 3
    assert z > 0


def test_dp_and_secagg_compose_with_distributed_noise(tiny_config, tmp_path):
    cfg = tiny_config(
        run={"rounds": 2},
        strategy={"weighting": "uniform", "server_optimizer": "adam", "server_lr": 0.01},
        # seeded: the clipped count's Skellam noise is an integer, so with an unseeded run the noised
        # fraction can land exactly on the target quantile and leave C where it was (1 run in ~8)
        privacy={
            **DP,
            "noise": "distributed",
            "adaptive_clipping": True,
            "clipped_count_stddev": 1.0,
            "noise_seed": 3,
        },
        secagg={"enabled": True, "neighbors": 2, "clip_range": 2.0},
    )
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    rounds = records(result.run_dir)
    assert all("skipped" not in r for r in rounds[1:])
    assert rounds[-1]["clip_norm"] != 0.5  # adaptive clipping moved C
    assert rounds[-1]["epsilon"] > 0


def test_zero_noise_dp_is_the_clipped_mean(tiny_config, tmp_path):
    from fedfm.privacy.dp import clip

    # z = 0 and a huge C: DP-FedAvg reduces to the uniform mean (denominator m = cohort)
    cfg = tiny_config(
        run={"rounds": 1},
        strategy={"weighting": "uniform"},
        privacy={"dp": "client", "noise_multiplier": 0.0, "clip_norm": 1e6},
    )
    dp_run = fedfm.run(cfg, output=tmp_path / "dp", progress=False)
    plain = fedfm.run(
        tiny_config(run={"rounds": 1}, strategy={"weighting": "uniform"}),
        output=tmp_path / "p",
        progress=False,
    )
    a = load_checkpoint(dp_run.run_dir / "checkpoint").params
    b = load_checkpoint(plain.run_dir / "checkpoint").params
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert records(dp_run.run_dir)[-1]["epsilon"] is None  # ε = ∞ without noise; JSON has no inf
    assert "ε = ∞" in (dp_run.run_dir / "report.html").read_text()
    assert clip({"x": torch.tensor([3.0, 4.0])}, 1.0)[0]["x"].tolist() == pytest.approx([0.6, 0.8])
    assert weighted_mean([({"x": torch.ones(1)}, 1.0)])["x"].item() == 1.0


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"privacy": {"dp": "client", "noise_multiplier": 1.0}}, "weighting = 'uniform'"),
        ({"privacy": {"dp": "client"}, "strategy": {"weighting": "uniform"}}, "noise_multiplier or"),
        (
            {
                "privacy": {"dp": "client", "noise_multiplier": 1, "noise": "distributed"},
                "strategy": {"weighting": "uniform"},
            },
            "needs secagg.enabled",
        ),
        ({"secagg": {"enabled": True}, "strategy": {"aggregator": "median"}}, "robust rules"),
        ({"secagg": {"enabled": True}, "compression": {"method": "q8"}}, "compression.method"),
        ({"secagg": {"enabled": True}, "attack": {"kind": "sign_flip"}}, "data attacks"),
        ({"privacy": {"accountant": "pld"}}, "poisson"),
    ],
)
def test_privacy_config_errors_name_the_field(tiny_config, sections, message):
    with pytest.raises(fedfm.ConfigError, match=message):
        make_config(tiny_config(**sections))
