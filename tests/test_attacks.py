"""Attack simulation and always-on validation: no malformed update crashes a round or moves θ."""

import json
import math

import pytest
import torch

import fedfm
from fedfm.attacks import AttackPlan, alie_delta, alie_z, attack_results, corrupt_update, plan_round
from fedfm.config import AttackSection, make_config
from fedfm.types import ClientResult, Update


def test_plan_is_seeded_and_sized():
    cfg = AttackSection(kind="scale", fraction=0.2)
    a = plan_round(cfg, list(range(15)), seed=0, round_=1)
    assert len(a.malicious) == 3 and a.malicious <= set(range(15))
    assert a == plan_round(cfg, list(range(15)), seed=0, round_=1)
    assert plan_round(AttackSection(kind="none"), [1, 2], 0, 1) is None


def test_update_attacks_hand_checked():
    u = Update({"w": torch.tensor([1.0, -2.0])}, 10)
    plan = AttackPlan("sign_flip", frozenset({0}), scale=3.0)
    assert corrupt_update(plan, u, 0, 1, 0).delta["w"].tolist() == [-3.0, 6.0]
    assert corrupt_update(AttackPlan("scale", frozenset(), scale=3.0), u, 0, 1, 0).delta["w"].tolist() == [
        3.0,
        -6.0,
    ]
    assert torch.isnan(corrupt_update(AttackPlan("nan", frozenset()), u, 0, 1, 0).delta["w"]).all()
    assert corrupt_update(AttackPlan("wrong_shape", frozenset()), u, 0, 1, 0).delta["w"].shape == (3,)


def test_alie_sends_mean_minus_z_std():
    # n = 10, f = 2: s = floor(6) - 2 = 4, z = Φ⁻¹(6/10) ≈ 0.2533
    assert alie_z(10, 2) == pytest.approx(0.2533, abs=1e-4)
    out = alie_delta([{"w": torch.tensor([0.0])}, {"w": torch.tensor([2.0])}], 10, 2)
    assert out["w"].item() == pytest.approx(1.0 - alie_z(10, 2) * 1.0, rel=1e-5)
    results = [ClientResult(i, Update({"w": torch.tensor([float(i)])}, 1)) for i in range(4)]
    plan = AttackPlan("alie", frozenset({1, 3}))
    out = list(attack_results(iter(results), plan, 4, 0, 1))
    assert [r.client_id for r in out] == [0, 2, 1, 3]  # attackers answer after seeing their own updates
    assert out[2].update.delta["w"].item() == out[3].update.delta["w"].item()


@pytest.mark.parametrize("kind", ["nan", "inf", "wrong_shape"])
def test_malformed_updates_are_rejected_and_the_round_goes_on(tiny_config, tmp_path, kind):
    cfg = tiny_config(attack={"kind": kind, "fraction": 0.25}, run={"rounds": 2})
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    rounds = [r for r in result.history if r["round"] > 0]
    for r in rounds:
        assert len(r["rejected"]) == 1 and r["rejected"][0]["client"] == r["malicious"][0]
        assert r["num_clients"] == 3 and "skipped" not in r
    assert all(math.isfinite(r["test_loss"]) for r in rounds)
    assert "rejected" in (result.run_dir / "report.html").read_text()


def test_norm_bound_validation_and_every_client_rejected_means_no_state_change(tiny_config, tmp_path):
    from fedfm.models.state import get_trainable_state
    from fedfm.server.checkpoint import load_checkpoint
    from fedfm.server.driver import RunFailedError
    from fedfm.tasks.setup import build_task, prepare_data

    cfg = tiny_config(validation={"max_update_norm": 1e-9}, run={"rounds": 1})
    with pytest.raises(RunFailedError) as failed:  # every update rejected in every round
        fedfm.run(cfg, output=tmp_path / "r", progress=False)
    result = failed.value.result
    last = result.history[-1]
    assert last["num_clients"] == 0 and len(last["rejected"]) == 4 and "skipped" in last
    assert all("exceeds validation.max_update_norm" in r["reason"] for r in last["rejected"])
    rc = make_config(cfg)
    initial = get_trainable_state(build_task(rc, prepare_data(rc))[0].trainable)
    params = load_checkpoint(result.run_dir / "checkpoint").params
    assert all(torch.equal(params[k], initial[k]) for k in initial)


def test_implausible_example_count_is_rejected():
    from fedfm.transforms.validation import update_problem

    ref = {"w": torch.zeros(2)}
    assert "implausible" in update_problem(Update({"w": torch.ones(2)}, 10**9), ref, max_examples=1000)


@pytest.mark.parametrize("kind", ["label_flip", "sign_flip", "scale", "gaussian", "alie"])
def test_every_attack_runs_with_a_robust_rule(tiny_config, tmp_path, kind):
    cfg = tiny_config(
        attack={"kind": kind, "fraction": 0.2},
        partition={"num_clients": 6},
        strategy={"aggregator": "krum", "byzantine": 1},
        run={"rounds": 1},
        eval={"at_start": False},
    )
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    assert result.history[-1]["num_clients"] == 6 and len(result.history[-1]["malicious"]) == 2


def test_backdoor_reports_attack_success_rate(tiny_config, tmp_path):
    cfg = tiny_config(attack={"kind": "backdoor", "fraction": 0.5, "target_label": 1}, run={"rounds": 2})
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    asr = result.final_metrics["attack_success_rate"]
    assert 0 <= asr <= 1
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("attack_success_rate" in r for r in lines if r["event"] == "round")


def test_cohort_too_small_for_the_rule_is_refused_before_work(tiny_config, tmp_path):
    cfg = tiny_config(strategy={"aggregator": "bulyan", "byzantine": 1})
    with pytest.raises(fedfm.ConfigError, match="needs at least 7 clients per round; the cohort is 4"):
        fedfm.run(cfg, output=tmp_path / "r", progress=False)
    with pytest.raises(fedfm.ConfigError, match="target_label"):
        fedfm.run(
            tiny_config(attack={"kind": "backdoor", "target_label": 9}), output=tmp_path / "b", progress=False
        )
