"""Probes of the DP guarantee as an auditor and a hostile client would run them.

Each test attacks a promise: that the mechanism run is the one charged, that nobody can recompute
the noise, that no client-reported value steers the mechanism, that a DP-SGD client's own report of
its ε is never used, and that a release before a crash stays charged.
"""

import json
import math

import pytest
import torch

import fedfm
from fedfm.config import make_config
from fedfm.engines.inprocess import InProcessEngine
from fedfm.privacy import dp
from fedfm.privacy.plan import PrivacyPlan
from fedfm.seeding import torch_generator
from fedfm.server.checkpoint import load_checkpoint
from fedfm.types import ClientResult


def run_through(cfg, output):
    """A run whose every round may be skipped by design (the probe makes it so)."""
    from fedfm.server.driver import RunFailedError

    try:
        return fedfm.run(cfg, output=output, progress=False)
    except RunFailedError as err:
        return err.result


def records(run_dir, event="round"):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["event"] == event]


def final_params(run_dir):
    return load_checkpoint(run_dir / "checkpoint").params


@pytest.mark.parametrize("method", ["fixed", "poisson"])
def test_adaptive_clipping_runs_the_mechanism_it_charges(method):
    """Measure the noise the server half actually adds (on the update sum and on the clipped
    count) and the sensitivities of the sums it actually forms on neighbouring cohorts, then
    compare the multiplier of that joint Gaussian with the one the accountant is charged."""
    cfg = make_config(
        {
            "partition": {"num_clients": 1000},
            "sampling": {"method": method, "clients_per_round": 100},
            "strategy": {"weighting": "uniform"},
            "privacy": {"dp": "client", "noise_multiplier": 1.5, "adaptive_clipping": True, "clip_norm": 2.0},
        }
    )
    plan = PrivacyPlan(cfg, 1000, 100, dim=200_000, note=lambda _: None)
    c, m, g = 2.0, 100, torch.Generator().manual_seed(0)
    state = {"ledger": [], "clip_norm": c}
    aggregate = plan.server_half(dict(state, ledger=[]), 1, {"x": torch.zeros(200_000)}, 0.0, m, g)
    delta_std = (aggregate["x"].double() * m).std().item()
    counts = []
    for _ in range(4000):  # read the noisy fraction back from the new clip norm
        new = dict(state, ledger=[])
        plan.server_half(new, 1, {"x": torch.zeros(1)}, 0.0, m, g)
        fraction = cfg.privacy.target_quantile - math.log(new["clip_norm"] / c) / cfg.privacy.clip_lr
        counts.append(fraction * m - m / 2)
    count_std = torch.tensor(counts).std().item()

    big, small = torch.zeros(4), torch.zeros(4)
    big[0], small[0] = 10 * c, -0.999 * c  # clipped to C with b = 0; within C with b = 1
    base = [{"x": torch.tensor([0.0, 0.3, 0.0, 0.0])}]
    if method == "poisson":  # add one client
        d, d2 = base, [*base, {"x": small}]
    else:  # replace one client's data by another's
        d, d2 = [*base, {"x": big}], [*base, {"x": small}]
    s1, n1, _ = dp.server_sums(d, c)
    s2, n2, _ = dp.server_sums(d2, c)
    sum_shift = (s1["x"].double() - s2["x"].double()).norm().item()
    count_shift = abs(n1 - n2)
    run = ((sum_shift / delta_std) ** 2 + (count_shift / count_std) ** 2) ** -0.5
    charged = 1.5 / plan.sampling.sensitivity  # the Gaussian multiplier dp-accounting is given
    assert run == pytest.approx(charged, rel=0.03)
    assert count_shift == (0.5 if method == "poisson" else 1.0)  # centred bits


def dp_config(tiny_config, **privacy):
    return tiny_config(
        run={"rounds": 1},
        strategy={"weighting": "uniform"},
        privacy={"dp": "client", "noise_multiplier": 2.0, "clip_norm": 0.05, **privacy},
    )


def test_nobody_can_recompute_the_noise_from_the_run_seed(tiny_config, tmp_path):
    """The attack of the audit: recompute the server's noise from run.seed (in config.toml and
    sent to every client) and subtract it. With the default CSPRNG noise it recovers nothing;
    with an explicit privacy.noise_seed it recovers the noise-free model, which is why that
    setting is flagged."""
    clean = fedfm.run(dp_config(tiny_config, noise_multiplier=0.0), output=tmp_path / "clean", progress=False)
    theta0 = final_params(clean.run_dir)  # only for shapes
    target = final_params(clean.run_dir)

    def attack(run_dir, seed):
        got = final_params(run_dir)
        generator = torch_generator(seed, 1, "dp-server")
        noise = dp.gaussian_like({k: v for k, v in theta0.items()}, 2.0 * 0.05, generator)
        return max((got[k] - noise[k] / 4 - target[k]).abs().max().item() for k in got)

    fresh = [
        fedfm.run(dp_config(tiny_config), output=tmp_path / f"fresh{i}", progress=False) for i in range(2)
    ]
    assert attack(fresh[0].run_dir, 0) > 1e-3  # the run seed (0) tells the attacker nothing
    a, b = (final_params(r.run_dir) for r in fresh)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # same config, different noise
    assert records(fresh[0].run_dir)[-1]["noise"] == "secure"
    seeded = fedfm.run(dp_config(tiny_config, noise_seed=77), output=tmp_path / "seeded", progress=False)
    assert attack(seeded.run_dir, 77) < 1e-6  # known seed: the noise-free model comes back
    assert records(seeded.run_dir)[-1]["noise"] == "seeded"
    assert "does not hold against anyone who" in (seeded.run_dir / "report.html").read_text()


def lying(monkeypatch, change):
    """Make the in-process engine's results pass through ``change(result) -> result``."""
    original = InProcessEngine.run_cohort

    def run_cohort(self, params, cohort, ctx):
        for result in original(self, params, cohort, ctx):
            yield change(result) if result.update is not None else result

    monkeypatch.setattr(InProcessEngine, "run_cohort", run_cohort)


@pytest.mark.parametrize("lie", [math.nan, -1e6, 1e6])
def test_client_reported_clipped_bits_do_not_enter_central_dp(tiny_config, tmp_path, monkeypatch, lie):
    """Central DP: the server clips and computes every clipped bit itself, so a client that
    reports a NaN or absurd bit changes nothing — the clip norm stays finite and exactly as
    without the lie (same noise seed)."""
    cfg = dp_config(tiny_config, adaptive_clipping=True, noise_seed=5, clipped_count_stddev=2.0)
    cfg["run"]["rounds"] = 2
    honest = fedfm.run(cfg, output=tmp_path / "honest", progress=False)

    def change(result):
        metrics = {**result.update.metrics, "dp_unclipped": lie}
        return ClientResult(
            result.client_id, update=type(result.update)(**{**vars(result.update), "metrics": metrics})
        )

    lying(monkeypatch, change)
    lied = fedfm.run(cfg, output=tmp_path / "lied", progress=False)
    a, b = records(honest.run_dir)[-1], records(lied.run_dir)[-1]
    assert math.isfinite(b["clip_norm"]) and b["clip_norm"] == a["clip_norm"]
    assert b["epsilon"] == a["epsilon"] > 0


def masked_lie(monkeypatch, index, value):
    """A client that writes ``value`` into entry ``index`` of its secure vector before masking."""
    from fedfm.privacy.secure_round import SecureRound

    original = SecureRound.mask

    def mask(self, client_id, vector):
        if client_id == 0:
            vector = vector.clone()
            vector[index] = value
        return original(self, client_id, vector)

    monkeypatch.setattr(SecureRound, "mask", mask)


def test_an_impossible_masked_bit_count_skips_the_round_with_the_reason(tiny_config, tmp_path, monkeypatch):
    cfg = dp_config(tiny_config, adaptive_clipping=True, clipped_count_stddev=2.0)
    cfg["secagg"] = {"enabled": True}
    masked_lie(monkeypatch, -1, 10**9)  # the centred clipped-bit entry (fixed point)
    result = run_through(cfg, tmp_path / "r")
    last = records(result.run_dir)[-1]
    assert "clipped-bit count" in last["skipped"] and "impossible" in last["skipped"]
    assert last["clip_norm"] == 0.05 and last["epsilon"] > 0  # C untouched; the round still charged


def test_a_masked_count_that_lies_about_contributors_is_caught(tiny_config, tmp_path, monkeypatch):
    cfg = dp_config(tiny_config, noise="distributed")
    cfg["secagg"] = {"enabled": True}
    masked_lie(monkeypatch, -1, 50)  # "I am 50 clients" (would under-report the Skellam ε)
    result = run_through(cfg, tmp_path / "r")
    assert "unmasked count" in records(result.run_dir)[-1]["skipped"]


def test_an_absurd_masked_bit_under_distributed_noise_cannot_push_c_out_of_bounds(
    tiny_config, tmp_path, monkeypatch
):
    cfg = dp_config(tiny_config, noise="distributed", adaptive_clipping=True, clipped_count_stddev=2.0)
    cfg["secagg"] = {"enabled": True}
    masked_lie(monkeypatch, -2, 2**28)  # the Skellam bit entry: noisy, so only its effect can be bounded
    result = fedfm.run(cfg, output=tmp_path / "r", progress=False)
    c = records(result.run_dir)[-1]["clip_norm"]
    eta, gamma = 0.2, 0.5
    assert 0.05 * math.exp(-eta * (1 - gamma)) - 1e-12 <= c <= 0.05 * math.exp(eta * gamma) + 1e-12


def dpsgd_config(tiny_config, **privacy):
    return tiny_config(run={"rounds": 1}, privacy={"dp": "example", "noise_multiplier": 1.2, **privacy})


def test_dp_sgd_epsilon_is_recomputed_by_the_server(tiny_config, tmp_path, monkeypatch):
    from opacus.accountants import RDPAccountant

    def change(result):  # every client claims a tiny ε
        metrics = {**result.update.metrics, "dp_epsilon": 1e-3}
        return ClientResult(
            result.client_id, update=type(result.update)(**{**vars(result.update), "metrics": metrics})
        )

    lying(monkeypatch, change)
    result = fedfm.run(dpsgd_config(tiny_config), output=tmp_path / "r", progress=False)
    sizes = [c["num_train"] for c in json.loads((result.run_dir / "partition.json").read_text())["clients"]]
    expected = []
    for n in sizes:  # 3 steps at q = B / n_k, composed by Opacus' own accountant
        acc = RDPAccountant()
        acc.history = [(1.2, 8 / n, 3)]
        expected.append(acc.get_epsilon(1e-5))
    assert result.final_metrics["epsilon"] == pytest.approx(max(expected))
    assert result.final_metrics["epsilon"] > 1.0


def test_dp_sgd_update_that_ran_weaker_noise_is_rejected(tiny_config, tmp_path, monkeypatch):
    def change(result):
        if result.client_id != 1:
            return result
        metrics = {**result.update.metrics, "dp_noise_multiplier": 0.3}
        return ClientResult(
            result.client_id, update=type(result.update)(**{**vars(result.update), "metrics": metrics})
        )

    lying(monkeypatch, change)
    result = fedfm.run(dpsgd_config(tiny_config), output=tmp_path / "r", progress=False)
    last = records(result.run_dir)[-1]
    assert last["num_clients"] == 3
    assert last["rejected"] == [
        {"client": 1, "reason": "DP-SGD noise multiplier 0.3 is not the configured 1.2 for q = 0.470588"}
    ]


class Crash(RuntimeError):
    pass


def crash_before_checkpoint(monkeypatch, at_round):
    import fedfm.server.driver

    original = fedfm.server.driver.save_checkpoint

    def save(folder, state, clients=None):
        if state.round == at_round:
            raise Crash("power cut")
        return original(folder, state, clients)

    monkeypatch.setattr(fedfm.server.driver, "save_checkpoint", save)


@pytest.mark.parametrize("mode", ["central", "distributed", "seeded"])
def test_a_release_before_a_crash_stays_charged(tiny_config, tmp_path, monkeypatch, mode):
    """Round 2 forms its noisy aggregate (a release), then the process dies before the checkpoint.
    The resumed run draws fresh noise for round 2: a second release, and ε counts both (once, even
    though a distributed round writes its charge before unmasking and again at the aggregate).
    With a noise seed the rerun repeats the first release exactly and nothing extra is charged."""
    extra = {"noise_seed": 9} if mode == "seeded" else {}
    if mode == "distributed":
        extra["noise"] = "distributed"
    cfg = dp_config(tiny_config, noise_multiplier=1.0, **extra)
    cfg["run"]["rounds"] = 2
    if mode == "distributed":
        cfg["secagg"] = {"enabled": True}
    uninterrupted = fedfm.run(cfg, output=tmp_path / "full", progress=False)
    with monkeypatch.context() as m:
        crash_before_checkpoint(m, 2)
        with pytest.raises(Crash):
            fedfm.run(cfg, output=tmp_path / "crashed", progress=False)
    resumed = fedfm.run(resume=tmp_path / "crashed", progress=False)
    ledger = load_checkpoint(tmp_path / "crashed" / "checkpoint").privacy["ledger"]
    full_eps = uninterrupted.final_metrics["epsilon"]
    if mode == "seeded":
        assert len(ledger) == 2 and resumed.final_metrics["epsilon"] == pytest.approx(full_eps)
    else:
        assert len(ledger) == 3 and [e.get("lost", False) for e in ledger] == [False, True, False]
        assert resumed.final_metrics["epsilon"] > full_eps
    assert not (tmp_path / "crashed" / "checkpoint" / "privacy-wal.jsonl").exists()
