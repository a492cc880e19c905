"""FedPFT: mixture fitting and sampling checked by hand on 2-D data, the one-shot protocol on text
and images, and the settings it refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import fedfm
from fedfm.algorithms.fedpft import (
    ClassMixture,
    fit_class_mixtures,
    message_nbytes,
    sample_features,
    sample_mixture,
)
from fedfm.config import ConfigError, make_config

# class 0: four points whose moments are easy by hand; class 1: two points
POINTS = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [2.0, 4.0], [10.0, 10.0], [12.0, 10.0]])
LABELS = np.array([0, 0, 0, 0, 1, 1])


def test_one_component_is_the_sample_mean_and_biased_variance_plus_the_regulariser():
    reg = 1e-3
    diag = {
        m.label: m for m in fit_class_mixtures(POINTS, LABELS, components=1, covariance="diag", reg_covar=reg)
    }
    # class 0: mean (1, 2); variances E[(x − μ)²] = (1, 4)
    assert np.allclose(diag[0].means, [[1.0, 2.0]]) and np.allclose(diag[0].covariances, [[1 + reg, 4 + reg]])
    assert np.allclose(diag[0].weights, [1.0]) and diag[0].count == 4
    # class 1: mean (11, 10); variances (1, 0)
    assert np.allclose(diag[1].means, [[11.0, 10.0]]) and np.allclose(diag[1].covariances, [[1 + reg, reg]])
    full = {
        m.label: m for m in fit_class_mixtures(POINTS, LABELS, components=1, covariance="full", reg_covar=reg)
    }
    assert np.allclose(full[0].covariances[0], [[1 + reg, 0.0], [0.0, 4 + reg]])  # x and y uncorrelated
    # what travels: K weights + K·d means + K·d variances float32, and label + count
    assert diag[0].nbytes() == 4 * (1 + 2 + 2) + 8
    assert full[0].nbytes() == 4 * (1 + 2 + 4) + 8
    assert message_nbytes(list(diag.values())) == 2 * diag[0].nbytes()


def test_two_components_find_two_clusters_and_their_shares():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal([-5, 0], 0.3, (300, 2)), rng.normal([5, 1], 0.3, (100, 2))])
    (m,) = fit_class_mixtures(x, np.zeros(len(x), dtype=int), components=2, seed=1)
    order = np.argsort(m.means[:, 0])
    assert np.allclose(m.means[order], [[-5, 0], [5, 1]], atol=0.1)
    assert np.allclose(m.weights[order], [0.75, 0.25], atol=0.01)
    assert np.allclose(m.covariances[order], 0.09, atol=0.03)


def test_a_class_with_one_example_is_that_point():
    (m,) = fit_class_mixtures(np.array([[3.0, -1.0]]), np.array([7]), components=4, reg_covar=0.5)
    assert (
        m.label == 7 and m.count == 1 and np.allclose(m.means, [[3, -1]]) and np.allclose(m.covariances, 0.5)
    )


@pytest.mark.parametrize("covariance", ["diag", "full", "spherical"])
def test_sampling_reproduces_the_mixture_moments(covariance):
    means = np.array([[0.0, 0.0], [4.0, -2.0]])
    weights = np.array([0.3, 0.7])
    cov = {
        "diag": np.array([[1.0, 0.25], [0.5, 2.0]]),
        "full": np.array([[[1.0, 0.6], [0.6, 1.0]], [[2.0, -0.5], [-0.5, 0.5]]]),
        "spherical": np.array([0.5, 2.0]),
    }[covariance]
    m = ClassMixture(0, 10, weights, means, cov, covariance)
    x = sample_mixture(m, 200_000, torch.Generator().manual_seed(0)).double().numpy()
    expand = {"diag": np.diag, "full": lambda c: c, "spherical": lambda c: np.eye(2) * c}[covariance]
    full = {covariance: [expand(c) for c in cov]}
    mu = weights @ means  # the mixture's mean and covariance, by hand
    sigma = sum(
        w * (c + np.outer(m_ - mu, m_ - mu))
        for w, m_, c in zip(weights, means, full[covariance], strict=True)
    )
    assert np.allclose(x.mean(0), mu, atol=0.02)
    assert np.allclose(np.cov(x.T), sigma, atol=0.05)
    again = sample_mixture(m, 5, torch.Generator().manual_seed(0))
    assert torch.equal(again, sample_mixture(m, 5, torch.Generator().manual_seed(0)))  # seeded


def test_the_server_draws_ratio_times_count_per_class_and_client():
    one = ClassMixture(2, 10, np.ones(1), np.zeros((1, 3)), np.ones((1, 3)), "diag")
    two = ClassMixture(5, 1, np.ones(1), np.ones((1, 3)), np.ones((1, 3)), "diag")
    x, y = sample_features([[one], [one, two]], 0.5, torch.Generator().manual_seed(0))
    assert x.shape == (5 + 5 + 1, 3) and y.tolist() == [2] * 10 + [5]  # at least one draw per mixture
    with pytest.raises(ValueError, match="no client"):
        sample_features([], 1.0, torch.Generator())


def _check_run(result, num_clients: int):
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    clients = [r for r in records if r["event"] == "client"]
    final = result.history[-1]
    assert [r["round"] for r in result.history] == [0, 1] and len(clients) == num_clients
    assert final["bytes_up"] == sum(r["bytes_up"] for r in clients) > 0 and final["bytes_down"] == 0
    assert 0.0 <= final["test_accuracy"] <= 1.0 and (result.run_dir / "report.html").is_file()
    return final


def test_fedpft_one_shot_on_text(tiny_config, tmp_path):
    cfg = tiny_config(run={"protocol": "fedpft", "rounds": 1}, peft={"method": "head"})
    _check_run(fedfm.run(cfg, output=tmp_path / "run", progress=False), 4)


def test_fedpft_one_shot_on_images_learns_from_sampled_features(tmp_path):
    """Digits on a random tiny CNN's frozen features: one message per client beats chance."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    folder = tmp_path / "cnn"
    ResNetForImageClassification(
        ResNetConfig(
            embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=10
        )
    ).save_pretrained(folder)
    cfg = {
        "run": {"protocol": "fedpft", "threads": 1},
        "task": {"kind": "image_classification"},
        "model": {"name": str(folder), "image_size": 16},
        "peft": {"method": "head"},
        "data": {"name": "digits", "max_examples": 600, "max_test_examples": 200},
        "partition": {"num_clients": 5, "alpha": 0.5, "min_size": 5},
        "fedpft": {"components": 2},
    }
    final = _check_run(fedfm.run(cfg, output=tmp_path / "run", progress=False), 5)
    assert final["test_accuracy"] > 0.3  # chance is 0.1


@pytest.mark.parametrize(
    ("sections", "match"),
    [
        ({"peft": {"method": "lora"}}, "peft.method = 'head'"),
        ({"peft": {"method": "head"}, "run": {"protocol": "fedpft", "engine": "batched"}}, "in-process"),
        ({"peft": {"method": "head"}, "attack": {"kind": "sign_flip"}}, "attack"),
        (
            {"peft": {"method": "lora"}, "task": {"kind": "instruction"}, "model": {"name": "smollm2-135m"}},
            "backbone",
        ),
    ],
)
def test_fedpft_refuses_what_it_cannot_run(sections, match):
    cfg = {"run": {"protocol": "fedpft"}, **sections}
    cfg["run"] = {"protocol": "fedpft", **sections.get("run", {})}
    with pytest.raises(ConfigError, match=match):
        make_config(cfg)


def test_fedpft_folder_exports_and_resumes_as_finished(tiny_config, tmp_path):
    from fedfm.server.export import export_run

    cfg = tiny_config(run={"protocol": "fedpft"}, peft={"method": "head"})
    result = fedfm.run(cfg, output=tmp_path / "run", progress=False)
    again = fedfm.run(resume=result.run_dir, progress=False)
    assert again.history == result.history
    assert (export_run(result.run_dir, tmp_path / "export") / "config.json").is_file()
    with pytest.raises(ConfigError, match="already holds a run"):
        fedfm.run(cfg, output=tmp_path / "run", progress=False)


def test_a_head_that_reads_token_states_is_refused():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from fedfm.tasks.features import backbone_features

    model = RobertaForSequenceClassification(
        RobertaConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20
        )
    )
    with pytest.raises(ValueError, match="token states"):
        backbone_features(model, input_ids=torch.ones(2, 5, dtype=torch.long))
