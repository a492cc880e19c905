"""The virtual clock, client profiles, over-selection and deadlines, staleness, and FedBuff."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fedfm
from fedfm.algorithms.staleness import staleness_weight
from fedfm.config import ConfigError, make_config
from fedfm.server.checkpoint import load_checkpoint
from fedfm.systems.availability import Always, Intervals, OnOff, diurnal
from fedfm.systems.clock import Arrival, finish_time, keep_first, work_seconds
from fedfm.systems.profiles import SystemProfile, TraceError, client_profiles, read_trace


# -- the clock, by hand ----------------------------------------------------------------------
def test_work_seconds_by_hand():
    p = SystemProfile(step_s=0.5, down_bytes_s=1000.0, up_bytes_s=250.0)
    # 2000 B down at 1000 B/s + 10 steps × 0.5 s + 500 B up at 250 B/s = 2 + 5 + 2
    assert work_seconds(p, 10, 2000, 500) == pytest.approx(9.0)


def test_a_client_that_goes_offline_before_it_delivers_drops_out():
    day = diurnal(0.25, 100.0, 0.1)  # online in [10, 35) of every 100 s
    p = SystemProfile(1.0, math.inf, math.inf, day)
    assert finish_time(p, 10.0, 20.0) == 30.0
    assert finish_time(p, 20.0, 20.0) is None  # would finish at 40, offline from 35
    assert finish_time(p, 40.0, 1.0) is None  # offline at the start
    assert finish_time(p, 110.0, 24.0) == 134.0  # the next day


def test_diurnal_windows_that_cross_midnight_run_on():
    day = diurnal(0.3, 100.0, 0.9)  # online in [90, 100) and [0, 20)
    assert day.spans == ((0.0, 20.0), (90.0, 100.0))
    assert day.online_until(95.0) == 120.0  # through midnight to 20 s into the next period
    assert day.online_until(50.0) is None and day.next_online(50.0) == 90.0
    assert day.next_online(150.0) == 190.0


@settings(max_examples=60, deadline=None)
@given(
    fraction=st.floats(0.05, 1.0),
    phase=st.floats(0, 1),
    t=st.floats(0, 1e5),
    kind=st.sampled_from(["diurnal", "onoff"]),
)
def test_next_online_is_online_and_online_until_is_later(fraction, phase, t, kind):
    avail = diurnal(fraction, 3600.0, phase) if kind == "diurnal" else OnOff(600.0, 600.0 / fraction, (7,))
    nxt = avail.next_online(t)
    assert nxt >= t
    if math.isfinite(nxt):
        until = avail.online_until(nxt)
        assert until is not None and until > nxt
    until = avail.online_until(t)
    if until is not None:
        assert avail.next_online(t) == t and until > t


def test_keep_first_over_selection_and_deadline_by_hand():
    arrivals = [
        Arrival(0, 5.0, 5.0, 4.0),
        Arrival(1, 3.0, 3.0, 2.0),
        Arrival(2, None, 9.0, 9.0),  # went offline
        Arrival(3, 8.0, 8.0, 7.0),
        Arrival(4, 20.0, 20.0, 19.0),
    ]
    kept, dropped, end = keep_first(arrivals, 0.0, wanted=2, deadline_s=None)
    assert kept == [1, 0] and end == 5.0
    assert set(dropped) == {2, 3, 4} and "over-selected" in dropped[3] and "offline" in dropped[2]
    kept, dropped, end = keep_first(arrivals, 0.0, wanted=4, deadline_s=10.0)
    assert kept == [1, 0, 3] and end == 10.0 and "deadline" in dropped[4]  # the round waits to the deadline
    assert keep_first([], 7.0, 3, None) == ([], {}, 7.0)


# -- staleness ------------------------------------------------------------------------------
def test_staleness_weights_by_hand():
    assert staleness_weight(0, "polynomial", 0.5) == 1.0
    assert staleness_weight(3, "polynomial", 0.5) == pytest.approx(0.5)  # (1 + 3)^-0.5
    assert staleness_weight(9, "constant") == 1.0
    assert staleness_weight(4, "hinge", a=10, b=4) == 1.0
    assert staleness_weight(6, "hinge", a=10, b=4) == pytest.approx(1 / 21)
    with pytest.raises(ValueError, match="≥ 0"):
        staleness_weight(-1)


@given(
    tau=st.integers(0, 1000), kind=st.sampled_from(["constant", "polynomial", "hinge"]), a=st.floats(0.01, 5)
)
def test_staleness_weights_are_in_0_1_and_do_not_grow(tau, kind, a):
    w, later = staleness_weight(tau, kind, a), staleness_weight(tau + 1, kind, a)
    assert 0 < later <= w <= 1


# -- profiles and traces --------------------------------------------------------------------
def _systems(**fields):
    return make_config({"systems": {"enabled": True, **fields}}).systems


def test_profiles_are_seeded_and_heavy_tailed():
    sys = _systems(step_sigma=1.0, availability="diurnal")
    a, b = client_profiles(sys, 200, seed=1), client_profiles(sys, 200, seed=1)
    assert [p.step_s for p in a] == [p.step_s for p in b] and a[0].availability == b[0].availability
    steps = sorted(p.step_s for p in a)
    assert steps[-1] / steps[100] > 5  # the slowest client is far slower than the median
    assert [p.step_s for p in client_profiles(sys, 200, seed=2)] != [p.step_s for p in a]


def test_fedscale_traces_in_json_and_pickle(tmp_path):
    device = {
        1: {"computation": 10.0, "communication": 800.0},
        2: {"computation": 20.0, "communication": 80.0},
    }
    behave = {
        1: {"active": [0, 50], "inactive": [10, 60], "finish_time": 100},
        2: {"active": [5], "inactive": []},
    }
    (tmp_path / "device.pkl").write_bytes(pickle.dumps(device))
    (tmp_path / "behave.json").write_text(json.dumps(behave))
    sys = _systems(device_trace=str(tmp_path / "device.pkl"), availability="trace",
                   behavior_trace=str(tmp_path / "behave.json"))  # fmt: skip
    p = client_profiles(sys, 3, seed=0, batch_size=4)
    assert p[0].step_s == pytest.approx(3 * 4 * 10 / 1000) and p[0].up_bytes_s == pytest.approx(100_000)
    assert p[1].step_s == pytest.approx(3 * 4 * 20 / 1000)
    assert p[2].step_s == p[0].step_s  # the trace cycles
    assert p[0].availability.online_until(55.0) == 60.0 and p[0].availability.next_online(65.0) == 100.0
    assert p[1].availability.online_until(1e6) == math.inf  # active from 5 s to the end


def test_a_pickled_trace_cannot_run_code(tmp_path):
    class Boom:
        def __reduce__(self):
            return (eval, ("1",))  # not print: importing Ray replaces builtins.print

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({1: Boom()}))
    with pytest.raises(TraceError, match="refusing to load builtins.eval"):
        read_trace(tmp_path / "evil.pkl")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(TraceError, match="bad.json"):
        read_trace(tmp_path / "bad.json")


def test_intervals_refuse_overlaps():
    with pytest.raises(ValueError, match="sorted, disjoint"):
        Intervals(((0.0, 10.0), (5.0, 20.0)), 100.0)
    assert Always().online_until(1e9) == math.inf


# -- config rules ---------------------------------------------------------------------------
CLIENT_DP = {"privacy": {"dp": "client", "noise_multiplier": 1.0}, "strategy": {"weighting": "uniform"}}


@pytest.mark.parametrize(
    ("sections", "match"),
    [
        ({"systems": {"step_sigma": 1.0}}, "systems.step_sigma is set but systems.enabled = false"),
        ({"systems": {"enabled": True, "over_selection": 1.3}, **CLIENT_DP},
         "amplification by sampling"),
        ({"systems": {"enabled": True, "deadline_s": 10}, "secagg": {"enabled": True}}, "secagg.enabled"),
        ({"run": {"mode": "async"}, **CLIENT_DP}, "privacy.dp = 'client'"),
        ({"run": {"mode": "async"}, "secagg": {"enabled": True}, "fedbuff": {"buffer_size": 4,
          "concurrency": 3}}, "concurrency ≥ buffer_size"),
        ({"run": {"mode": "async"}, "strategy": {"objective": "scaffold"}}, "SCAFFOLD"),
        ({"run": {"mode": "async"}, "fedbuff": {"buffer_size": 30}, "partition": {"num_clients": 10}},
         "fedbuff.buffer_size"),
        ({"systems": {"enabled": True, "availability": "trace"}}, "behavior_trace"),
    ],
)  # fmt: skip
def test_what_the_clock_and_fedbuff_refuse_names_the_field(sections, match):
    with pytest.raises(ConfigError, match=match):
        make_config(sections)


# -- runs -----------------------------------------------------------------------------------
def _params(run_dir):
    return load_checkpoint(run_dir / "checkpoint").params


def _equal(a, b):
    return set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_synchronous_run_reports_virtual_time_and_keeps_the_first_m(tiny_config, tmp_path):
    systems = {"enabled": True, "step_s": 2.0, "step_sigma": 1.0, "over_selection": 2.0}
    cfg = tiny_config(sampling={"clients_per_round": 2}, systems=systems, partition={"num_clients": 6})
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    rounds = [r for r in result.history if r["round"] > 0]
    clients = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in rounds:
        assert len(r["cohort"]) == 4 and r["num_clients"] == 2 and len(r["dropped"]) == 2
        assert all("over-selected" in d["reason"] for d in r["dropped"])
        assert r["virtual_time_s"] > 0 and r["round_virtual_s"] > 0
    assert (result.run_dir / "virtual-time.png").is_file()  # the report plots accuracy over virtual time
    assert rounds[1]["virtual_time_s"] == pytest.approx(
        rounds[0]["virtual_time_s"] + rounds[1]["round_virtual_s"]
    )
    # the kept are the fastest: 3 local steps at each client's own step time
    profiles = client_profiles(make_config(cfg).systems, 6, seed=0)
    first = rounds[0]
    kept = [c["client"] for c in clients if c.get("event") == "client" and c["round"] == 1]
    dropped = [d["client"] for d in first["dropped"]]
    assert max(profiles[k].step_s for k in kept) <= min(profiles[k].step_s for k in dropped) + 1e-9
    slowest_kept = max(3 * profiles[k].step_s for k in kept)  # plus a few KB at 20 / 5 Mbit/s
    assert slowest_kept < first["round_virtual_s"] < slowest_kept + 0.05
    assert first["client_compute_s"] == pytest.approx(sum(3 * profiles[k].step_s for k in first["cohort"]))


def test_a_deadline_drops_the_late(tiny_config, tmp_path):
    systems = {"enabled": True, "step_s": 1.0, "step_sigma": 1.5, "deadline_s": 3.0}
    result = fedfm.run(
        tiny_config(systems=systems, partition={"num_clients": 6}), output=tmp_path / "r", progress=False
    )
    r = result.history[1]
    late = [d for d in r["dropped"] if "deadline" in d["reason"]]
    assert late and r["num_clients"] == 6 - len(late) and r["round_virtual_s"] == pytest.approx(3.0)


def test_fedbuff_with_zero_staleness_and_k_equal_to_the_cohort_is_fedavg(tiny_config, tmp_path):
    """Every client alike, K = concurrency = N: every buffer is one synchronous round."""
    sync = fedfm.run(tiny_config(run={"rounds": 3}), output=tmp_path / "sync", progress=False)
    cfg = tiny_config(run={"rounds": 3, "mode": "async"}, fedbuff={"buffer_size": 4, "concurrency": 4})
    asyn = fedfm.run(cfg, output=tmp_path / "async", progress=False)
    assert _equal(_params(sync.run_dir), _params(asyn.run_dir))
    steps = [r for r in asyn.history if r["round"] > 0]
    assert all(r["staleness"] == [0, 0, 0, 0] for r in steps)
    assert [r["test_accuracy"] for r in steps if "test_accuracy" in r] == [
        r["test_accuracy"] for r in sync.history if r["round"] > 0 and "test_accuracy" in r
    ]


def _async_cfg(tiny_config, fedbuff=None):
    return tiny_config(
        run={"rounds": 4, "mode": "async"},
        partition={"num_clients": 6},
        systems={"enabled": True, "step_sigma": 1.0},
        fedbuff={"buffer_size": 2, "concurrency": 4, "staleness": "polynomial", **(fedbuff or {})},
    )


def test_fedbuff_with_heterogeneous_clients_buffers_stale_updates(tiny_config, tmp_path):
    result = fedfm.run(_async_cfg(tiny_config), output=tmp_path / "r", progress=False)
    steps = [r for r in result.history if r["round"] > 0]
    assert [r["num_clients"] for r in steps] == [2, 2, 2, 2]
    assert any(t > 0 for r in steps for t in r["staleness"])  # slow clients deliver late
    times = [r["virtual_time_s"] for r in steps]
    assert times == sorted(times) and times[0] > 0
    for r in steps:  # one client per buffer at most (fedbuff.max_per_client = 1)
        assert len(set(r["cohort"])) == len(r["cohort"])


def test_staleness_scales_the_update(tiny_config, tmp_path):
    """The same run with constant weights and with a steep hinge ends elsewhere: the weights act."""
    a = fedfm.run(
        _async_cfg(tiny_config, fedbuff={"staleness": "constant"}), output=tmp_path / "a", progress=False
    )
    steep = {"staleness": "hinge", "staleness_a": 100.0, "staleness_b": 0}
    b = fedfm.run(_async_cfg(tiny_config, fedbuff=steep), output=tmp_path / "b", progress=False)
    assert [r.get("staleness") for r in a.history] == [r.get("staleness") for r in b.history]  # same schedule
    assert not _equal(_params(a.run_dir), _params(b.run_dir))


def test_max_staleness_rejects_with_the_reason(tiny_config, tmp_path):
    cfg = _async_cfg(tiny_config, fedbuff={"max_staleness": 0, "buffer_size": 2})
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    reasons = [r["reason"] for s in result.history if s["round"] > 0 for r in s["rejected"]]
    assert reasons and all("fedbuff.max_staleness = 0" in why for why in reasons)
    assert all(t == 0 for s in result.history if s["round"] > 0 for t in s["staleness"])


def test_a_killed_fedbuff_run_resumes_from_its_last_applied_buffer(tiny_config, tmp_path):
    from fedfm.api import prepare_run
    from fedfm.server.driver import Run

    class Crash(Exception):
        pass

    def crash_at_step_3(record):
        if record["round"] == 3:
            raise Crash  # after step 3's record, before its checkpoint

    cfg, run_dir = prepare_run(_async_cfg(tiny_config), output=tmp_path / "r")
    with pytest.raises(Crash):
        Run(cfg, run_dir, progress=False, callbacks=[crash_at_step_3]).execute()
    saved = load_checkpoint(run_dir / "checkpoint")
    assert saved.round == 2 and saved.clock["in_flight"]  # updates in flight are in the checkpoint
    resumed = fedfm.run(resume=run_dir, progress=False)
    whole = fedfm.run(_async_cfg(tiny_config), output=tmp_path / "whole", progress=False)
    assert _equal(_params(run_dir), _params(whole.run_dir))
    strip = ("elapsed_s", "round_s", "aggregate_s", "eval_s")  # wall-clock fields
    assert [{k: v for k, v in r.items() if k not in strip} for r in resumed.history] == [
        {k: v for k, v in r.items() if k not in strip} for r in whole.history
    ]


SECURE = {"secagg": {"enabled": True}, "strategy": {"weighting": "uniform"}}


def test_secure_fedbuff_with_zero_staleness_is_secure_fedavg(tiny_config, tmp_path):
    """Under secure aggregation a buffer is a wave of K clients in one masking protocol; with every
    client alike and K = concurrency = N it is a synchronous secure round, step for step."""
    sync = fedfm.run(tiny_config(**SECURE), output=tmp_path / "sync", progress=False)
    cfg = tiny_config(run={"mode": "async"}, fedbuff={"buffer_size": 4, "concurrency": 4}, **SECURE)
    asyn = fedfm.run(cfg, output=tmp_path / "async", progress=False)
    assert _equal(_params(sync.run_dir), _params(asyn.run_dir))
    assert all(r["secagg"]["bytes_up"] > 0 for r in asyn.history if r["round"] > 0)


def test_secure_fedbuff_waves_overlap_and_are_weighted_whole(tiny_config, tmp_path):
    cfg = tiny_config(
        run={"rounds": 4, "mode": "async"},
        partition={"num_clients": 8},
        systems={"enabled": True, "step_sigma": 1.0},
        fedbuff={"buffer_size": 3, "concurrency": 6},
        **SECURE,
    )
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    steps = [r for r in result.history if r["round"] > 0]
    assert all(r["num_clients"] == 3 and len(set(r["staleness"])) == 1 for r in steps)
    assert any(r["staleness"][0] > 0 for r in steps)  # a wave applied after another is stale
    clients = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not any(c.get("event") == "client" for c in clients)  # the server saw sums only


def test_fedbuff_composes_with_compression_fedadam_and_a_robust_aggregator(tiny_config, tmp_path):
    cfg = _async_cfg(tiny_config)
    cfg["compression"] = {"method": "topk", "ratio": 0.05}
    cfg["strategy"] = {
        "server_optimizer": "adam",
        "server_lr": 0.01,
        "aggregator": "trimmed_mean",
        "trim_ratio": 0.25,
    }
    cfg["fedbuff"]["buffer_size"] = 4
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    steps = [r for r in result.history if r["round"] > 0]
    assert all(r["num_clients"] == 4 and not r["rejected"] for r in steps)  # every encoded update decoded
    plain = fedfm.run(
        _async_cfg(tiny_config, fedbuff={"buffer_size": 4}), output=tmp_path / "p", progress=False
    )
    assert steps[-1]["bytes_up_total"] < 0.75 * plain.history[-1]["bytes_up_total"]  # top-k travelled


def test_a_killed_synchronous_run_on_the_clock_resumes_with_its_clock(tiny_config, tmp_path):
    from fedfm.api import prepare_run
    from fedfm.server.driver import Run

    class Crash(Exception):
        pass

    def crash_at_round_2(record):
        if record["round"] == 2:
            raise Crash

    systems = {"enabled": True, "step_sigma": 1.0, "over_selection": 2.0, "availability": "random",
               "online_fraction": 0.5, "mean_online_s": 5.0}  # fmt: skip
    make = lambda: tiny_config(run={"rounds": 3}, partition={"num_clients": 6},  # noqa: E731
                               sampling={"clients_per_round": 2}, systems=systems)  # fmt: skip
    cfg, run_dir = prepare_run(make(), output=tmp_path / "r")
    with pytest.raises(Crash):
        Run(cfg, run_dir, progress=False, callbacks=[crash_at_round_2]).execute()
    assert load_checkpoint(run_dir / "checkpoint").clock["time"] > 0
    resumed = fedfm.run(resume=run_dir, progress=False)
    whole = fedfm.run(make(), output=tmp_path / "whole", progress=False)
    strip = ("elapsed_s", "round_s", "aggregate_s", "eval_s")  # wall-clock fields
    assert [{k: v for k, v in r.items() if k not in strip} for r in resumed.history] == [
        {k: v for k, v in r.items() if k not in strip} for r in whole.history
    ]
    assert _equal(_params(run_dir), _params(whole.run_dir))


def test_fedbuff_from_the_cli(tiny_config, tmp_path):
    import tomli_w
    from tests.test_checkpoint import cli

    path = tmp_path / "exp.toml"
    path.write_text(tomli_w.dumps(_async_cfg(tiny_config)))
    done = cli(
        "run", path, "--output", tmp_path / "r", "--set", "fedbuff.buffer_size=3", "--set", "run.rounds=2"
    )
    assert done.returncode == 0, done.stderr
    steps = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r.get("event") == "round" and r["round"] > 0]
    assert [r["num_clients"] for r in steps] == [3, 3] and "virtual_time_s" in steps[-1]
