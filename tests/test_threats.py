"""The second hostile review's holes, probed without a whole deployment: what a client is told of
the config, how its noise seeds are made, what a secure sum may hold, what bounds a deployment,
how refused messages and heartbeats steer the round (docs/threat-model.md). The probes across
real server and client processes are in ``test_deploy_attacks.py``."""

from __future__ import annotations

import hashlib
import hmac
import math
import tomllib
import warnings

import pytest
import torch
from pydantic import BaseModel

from fedfm.config import RunConfig, make_config
from fedfm.privacy import packing
from fedfm.privacy.skellam import SkellamRound
from fedfm.seeding import NoiseSource, derive_seed, noise_key

# ---------------------------------------------------------------- what a client is told


def _marked(model: type[BaseModel], prefix: str, keep: dict) -> BaseModel:
    """A section with every field set to a marker naming it (no validation: any field, any type)."""
    values = {}
    for name, field in model.model_fields.items():
        dotted = f"{prefix}.{name}"
        inner = field.annotation
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            values[name] = _marked(inner, name, keep)
        else:
            values[name] = keep.get(dotted, f"<{dotted}>")
    return model.model_construct(**values)


def test_a_client_is_told_exactly_the_allow_listed_fields():
    """Every field of the config holds a marker of its own name; the TOML a client receives holds
    the marker of every allow-listed field and of no other (a field added to the config later is
    server-only until it is listed)."""
    from fedfm.deploy.view import CLIENT_FIELDS, client_config_toml

    cfg = _marked(RunConfig, "", {".sharing": None})
    cfg = cfg.model_copy(update={"sharing": cfg.sharing.model_copy(update={"mode": "none"})})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydantic warns that markers are not the fields' types
        sent = client_config_toml(cfg)
    every = {f"{s}.{n}" for s, f in RunConfig.model_fields.items() for n in f.annotation.model_fields}
    assert every >= CLIENT_FIELDS  # no name in the list that is not a field
    told = {d for d in every if f"<{d}>" in sent} | {"sharing.mode"}
    assert told == CLIENT_FIELDS


def test_server_only_secrets_never_reach_a_client_and_every_value_round_trips(tiny_config, tmp_path):
    from fedfm.deploy.view import client_config_toml

    cfg = make_config(
        tiny_config(
            run={"tracking_uri": "postgresql://fedfm:hunter2@db.internal/mlflow", "trackers": ["mlflow"]},
            privacy={"dp": "client", "noise_multiplier": 1.0, "noise_seed": 1234567},
            strategy={"weighting": "uniform"},
            training={"max_grad_norm": None},
            synthetic={"path": "/srv/private/synthetic.jsonl"},
        )
    )
    sent = client_config_toml(cfg)
    for secret in ("hunter2", "1234567", cfg.data.path, "/srv/private", "noise_seed", "tracking_uri"):
        assert secret not in sent
    told = make_config(tomllib.loads(sent))
    assert told.training.max_grad_norm is None  # not silently the default 1.0
    assert told.privacy.noise_multiplier == 1.0 and told.model.name == cfg.model.name


@pytest.mark.parametrize(
    "overrides",
    [
        {"run": {"mode": "async"}, "partition": {"num_clients": 4}, "fedbuff": {"buffer_size": 3}},
        {"secagg": {"enabled": True, "neighbors": 2}, "validation": {"max_update_norm": 5.0}},
        {"privacy": {"dp": "client", "noise_multiplier": 1.0}},
        {"strategy": {"aggregator": "trimmed_mean", "trim_ratio": 0.2}, "partition": {"num_clients": 5}},
        {
            "compression": {"method": "topk", "ratio": 0.1},
            "personalization": {"method": "fedrep"},
            "data": {"client_test_fraction": 0.2},
        },
    ],
)
def test_the_view_a_client_rebuilds_its_config_from_validates(tiny_config, overrides):
    """A client validates the config it is told; fields left out of its view take defaults there,
    which must not trip a check that needs a server-only field (asynchronous mode with a small
    buffer did: ``fedbuff`` is server-only). ``fedfm server`` checks this at start-up."""
    from fedfm.deploy.server import check_client_view

    raw = tiny_config(strategy={"weighting": "uniform"})
    for section, values in overrides.items():
        raw[section] = {**raw.get(section, {}), **values}
    check_client_view(make_config(raw))


def test_a_config_with_nulls_reads_back_the_same(tmp_path):
    cfg = make_config(
        {}, ["training.max_grad_norm=null", "data.hf_test_split=null", "transfer.max_examples=null"]
    )
    assert (cfg.training.max_grad_norm, cfg.data.hf_test_split, cfg.transfer.max_examples) == (
        None,
        None,
        None,
    )
    again = make_config(tomllib.loads(cfg.to_toml()))
    assert again == cfg
    assert make_config({}, ["data.path=null"]).data.path is None  # a field whose default is None too


# ---------------------------------------------------------------- noise seeds a client cannot search


def test_seeds_sent_to_clients_are_hmac_sha256_under_the_runs_secret_key(tmp_path):
    from fedfm.types import RoundContext
    from fedfm.wire import context_header

    assert noise_key(tmp_path, create=False) is None
    key = noise_key(tmp_path, create=True)
    path = tmp_path / "noise.key"
    assert len(key) == 32 and path.read_bytes() == key and oct(path.stat().st_mode & 0o777) == "0o600"
    assert noise_key(tmp_path, create=True) == key  # a resumed run (or a rerun given the file) reuses it
    other = tmp_path / "other"
    other.mkdir()
    assert noise_key(other, create=True) != key  # drawn from the OS, not from the seed

    seed, rnd, client = 7, 3, 1
    header = context_header(RoundContext(round=rnd, seed=0, noise=NoiseSource(seed, key=key)), client)
    for purpose, given in header["noise_seeds"]:
        message = repr((seed, rnd, client, purpose)).encode()
        expected = int.from_bytes(hmac.new(key, message, hashlib.sha256).digest()[:8], "little") >> 1
        assert given == expected
        assert given != derive_seed(seed, rnd, client, purpose)  # the searchable unkeyed hash is gone
    assert "7" not in str({k: v for k, v in header.items() if k != "noise_seeds"})
    with pytest.raises(ValueError, match="noise key"):  # handing out seeds without a key is refused
        NoiseSource(seed).for_client(rnd, client, ("dp",))


def test_a_simulation_without_a_key_file_draws_as_before():
    g = NoiseSource(5).generator(1, 2, "dp")
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=torch.Generator().manual_seed(
        derive_seed(5, 1, 2, "dp"))))  # fmt: skip


# ---------------------------------------------------------------- what a secure sum may hold


def _sum(layout, vectors) -> torch.Tensor:
    modulus = 1 << layout.bits
    total = torch.zeros(layout.length, dtype=torch.int64)
    for v in vectors:
        total = (total + v) % modulus
    return total


def _layout(**extra):
    settings = dict(clip_range=1.0, quantization_bits=8, max_weight=1, max_clients=3, **extra)
    return packing.Layout.for_params({"x": torch.zeros(4)}, control=False, **settings)


def test_the_field_holds_exactly_the_honest_range():
    """Three clients at +c in every entry sum to 3·2^7 = 384; the loss entry (3·64·2^16 = 3·2^22) sets R, and
    2^bits is the least power of two ≥ 2R + 1."""
    layout = _layout()
    honest_max = 3 * round(64 / 2**-16)
    assert layout.bits == math.ceil(math.log2(2 * honest_max + 1)) == 25
    g = torch.Generator().manual_seed(0)
    extreme = [packing.pack(layout, {"x": torch.full((4,), c)}, 1, 64.0, g) for c in (1.0, 1.0, 1.0)]
    sums = packing.unpack(layout, _sum(layout, extreme))
    assert sums.out_of_range == 0 and sums.delta["x"].tolist() == [3.0] * 4 and sums.bound == 3.0


def test_one_unit_beyond_what_honest_inputs_can_sum_to_is_out_of_range_wrapped_or_not():
    """An attacker's vector is honest but for one entry. Within the clip range: accepted; one
    grid step beyond the largest honest sum: out of range; a value that wraps the field around to
    land on a small sum: out of range too (its other entries give it away), or — if it picks
    every entry to land in range — it moves the mean by at most 2c."""
    layout = _layout()
    g = torch.Generator().manual_seed(0)
    honest = [packing.pack(layout, {"x": torch.full((4,), 1.0)}, 1, 0.5, g) for _ in range(2)]
    attack = packing.pack(layout, {"x": torch.full((4,), 1.0)}, 1, 0.5, g)
    assert packing.unpack(layout, _sum(layout, [*honest, attack])).out_of_range == 0
    beyond = attack.clone()
    beyond[0] += 1
    assert packing.unpack(layout, _sum(layout, [*honest, beyond])).out_of_range == 1
    wrapped = attack.clone()
    wrapped[1] += 1 << layout.bits  # the same residue: indistinguishable, and harmless
    assert packing.unpack(layout, _sum(layout, [*honest, wrapped])).out_of_range == 0
    steer = attack.clone()
    steer[:4] = -(3 * 2**7) - 2 * 2**7  # the most it can do: every entry of the sum at −3·2^7
    sums = packing.unpack(layout, _sum(layout, [*honest, steer]))
    assert sums.out_of_range == 0 and sums.delta["x"].tolist() == [-3.0] * 4  # mean −c: 2c from +c
    steer[:4] -= 1
    assert packing.unpack(layout, _sum(layout, [*honest, steer])).out_of_range == 4


def test_with_a_norm_bound_clients_clip_and_the_sum_norm_is_checked():
    layout = _layout(max_norm=0.5)
    g = torch.Generator().manual_seed(0)
    vectors = [packing.pack(layout, {"x": torch.full((4,), 1.0)}, 1, 0.0, g) for _ in range(3)]
    sums = packing.unpack(layout, _sum(layout, vectors))
    assert sums.out_of_range == 0 and float(sums.delta["x"].norm()) <= 3 * 0.5 + 1e-6
    vectors[2][:4] = 2**7  # within the clip range, beyond the norm bound
    assert packing.unpack(layout, _sum(layout, vectors)).out_of_range == 1


def test_a_distributed_noise_sum_outside_its_norm_bound_is_out_of_range():
    plan = SkellamRound.plan(64, 1.0, 1.0, cohort=3, bits=24, wrap_stddevs=8, rotation_seed=0)
    layout = packing.Layout.for_params(
        {"x": torch.zeros(64)}, False, clip_range=1.0, quantization_bits=8, max_weight=1,
        max_clients=3, skellam=plan,
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    honest = [packing.pack(layout, {"x": torch.ones(64) / 8}, 1, 0.0, g, noise=g) for _ in range(3)]
    sums = packing.unpack(layout, _sum(layout, honest))
    assert sums.out_of_range == 0
    attack = honest[2].clone()
    attack[:64] += int(3 * sums.bound * plan.scale / 8)  # a vector of 3 bounds' norm (√64 = 8)
    assert packing.unpack(layout, _sum(layout, [*honest[:2], attack])).out_of_range == 1


@pytest.mark.parametrize("seed", range(20))
def test_honest_distributed_sums_pass_the_norm_check(seed):
    """Clients at their clip norm with the planned noise: never refused (the bound's failure
    probability is about e^-40)."""
    plan = SkellamRound.plan(256, 1.0, 0.5, cohort=5, bits=20, wrap_stddevs=6, rotation_seed=seed)
    layout = packing.Layout.for_params(
        {"x": torch.zeros(256)}, False, clip_range=1.0, quantization_bits=8, max_weight=1,
        max_clients=5, skellam=plan,
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    vectors = []
    for _ in range(5):
        x = torch.randn(256, generator=g)
        vectors.append(packing.pack(layout, {"x": x / x.norm()}, 1, 0.0, g, noise=g))
    assert packing.unpack(layout, _sum(layout, vectors)).out_of_range == 0


# ---------------------------------------------------------------- what a deployment must bound


def test_a_deployment_refuses_to_start_unbounded_unless_told_to(tiny_config):
    from fedfm.deploy.auth import DeployError
    from fedfm.deploy.server import check_deployable

    base = tiny_config(validation={"max_num_examples": 100})
    with pytest.raises(DeployError, match="validation.unbounded = true"):
        check_deployable(make_config(base))
    assert "nothing bounds" in check_deployable(make_config({**base, "validation": {
        "max_num_examples": 100, "unbounded": True}}))[-1]  # fmt: skip
    bounded = [
        {"validation": {"max_num_examples": 100, "max_update_norm": 5.0}},
        {"strategy": {"aggregator": "median"}},
        {"strategy": {"weighting": "uniform"}, "privacy": {"dp": "client", "noise_multiplier": 1.0}},
        {"strategy": {"weighting": "uniform"}, "secagg": {"enabled": True, "threshold": 0.6},
         "partition": {"num_clients": 4}, "sampling": {"fraction": 1.0}},
    ]  # fmt: skip
    for extra in bounded:
        assert check_deployable(make_config({**base, **extra})) == []


def test_a_threshold_that_needs_every_share_holder_is_warned_about(tiny_config):
    from fedfm.deploy.server import check_deployable

    cfg = tiny_config(
        strategy={"weighting": "uniform"},
        partition={"num_clients": 3},
        sampling={"fraction": 1.0},
        secagg={"enabled": True, "threshold": 0.67},
    )
    warned = check_deployable(make_config(cfg))
    assert len(warned) == 1 and "needs all 3 of them (t = 3)" in warned[0]
    cfg["secagg"]["threshold"] = 0.6
    assert check_deployable(make_config(cfg)) == []


# ---------------------------------------------------------------- refusals and heartbeats


def test_a_refused_reply_takes_the_client_out_of_the_round_at_once():
    from fedfm.deploy.auth import Roster
    from fedfm.deploy.engine import Coordinator

    c = Coordinator(Roster([]), "", [], "run", round=4, waiting_for={1, 2})
    c.refuse(1, {"round": 3}, "not expecting a message for round 3")  # a stale message: not this reply
    assert c.waiting_for == {1, 2} and c.results.empty()
    c.refuse(1, {"round": 4, "num_examples": 5}, "the payload passes 100 bytes")
    rnd, step, client, result = c.results.get_nowait()
    assert (rnd, step, client) == (4, None, 1) and result.failure.stage == "decode"
    assert "was refused: the payload passes 100 bytes" in result.failure.reason
    assert not c.delivered(1, 4, None)  # and whatever it sends next is refused too
    c.refuse(2, None, "the first chunk carries no header")  # unreadable: this round's reply
    assert c.waiting_for == set()


def test_heartbeats_keep_a_client_that_only_loads_its_model_connected(tmp_path, monkeypatch):
    """A real gRPC server and a client identity that joins and then sends nothing but heartbeats
    (as while it loads a model): connected for several windows; without heartbeats, out after one."""
    import time

    from fedfm.deploy import auth, client
    from fedfm.deploy.auth import Roster
    from fedfm.deploy.client import ClientSecurity, Heartbeat, Identity
    from fedfm.deploy.engine import Coordinator
    from fedfm.deploy.server import Security, start_server

    monkeypatch.setattr(auth, "CONNECTED_S", 1.5)
    monkeypatch.setattr(client, "HEARTBEAT_S", 0.5)
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("a tok-aaaaaaaaaaaa\nb tok-bbbbbbbbbbbb\n")
    coord = Coordinator(Roster.from_file(tokens, mutual_tls=False), "", [], "run")
    server, port = start_server(coord, "127.0.0.1:0", Security(insecure=True), note=lambda _: None)
    try:
        address, security = f"127.0.0.1:{port}", ClientSecurity(insecure=True)
        loading, silent = Identity("tok-aaaaaaaaaaaa", None), Identity("tok-bbbbbbbbbbbb", None)
        for ident in (loading, silent):
            stub = client.rpc.FedFMStub(security.channel(address))
            stub.Join(client.pb.JoinRequest(), metadata=ident.metadata, timeout=10)
        with Heartbeat(address, loading, security):
            assert coord.connected() == [0, 1]
            time.sleep(4.5)  # three windows
            assert coord.connected() == [0]
    finally:
        server.stop(grace=0)


def test_secure_aggregation_above_256_mib_of_float32_is_refused_with_the_reason():
    from fedfm.privacy.packing import MAX_VALUES, Layout

    settings = {"clip_range": 1.0, "quantization_bits": 16, "max_weight": 1, "max_clients": 3}
    fits = {"w": torch.empty(0).new_empty((MAX_VALUES,), device="meta")}
    assert Layout.for_params(fits, False, **settings).tensor_length == MAX_VALUES
    with pytest.raises(ValueError, match="refused above 67,108,864 values .* has 67,108,866"):
        Layout.for_params({**fits, "b": torch.empty(2, device="meta")}, False, **settings)
    with pytest.raises(ValueError, match="has 134,217,728"):  # SCAFFOLD's control doubles the vector
        Layout.for_params(fits, True, **settings)
