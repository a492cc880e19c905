"""LoRA-aware aggregation: exact products, SVD truncation error, heterogeneous rank tiers."""

import pytest
import torch

import fedfm
from fedfm.algorithms.lora import (
    aggregate_lora,
    lora_pairs,
    pad_rank,
    stack_factors,
    svd_factors,
    truncate_rank,
    truncation_error,
)

A, B = "m.q.lora_A.weight", "m.q.lora_B.weight"


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_pairs_are_found_by_name():
    assert lora_pairs([A, B, "head.weight"]) == {"m.q": (A, B)}


def test_stacked_factors_give_exactly_the_weighted_sum_of_products():
    factors = [(rand(12, 4, seed=k), rand(4, 10, seed=10 + k)) for k in range(3)]
    weights = [0.2, 0.5, 0.3]
    b, a = stack_factors(factors, weights)
    assert b.shape == (12, 12) and a.shape == (12, 10)
    expected = sum(w * bk @ ak for (bk, ak), w in zip(factors, weights, strict=True))
    torch.testing.assert_close(b @ a, expected, rtol=1e-12, atol=1e-12)


def test_naive_average_of_factors_is_not_the_average_of_products():
    factors = [(rand(6, 2, seed=1), rand(2, 5, seed=2)), (rand(6, 2, seed=3), rand(2, 5, seed=4))]
    naive = ((factors[0][0] + factors[1][0]) / 2) @ ((factors[0][1] + factors[1][1]) / 2)
    exact = (factors[0][0] @ factors[0][1] + factors[1][0] @ factors[1][1]) / 2
    assert (naive - exact).norm() > 0.1 * exact.norm()


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_svd_truncation_error_is_the_discarded_singular_values(rank):
    m = rand(9, 7, seed=0)
    b, a = svd_factors(m, rank, row_norm=0.3)
    s = torch.linalg.svdvals(m)
    err = float(((m - b @ a) ** 2).sum())
    assert err == pytest.approx(float((s[rank:] ** 2).sum()), rel=1e-9)
    assert err == pytest.approx(truncation_error(m, rank), rel=1e-9)
    torch.testing.assert_close(a.norm(dim=1), torch.full((rank,), 0.3, dtype=torch.float64))


def test_exact_aggregation_with_fedavg_lands_on_the_best_rank_r_average():
    g = {A: rand(4, 10, seed=0), B: torch.zeros(12, 4, dtype=torch.float64), "head": rand(3, seed=1)}
    clients = [
        {A: rand(4, 10, seed=2 + k), B: rand(12, 4, seed=20 + k), "head": rand(3, seed=40 + k)}
        for k in range(3)
    ]
    weights = [1.0, 2.0, 3.0]
    deltas = [({k: c[k] - g[k] for k in g}, w) for c, w in zip(clients, weights, strict=True)]
    agg = aggregate_lora(deltas, g, "exact", rank=4)
    new = {k: g[k] + agg[k] for k in g}
    target = sum(w * c[B] @ c[A] for c, w in zip(clients, weights, strict=True)) / 6
    err = float(((new[B] @ new[A] - target) ** 2).sum())
    assert err == pytest.approx(truncation_error(target, 4), rel=1e-6, abs=1e-9)
    torch.testing.assert_close(
        new["head"], sum(w * c["head"] for c, w in zip(clients, weights, strict=True)) / 6
    )
    naive = aggregate_lora(deltas, g, "naive", rank=4)
    mean_delta = {k: sum(w * d[k] for d, w in deltas) / 6 for k in g}
    assert all(torch.allclose(naive[k], mean_delta[k]) for k in g)  # naive = plain FedAvg of factors


def test_heterogeneous_tiers_round_trip_and_redistribute():
    g = {A: rand(16, 10, seed=0), B: rand(12, 16, seed=1)}
    low = truncate_rank(g, 4)
    assert low[A].shape == (4, 10) and low[B].shape == (12, 4)
    back = pad_rank(low, g)
    torch.testing.assert_close(back[A][:4], g[A][:4])
    assert back[A][4:].abs().sum() == 0 and back[B][:, 4:].abs().sum() == 0
    # a rank-4 and a rank-16 client, exact: the global product is the weighted mean of theirs
    c4 = {A: low[A] + rand(4, 10, seed=5), B: low[B] + rand(12, 4, seed=6)}
    c16 = {A: g[A] + rand(16, 10, seed=7), B: g[B] + rand(12, 16, seed=8)}
    deltas = [({k: c4[k] - low[k] for k in g}, 1.0), ({k: c16[k] - g[k] for k in g}, 1.0)]
    agg = aggregate_lora(deltas, g, "exact", rank=16)
    new = {k: g[k] + agg[k] for k in g}
    target = (c4[B] @ c4[A] + c16[B] @ c16[A]) / 2  # rank ≤ 20, so rank 16 truncates a little
    err = float(((new[B] @ new[A] - target) ** 2).sum())
    assert err == pytest.approx(truncation_error(target, 16), rel=1e-6, abs=1e-9)
    # the rank-4 client receives the best rank-4 approximation: the first 4 SVD components
    first4 = truncate_rank(new, 4)
    assert float(((first4[B] @ first4[A] - target) ** 2).sum()) == pytest.approx(
        truncation_error(target, 4), rel=1e-6
    )


@pytest.mark.parametrize("mode", ["naive", "exact"])
def test_tiers_run_end_to_end_and_send_fewer_bytes(tiny_config, tmp_path, mode):
    cfg = tiny_config(
        peft={"r": 8, "rank_tiers": [2, 4, 8]},
        strategy={"lora_aggregation": mode},
        run={"rounds": 2},
        compression={"method": "q8"},
    )
    result = fedfm.run(cfg, output=tmp_path / mode, progress=False)
    homo = fedfm.run(
        tiny_config(peft={"r": 8}, run={"rounds": 2}, compression={"method": "q8"}),
        output=tmp_path / "homo",
        progress=False,
    )
    last = result.history[-1]
    assert last["num_clients"] == 4 and last["rejected"] == []
    assert last["bytes_up"] < homo.history[-1]["bytes_up"]
    assert last["bytes_down"] < homo.history[-1]["bytes_down"]
    adapter = result.run_dir / "adapter" / "adapter_config.json"
    assert adapter.is_file()


def test_exact_mode_runs_with_fedopt(tiny_config, tmp_path):
    cfg = tiny_config(strategy={"lora_aggregation": "exact", "server_optimizer": "adam", "server_lr": 0.01})
    assert fedfm.run(cfg, output=tmp_path / "r", progress=False).history[-1]["num_clients"] == 4


def test_invalid_combinations_are_refused():
    from fedfm.config import make_config

    with pytest.raises(fedfm.ConfigError, match="max equal to peft.r"):
        make_config({"peft": {"r": 8, "rank_tiers": [2, 4]}})
    with pytest.raises(fedfm.ConfigError, match="not supported with them"):
        make_config({"strategy": {"lora_aggregation": "exact", "aggregator": "median"}})
    with pytest.raises(fedfm.ConfigError, match="scaffold' is not supported with peft.rank_tiers"):
        make_config({"peft": {"r": 8, "rank_tiers": [4, 8]}, "strategy": {"objective": "scaffold"}})
    with pytest.raises(fedfm.ConfigError, match="need peft.method = 'lora'"):
        make_config({"strategy": {"lora_aggregation": "exact"}, "peft": {"method": "ia3"}})


def test_rank_assignment_rules(tiny_config):
    from fedfm.config import make_config
    from fedfm.tasks.setup import client_jobs, prepare_data

    cfg = make_config(tiny_config(peft={"r": 8, "rank_tiers": [8, 2, 4]}))
    assert [j.rank for j in client_jobs(prepare_data(cfg), cfg.peft)] == [2, 4, 8, 2]
    cfg = make_config(tiny_config(peft={"r": 8, "rank_tiers": [8, 2, 4, 2], "rank_assignment": "per_client"}))
    assert [j.rank for j in client_jobs(prepare_data(cfg), cfg.peft)] == [8, 2, 4, 2]
    cfg = make_config(
        tiny_config(
            partition={"method": "quantity", "sigma": 2.0},
            peft={"r": 8, "rank_tiers": [2, 8], "rank_assignment": "by_size"},
        )
    )
    data = prepare_data(cfg)
    jobs = client_jobs(data, cfg.peft)
    sizes = {j.rank: [] for j in jobs}
    for j in jobs:
        sizes[j.rank].append(len(j.indices))
    assert max(sizes[2]) <= min(sizes[8])
    with pytest.raises(fedfm.ConfigError, match="one rank per client"):
        make_config(tiny_config(peft={"r": 8, "rank_tiers": [8, 2], "rank_assignment": "per_client"}))


def test_stack_mode_returns_the_full_rank_mean_product():
    from fedfm.algorithms.lora import PRODUCT

    g = {A: rand(2, 6, seed=0), B: rand(5, 2, seed=1)}
    clients = [{A: rand(2, 6, seed=2 + k), B: rand(5, 2, seed=9 + k)} for k in range(4)]
    deltas = [({k: c[k] - g[k] for k in g}, 1.0 + k) for k, c in enumerate(clients)]
    out = aggregate_lora(deltas, g, "stack", rank=2)
    expected = sum((1.0 + k) * c[B] @ c[A] for k, c in enumerate(clients)) / 10
    torch.testing.assert_close(out["m.q" + PRODUCT], expected)
    assert torch.linalg.matrix_rank(expected) == 5  # min(5, 6, 4 clients × r=2): above r, nothing truncated


def test_stack_mode_merges_into_the_base_exports_a_merged_model_and_resumes(
    tiny_config, tiny_model_dir, tmp_path
):
    import torch.nn.functional as F
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedfm.config import make_config
    from fedfm.server.checkpoint import load_checkpoint
    from fedfm.tasks.setup import prepare_data

    def cfg(rounds):
        return tiny_config(
            strategy={"lora_aggregation": "stack"}, run={"rounds": rounds}, training={"lr": 0.05}
        )

    full = fedfm.run(cfg(3), output=tmp_path / "full", progress=False)
    merged = load_checkpoint(full.run_dir / "checkpoint").merged
    assert merged and all(m.abs().sum() > 0 for m in merged.values())
    from fedfm.transforms.compression import serialized_nbytes

    theta_bytes = serialized_nbytes(load_checkpoint(full.run_dir / "checkpoint").params)
    assert full.history[-1]["bytes_down"] > 4 * theta_bytes  # θ plus the stacked factors, per client
    part = fedfm.run(cfg(2), output=tmp_path / "part", progress=False)
    resumed = fedfm.run(resume=part.run_dir, overrides=["run.rounds=3"], progress=False)
    assert resumed.final_metrics["test_loss"] == pytest.approx(full.final_metrics["test_loss"], rel=1e-6)

    model = AutoModelForSequenceClassification.from_pretrained(full.run_dir / "adapter").eval()
    test = prepare_data(make_config(cfg(3))).test
    tok = AutoTokenizer.from_pretrained(full.run_dir / "adapter")
    enc = tok(test.texts, truncation=True, max_length=16, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    loss = F.cross_entropy(logits, torch.as_tensor(test.labels)).item()
    assert loss == pytest.approx(full.final_metrics["test_loss"], rel=1e-4)


def test_stack_mode_needs_plain_fedavg_on_the_server():
    from fedfm.config import make_config

    with pytest.raises(fedfm.ConfigError, match="server_optimizer = 'sgd', server_lr = 1.0"):
        make_config({"strategy": {"lora_aggregation": "stack", "server_optimizer": "adam"}})


def test_a_lora_mode_carries_its_maths_and_one_without_is_refused():
    """A mode is its accumulator: one declared LoRA-aware without one cannot be built (it used
    to aggregate as ``naive`` silently); a new accumulator is what the aggregate uses."""
    from fedfm.algorithms.lora import LoraMode, ProductMean

    with pytest.raises(TypeError, match="add"):
        LoraMode(object)

    class ProductHalf(ProductMean):  # a made-up mode: the mean product, halved
        def result(self, total, rank, prefix, a_key, b_key, like):
            return {prefix + "#half": self.product / total / 2}

    torch.manual_seed(0)
    g = {"m.lora_A.weight": torch.randn(2, 3), "m.lora_B.weight": torch.randn(4, 2)}
    deltas = [({k: torch.randn_like(v) for k, v in g.items()}, w) for w in (1.0, 3.0)]
    out = aggregate_lora(deltas, g, LoraMode(ProductHalf), rank=2)
    want = (
        sum(
            w
            * ((g["m.lora_B.weight"] + d["m.lora_B.weight"]) @ (g["m.lora_A.weight"] + d["m.lora_A.weight"]))
            for d, w in deltas
        )
        / 4
    )
    torch.testing.assert_close(out["m#half"].float(), want / 2)
