"""fedfm audit: the scores and bounds by hand, each attack both ways (it works in its best case,
is stopped where the defense says), and the command on a run folder and on a config."""

from __future__ import annotations

import json
import math
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedfm.audit.epsilon import (
    andrew_estimate,
    epsilon_lower_bound,
    gaussians_epsilon,
    gdp_epsilon,
    one_run_lower_bound,
)
from fedfm.audit.labels import label_counts
from fedfm.audit.scores import auc, best_rouge_l, label_count_error, lcs_length, rouge_l, tpr_at_fpr
from fedfm.audit.span import row_space, span_distance

# ---------------------------------------------------------------- scores, by hand


def test_rouge_l_by_hand():
    assert lcs_length("abcbdab", "bdcaba") == 4  # the textbook pair (Cormen et al.)
    # reference a b c d, candidate a c e: LCS 2, P = 2/3, R = 2/4, F = 2PR/(P+R) = 4/7
    assert rouge_l("abcd", "ace") == pytest.approx(4 / 7)
    assert rouge_l("abc", "abc") == 1.0
    assert rouge_l("abc", "") == 0.0
    # the mean over references of the best candidate: 1.0 for "ab", 0 for "xy"
    assert best_rouge_l(["ab", "xy"], ["ab", "b"]) == pytest.approx(0.5)


def test_auc_and_tpr_by_hand():
    assert auc([3, 4], [1, 2]) == 1.0
    assert auc([1, 2], [3, 4]) == 0.0
    # pairs (m, n): (2,1) win, (2,2) tie ½, (0,1) loss, (0,2) loss → 1.5 / 4
    assert auc([2, 0], [1, 2]) == pytest.approx(0.375)
    nonmembers = np.arange(100.0)  # 1% FPR allows one non-member above the threshold: τ = 98
    assert tpr_at_fpr([99.5, 98.5, 97.0, 50.0], nonmembers, 0.01) == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    same = rng.normal(size=4000)
    assert abs(auc(same[:2000], same[2000:]) - 0.5) < 0.03  # no signal, AUC ½


def test_label_count_error_by_hand():
    assert label_count_error([2, 1, 0], [2, 1, 0]) == 0.0
    assert label_count_error([2, 1, 0], [1, 1, 1]) == pytest.approx(2 / 3)  # one label moved, counted twice


def test_label_counts_exact_for_one_sgd_step_with_the_true_mean_prediction():
    """A softmax head, one SGD step on a batch's mean cross-entropy: the bias update and the
    batch's mean prediction give the label counts exactly."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 4)
    x, y = torch.randn(6, 8), torch.tensor([0, 0, 2, 3, 3, 3])
    start = head.bias.detach().clone()
    probs = torch.softmax(head(x), -1).mean(0).detach()
    torch.nn.functional.cross_entropy(head(x), y).backward()
    lr = 0.5
    with torch.no_grad():
        head.bias -= lr * head.bias.grad
    counts = label_counts((head.bias - start).detach().numpy(), lr, 6, probs.numpy())
    np.testing.assert_allclose(counts, [2, 0, 1, 3], atol=1e-5)


def test_span_distance_separates_inside_from_outside():
    torch.manual_seed(0)
    inputs = torch.randn(5, 64)
    grad = torch.randn(32, 5) @ inputs  # Σ_t δ_t x_tᵀ: rows in span{x_t}
    basis = row_space(grad)
    assert len(basis) == 5
    assert span_distance(inputs, basis).max() < 1e-6  # float32 products
    outside = span_distance(torch.randn(200, 64), basis)
    assert outside.min() > 0.8  # √(1 − 5/64) ≈ 0.96 for a random vector
    assert len(row_space(grad, max_rank=3)) == 3


# ---------------------------------------------------------------- ε bounds, by hand


def test_one_run_bound_needs_the_documented_number_of_perfect_guesses():
    """ln 20 / ln(1 + e^−ε) perfectly guessed canaries exceed ε at 95%: 24 at ε = 2, 166 at ε = 4."""
    for eps, needed in ((2.0, 24), (4.0, 166)):
        assert math.ceil(math.log(20) / math.log(1 + math.exp(-eps))) == needed
        assert epsilon_lower_bound(needed, needed, 0.05) > eps
        assert epsilon_lower_bound(needed - 1, needed - 1, 0.05) < eps
    assert epsilon_lower_bound(5, 10, 0.05) == 0.0  # a coin's score rules nothing out


def test_one_run_bound_on_random_scores_is_zero_and_on_perfect_scores_is_large():
    rng = np.random.default_rng(0)
    truth = rng.random(400) < 0.5
    assert one_run_lower_bound(rng.normal(size=400), truth)["epsilon_lower_bound"] < 0.5
    perfect = one_run_lower_bound(truth.astype(float) + 0.01 * rng.normal(size=400), truth)
    assert perfect["epsilon_lower_bound"] > 3.0 and perfect["right"] == perfect["guesses"]


def test_gdp_epsilon_matches_quadrature_and_the_closed_form():
    from scipy.stats import norm

    for mu in (0.5, 1.0, 2.0):
        eps = gdp_epsilon(mu, 1e-5)
        assert eps == pytest.approx(gaussians_epsilon(mu, 1.0, 0.0, 1.0, 1e-5), rel=1e-3)
        delta = norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)
        assert delta == pytest.approx(1e-5, rel=1e-4)
    estimate = andrew_estimate([1.0, 1.2, 0.8, 1.1, 0.9], [0.0, 0.2, -0.2, 0.1, -0.1], 1e-5)
    assert estimate["gdp_mu"] == pytest.approx(1.0 / math.sqrt(0.025))


# ---------------------------------------------------------------- canaries against DP, both ways


@pytest.fixture(scope="module")
def dp_plan_factory():
    from fedfm.config import RunConfig
    from fedfm.privacy.plan import PrivacyPlan

    cfg = RunConfig.model_validate(
        {
            "run": {"rounds": 10},
            "partition": {"num_clients": 20},
            "sampling": {"method": "poisson", "fraction": 0.5},
            "strategy": {"weighting": "uniform"},
            "privacy": {"dp": "client", "target_epsilon": 2.0, "delta": 1e-5},
        }
    )
    return lambda: PrivacyPlan(cfg, 20, 10, 100_000, note=lambda _: None)


def test_canary_audit_passes_the_sound_mechanism_and_catches_a_broken_one(dp_plan_factory):
    """Reported ε = 2 with 400 canaries: the 95% lower bound stays under 2 for the mechanism as it
    runs, and exceeds 2 when the noise is divided by 10 (the ledger still charging the full z)."""
    from fedfm.audit.canaries import canary_audit

    sound = canary_audit(dp_plan_factory(), canaries=400, seed=0)
    assert sound["reported_epsilon"] == pytest.approx(2.0, abs=1e-3)
    assert sound["epsilon_lower_bound"] < sound["reported_epsilon"]
    assert not sound["bound_exceeds_reported"]
    assert sound["epsilon_estimate"] < sound["reported_epsilon"]
    broken = canary_audit(dp_plan_factory(), canaries=400, seed=0, noise_factor=0.1)
    assert broken["reported_epsilon"] == pytest.approx(sound["reported_epsilon"])
    assert broken["epsilon_lower_bound"] > broken["reported_epsilon"]
    assert broken["bound_exceeds_reported"]
    assert broken["epsilon_estimate"] > 3 * broken["reported_epsilon"]


# ---------------------------------------------------------------- inversion on MiniLM, BBC News


@pytest.fixture(scope="module")
def bbc_minilm():
    """The default experiment (MiniLM, BBC News) at 16 tokens with LoRA rank 16: B·T = 16 ≤ r."""
    from fedfm.config import RunConfig
    from fedfm.tasks.setup import build_task, prepare_data

    raw = tomllib.loads(Path("examples/default.toml").read_text())
    raw["model"]["max_length"] = 16
    raw["peft"]["r"] = 16
    raw["data"]["max_examples"] = 400
    raw["run"]["threads"] = 1
    cfg = RunConfig.model_validate(raw)
    data = prepare_data(cfg)
    bundle, task = build_task(cfg, data)
    return cfg, data, bundle, task


def test_inversion_recovers_text_in_its_best_case_and_not_under_secagg_dp_or_adamw(bbc_minilm):
    from fedfm.audit.inversion import InversionAudit, default_settings, warm_start

    cfg, data, bundle, task = bbc_minilm
    start = warm_start(bundle, task, data, cfg)
    audit = InversionAudit(cfg, bundle, task, data, start, victim=0, batch=1)
    yours, best, secagg, private = audit.run(default_settings(clients=5, epsilon=8.0))
    # the best case: one SGD step on one news snippet through LoRA's A (B·T ≤ r) gives it back
    assert best["token_recall"] >= 0.6 and best["token_precision"] >= 0.9
    assert best["rouge_l"] >= 0.6, best["recovered_text"]
    assert best["label_count_error"] < 0.1
    # the defenses the issue names, and fedfm's default optimizer
    assert secagg["rouge_l"] <= 0.2
    assert private["rouge_l"] <= 0.2
    assert yours["rouge_l"] <= 0.2  # AdamW, several steps over 20 rows: rank r cannot hold them
    assert private["label_count_error"] > 0.5


def test_round_one_gives_nothing_unless_a_malicious_server_crafts_b(bbc_minilm):
    """With B = 0 (an honest round 1) A's gradient Σ (Bᵀδ) xᵀ is zero: nothing to recover. A server
    that sends a crafted B ≠ 0 instead (it chooses θ) gets the text back from that same round."""
    from fedfm.audit.inversion import InversionAudit, Setting
    from fedfm.models.state import get_trainable_state

    cfg, data, bundle, task = bbc_minilm
    state = get_trainable_state(bundle.trainable)
    audit = InversionAudit(cfg, bundle, task, data, state, victim=0, batch=1)
    honest, malicious = audit.run(
        [Setting("round 1", best=True, start="round 1"), Setting("crafted", best=True, start="crafted")]
    )
    assert honest["span_rank"] == 0 and honest["token_recall"] == 0.0 and honest["rouge_l"] == 0.0
    assert malicious["token_recall"] >= 0.6 and malicious["rouge_l"] >= 0.6, malicious["recovered_text"]


# ---------------------------------------------------------------- membership inference, both ways


def random_label_csv(path, n=160, seed=0):
    """Texts of random words with random labels: only memorisation fits them."""
    import csv

    from tests.conftest import WORDS

    vocab = " ".join(WORDS.values()).split()
    rng = np.random.default_rng(seed)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["text", "label"])
        w.writeheader()
        for _ in range(n):
            w.writerow({"text": " ".join(rng.choice(vocab, size=10)), "label": str(rng.integers(2))})
    return path


def membership_config(model_dir, csv_path, **privacy):
    return {
        "run": {"rounds": 3, "seed": 0, "threads": 1},
        "model": {"name": str(model_dir), "max_length": 16},
        "peft": {"method": "full"},
        "data": {"name": "csv", "path": str(csv_path), "test_fraction": 0.5, "deduplicate": False},
        "partition": {"method": "iid", "num_clients": 4},
        "sampling": {"fraction": 1.0},
        "training": {"local_steps": 40, "batch_size": 8, "lr": 2e-3},
        "strategy": {"weighting": "uniform"} if privacy else {},
        "privacy": privacy,
    }


def test_membership_inference_succeeds_on_memorisation_and_fails_under_dp(tiny_model_dir, tmp_path):
    from fedfm.audit.runner import audit

    data = random_label_csv(tmp_path / "random.csv")
    results = {}
    for name, privacy in (("none", {}), ("dp", {"dp": "client", "target_epsilon": 8.0, "clip_norm": 1.0})):
        cfg_path = tmp_path / f"{name}.toml"
        import tomli_w

        cfg_path.write_text(tomli_w.dumps(membership_config(tiny_model_dir, data, **privacy)))
        written = audit(
            cfg_path, ["membership"], out=tmp_path / name, settings=["membership.reference_steps=20"]
        )
        results[name] = written["attacks"]["membership"]["rows"][0]
    assert results["none"]["loss_auc"] > 0.7, results["none"]
    assert results["dp"]["loss_auc"] <= 0.55 and results["dp"]["calibrated_auc"] <= 0.55, results["dp"]


# ---------------------------------------------------------------- what the server sees per client


def test_normalised_entropy_by_hand():
    from fedfm.audit.observed import normalised_entropy

    assert normalised_entropy([5, 0, 0]) == 0.0
    assert normalised_entropy([2, 2]) == pytest.approx(1.0)
    assert normalised_entropy([1, 1, 2]) == pytest.approx(
        (2 * 0.25 * math.log(4) + 0.5 * math.log(2)) / math.log(3)
    )


def _records_folder(folder, losses: dict[int, float], counts: dict[int, list[int]], with_loss=True):
    folder.mkdir()
    rows = []
    for rnd in (1, 2):
        for k, loss in losses.items():
            record = {"event": "client", "round": rnd, "client": k, "num_examples": sum(counts[k])}
            if with_loss:
                record["train_loss"] = loss + 0.01 * rnd
            rows.append(json.dumps(record))
    (folder / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    clients = [
        {"client": k, "num_train": sum(c), "label_counts": {"a": c[0], "b": c[1]}} for k, c in counts.items()
    ]
    (folder / "partition.json").write_text(json.dumps({"clients": clients}))


def test_property_attack_reads_skew_off_the_losses_and_sizes_off_the_counts(tmp_path):
    from fedfm.audit.observed import observed_attack

    counts = {0: [10, 0], 1: [9, 1], 2: [5, 5], 3: [6, 4], 4: [20, 0], 5: [3, 3]}
    skewed_fit_faster = {0: 0.1, 1: 0.2, 4: 0.15, 2: 0.9, 3: 0.8, 5: 1.0}
    _records_folder(tmp_path / "a", skewed_fit_faster, counts)
    (row,) = observed_attack(tmp_path / "a")["rows"]
    assert row["property_auc"] == 1.0 and row["skewed"] == 3 and row["data_size_exact"]
    _records_folder(tmp_path / "b", {k: 1.1 - v for k, v in skewed_fit_faster.items()}, counts)
    assert observed_attack(tmp_path / "b")["rows"][0]["property_auc"] == 0.0
    _records_folder(tmp_path / "c", skewed_fit_faster, counts, with_loss=False)  # secure aggregation's view
    assert "no per-client training loss" in observed_attack(tmp_path / "c")["skipped"]


# ---------------------------------------------------------------- instruction backdoors


def test_instruction_backdoor_plants_its_reply_and_only_where_a_client_poisons(instruction_config, tmp_path):
    """Two of six clients prepend the trigger to every prompt, with the target reply: the
    global model answers triggered held-out prompts with it; with no attacker it never does. (The
    tiny random model learns a reply of words its data has within four rounds; one of words it
    never saw takes longer than a test should.)"""
    import fedfm

    attack = {"kind": "backdoor", "poison_fraction": 1.0, "target_reply": "match goal team"}
    common = dict(
        run={"rounds": 4, "seed": 0, "threads": 1},
        task={"kind": "instruction", "num_eval_prompts": 0, "max_new_tokens": 4},
        partition={"method": "iid", "num_clients": 6},
        peft={"method": "lora", "r": 8, "alpha": 16},
        training={"local_steps": 8, "batch_size": 8, "lr": 3e-2},
    )
    rates = {}
    for name, fraction in (("attacked", 0.34), ("clean", 0.0)):
        cfg = instruction_config(**common, attack={**attack, "fraction": fraction})
        result = fedfm.run(cfg, output=tmp_path / name, progress=False)
        rates[name] = [r["attack_success_rate"] for r in result.history]
    assert rates["attacked"][0] == 0.0 and rates["attacked"][-1] >= 0.8, rates
    assert max(rates["clean"]) == 0.0, rates


# ---------------------------------------------------------------- the command


def test_audit_command_on_a_run_folder(tiny_config, tmp_path):
    import fedfm
    from fedfm.cli import app

    result = fedfm.run(tiny_config(), output=tmp_path / "run", progress=False)
    runner = CliRunner()
    out = runner.invoke(
        app,
        ["audit", str(result.run_dir), "--attack", "canaries", "--set", "canaries.epsilon=2",
         "--set", "canaries.canaries=100"],
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    written = json.loads((result.run_dir / "audit.json").read_text())
    row = written["attacks"]["canaries"]["rows"][0]
    assert row["canaries"] == 100 and row["reported_epsilon"] == pytest.approx(2.0, abs=1e-3)
    assert "one-run 95% lower bound" in (result.run_dir / "audit.md").read_text()
    assert "Privacy audit (fedfm audit)" in (result.run_dir / "report.html").read_text()
    # without DP in the config and no ε given, the canary audit says why it did nothing
    out = runner.invoke(app, ["audit", str(result.run_dir), "--attack", "canaries"])
    assert out.exit_code == 0 and "no client-level DP" in out.output


def test_audit_command_budget_and_bad_options(tiny_config, tmp_path):
    import tomli_w

    from fedfm.cli import app

    cfg_path = tmp_path / "tiny.toml"
    cfg_path.write_text(tomli_w.dumps(tiny_config()))
    runner = CliRunner()
    out = runner.invoke(app, ["audit", str(cfg_path), "--budget", "0.001", "-o", str(tmp_path / "a")])
    assert out.exit_code == 0, out.output
    written = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert all("over the budget" in r["skipped"] for r in written["attacks"].values())
    out = runner.invoke(app, ["audit", str(cfg_path), "--set", "inversion.batch=0"])
    assert out.exit_code != 0 and "inversion.batch" in out.output
    out = runner.invoke(app, ["audit", str(cfg_path), "--attack", "fishing"])
    assert out.exit_code != 0 and "no attack 'fishing'" in out.output


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
