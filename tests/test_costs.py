"""Counted training costs (training.count_costs): FLOPs and memory, hand-checked on a tiny MLP."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedfm.client.costs import CostMeter, round_costs
from fedfm.config import ConfigError, make_config


def test_a_small_mlp_costs_what_its_shapes_say():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    meter = CostMeter(model, dict(model.named_parameters()))
    x = torch.randn(5, 8)
    with meter.counting():
        for _ in range(3):
            model(x).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            meter.step()
    got = meter.record(optimizer)
    # per step, 2·m·n·k per product: forward 2·5·8·4 + 2·5·4·2 = 400; backward: the first layer's
    # weight gradient (its input needs none) 320, the second's input and weight gradients 80 + 80
    assert got["flops"] == 3 * (400 + 320 + 160)
    weights = 4 * (8 * 4 + 4 + 4 * 2 + 2)
    assert got["memory_weights_bytes"] == weights
    # saved for backward: the input (5×8) and the ReLU output (5×4, also the second layer's input,
    # counted once); the second layer's weight is a weight, not an activation
    assert got["memory_activations_bytes"] == 4 * (5 * 8 + 5 * 4)
    # gradients, AdamW's two moments, and one step counter per parameter tensor
    assert got["memory_optimizer_bytes"] == 3 * weights + 4 * 4
    assert (
        got["peak_memory_bytes"] == weights + got["memory_optimizer_bytes"] + got["memory_activations_bytes"]
    )


def test_round_costs_summarise_the_counted_clients():
    records = [{"flops": 10.0, "peak_memory_bytes": 5.0}, {"flops": 30.0, "peak_memory_bytes": 7.0}, {}]
    assert round_costs(records) == {"client_flops_mean": 20.0, "client_peak_memory_bytes": 7.0}
    assert round_costs([{"train_loss": 1.0}]) == {}
    split = [  # split learning: the weights a client holds and the server's FLOPs for its part
        {"flops": 10.0, "peak_memory_bytes": 5.0, "memory_weights_bytes": 3.0, "server_flops": 40.0},
        {"flops": 30.0, "peak_memory_bytes": 7.0, "memory_weights_bytes": 4.0, "server_flops": 60.0},
    ]
    assert round_costs(split) == {
        "client_flops_mean": 20.0,
        "client_peak_memory_bytes": 7.0,
        "client_weights_bytes_max": 4.0,
        "server_flops_mean": 50.0,
    }


def test_the_batched_engine_refuses_to_count(tiny_config):
    with pytest.raises(ConfigError, match="count_costs"):
        make_config(tiny_config(run={"engine": "batched"}, training={"count_costs": True}))
