"""Compression halves: round trips, unbiasedness, error bounds, error feedback, bytes on the wire."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfm.config import CompressionSection
from fedfm.transforms.compression import (
    DecodeError,
    decode,
    dequantize,
    encode,
    pack_nibbles,
    quantize,
    serialized_nbytes,
    top_k,
    unpack_nibbles,
)

DELTA = {"a": torch.linspace(-1, 1, 6000).reshape(20, 300), "b": torch.tensor([0.5, -0.25, 0.0])}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def roundtrip(method, **kw):
    cfg = CompressionSection(method=method, **kw)
    payload, residual = encode(DELTA, cfg, gen())
    return payload, decode(payload, cfg, DELTA), residual


def test_casts_halve_the_bytes_and_stay_close():
    for method in ("fp16", "bf16"):
        payload, out, _ = roundtrip(method)
        for k in DELTA:
            torch.testing.assert_close(out[k], DELTA[k], atol=1e-2, rtol=1e-2)
            assert out[k].dtype == torch.float32
        assert serialized_nbytes(payload) < 0.6 * serialized_nbytes(DELTA)


@pytest.mark.parametrize("method,bits,ratio", [("q8", 8, 0.3), ("q4", 4, 0.2)])
@pytest.mark.parametrize("block_size", [0, 64])
def test_quantization_error_is_bounded_by_one_level(method, bits, ratio, block_size):
    payload, out, _ = roundtrip(method, block_size=block_size)
    step = 2.0 / (2**bits - 1)  # per-tensor range of "a" is [-1, 1]; blocks have smaller ranges
    assert (out["a"] - DELTA["a"]).abs().max() <= step + 1e-6
    assert serialized_nbytes(payload) < ratio * serialized_nbytes(DELTA)


def test_quantization_is_unbiased():
    x = torch.tensor([0.1, 0.37, -0.8, 0.55, 1.0, -1.0])
    draws = torch.stack([dequantize(quantize(x, 4, 0, gen(s)), 4, 0, x) for s in range(4000)])
    torch.testing.assert_close(draws.mean(0), x, atol=0.01, rtol=0)


@settings(max_examples=30, deadline=None)
@given(codes=st.lists(st.integers(0, 15), min_size=1, max_size=41))
def test_nibble_packing_round_trips(codes):
    t = torch.tensor(codes, dtype=torch.uint8)
    packed = pack_nibbles(t)
    assert packed.numel() == (len(codes) + 1) // 2
    assert torch.equal(unpack_nibbles(packed, len(codes)), t)


def test_top_k_keeps_the_largest_and_feeds_back_the_rest():
    idx, val = top_k(torch.tensor([0.1, -3.0, 0.2, 2.0]), 0.5)
    assert idx.tolist() == [1, 3] and val.tolist() == [-3.0, 2.0]
    cfg = CompressionSection(method="topk", ratio=0.1, error_feedback=True)
    deltas = [{"w": torch.randn(50, generator=gen(s))} for s in range(6)]
    sent_total, residual = torch.zeros(50), None
    for d in deltas:
        payload, residual = encode(d, cfg, gen(), residual)
        sent_total += decode(payload, cfg, d)["w"]
    # telescoping: everything produced is either sent or still in the residual
    torch.testing.assert_close(sent_total + residual["w"], sum(d["w"] for d in deltas))


def test_random_k_is_unbiased():
    cfg = CompressionSection(method="randk", ratio=0.25)
    x = {"w": torch.arange(8.0)}
    draws = torch.stack([decode(encode(x, cfg, gen(s))[0], cfg, x)["w"] for s in range(3000)])
    # each entry is x·n/k with probability k/n, else 0: standard error sqrt(x²(n/k − 1)/draws)
    stderr = torch.sqrt(x["w"] ** 2 * 3 / 3000)
    assert ((draws.mean(0) - x["w"]).abs() <= 4 * stderr + 1e-6).all()


def test_malformed_payloads_raise_decode_errors():
    cfg = CompressionSection(method="topk", ratio=0.5)
    with pytest.raises(DecodeError, match="lacks"):
        decode({}, cfg, DELTA)
    bad = {
        "a#idx": torch.tensor([10**6], dtype=torch.int32),
        "a#val": torch.ones(1),
        "b#idx": torch.tensor([0], dtype=torch.int32),
        "b#val": torch.ones(1),
    }
    with pytest.raises(DecodeError, match="outside"):
        decode(bad, cfg, DELTA)


# --- whole runs -------------------------------------------------------------------------------------


def _round(result):
    return result.history[-1]


@pytest.fixture
def uncompressed(tiny_config, tmp_path):
    import fedfm

    return fedfm.run(tiny_config(run={"rounds": 2}), output=tmp_path / "none", progress=False)


@pytest.mark.parametrize("method", ["fp16", "bf16", "q8", "q4", "topk", "randk"])
def test_every_method_runs_from_config_and_shrinks_the_upload(tiny_config, tmp_path, uncompressed, method):
    import fedfm

    cfg = tiny_config(run={"rounds": 2}, compression={"method": method, "ratio": 0.1, "block_size": 64})
    result = fedfm.run(cfg, output=tmp_path / method, progress=False)
    last, base = _round(result), _round(uncompressed)
    assert last["rejected"] == [] and last["num_clients"] == 4
    # the tiny model's tensors are so small that safetensors headers dominate: only assert a shrink
    # here; the unit tests above check the ratios on realistically sized tensors
    assert last["bytes_up"] < 0.9 * base["bytes_up"]
    assert last["bytes_down"] == base["bytes_down"]
    assert abs(last["test_loss"] - base["test_loss"]) < 0.5  # still trains the same model


def test_bytes_are_measured_and_accumulated(uncompressed):
    from fedfm.server.checkpoint import load_checkpoint

    rounds = [r for r in uncompressed.history if r["round"] > 0]
    theta = load_checkpoint(uncompressed.run_dir / "checkpoint").params
    for r in rounds:
        assert r["bytes_down"] == 4 * serialized_nbytes(theta)
        assert r["bytes_up"] >= 4 * serialized_nbytes(theta)  # deltas have θ's shapes (+ nothing else)
        assert r["full_finetune_bytes"] > 10 * (r["bytes_up"] + r["bytes_down"])
    assert rounds[-1]["bytes_up_total"] == sum(r["bytes_up"] for r in rounds)
    assert rounds[-1]["bytes_down_total"] == sum(r["bytes_down"] for r in rounds)


def test_top_k_residuals_are_checkpointed_so_resume_matches(tiny_config, tmp_path):
    import fedfm

    comp = {"method": "topk", "ratio": 0.05}
    full = fedfm.run(
        tiny_config(run={"rounds": 3}, compression=comp), output=tmp_path / "full", progress=False
    )
    part = fedfm.run(
        tiny_config(run={"rounds": 2}, compression=comp), output=tmp_path / "part", progress=False
    )
    resumed = fedfm.run(resume=part.run_dir, overrides=["run.rounds=3"], progress=False)
    assert resumed.final_metrics["test_loss"] == full.final_metrics["test_loss"]
    assert resumed.final_metrics["bytes_up_total"] == full.final_metrics["bytes_up_total"]


def test_compression_composes_with_strategies_and_robust_rules(tiny_config, tmp_path):
    import fedfm

    cfg = tiny_config(
        run={"rounds": 1},
        partition={"num_clients": 6},
        compression={"method": "q8"},
        strategy={
            "aggregator": "median",
            "server_optimizer": "adam",
            "server_lr": 0.01,
            "objective": "fedprox",
        },
        attack={"kind": "scale", "fraction": 0.2},
    )
    last = _round(fedfm.run(cfg, output=tmp_path / "r", progress=False))
    assert last["num_clients"] == 6 and len(last["malicious"]) == 2
