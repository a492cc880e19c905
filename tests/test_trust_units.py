"""Small probes of the trust machinery that need no run: field sizing, budgets, write-ahead
charges across two crashes, a late upload, and the upload watchdog."""

import json
import threading
import time

import pytest
import torch

from fedfm.config import make_config
from fedfm.privacy.skellam import SkellamRound


def test_an_all_clipped_cohort_does_not_wrap_the_clipped_bit_count():
    """Adaptive clipping under distributed noise: the bit entry sums to −n·h/2 when every client
    clips; the field must hold that (else C would move the wrong way)."""
    n = 100
    plan = SkellamRound.plan(
        64, 1.0, 1.0, cohort=n, bits=24, wrap_stddevs=8, rotation_seed=0, count_stddev=5.0
    )
    g = torch.Generator().manual_seed(0)
    modulus = 1 << plan.bits
    total = torch.zeros(plan.length, dtype=torch.int64)
    for _ in range(n):
        total = (total + plan.encode(torch.zeros(64), 0.0, g)) % modulus
    centred = torch.where(total >= modulus // 2, total - modulus, total)
    _, count = plan.decode(centred)
    assert count == pytest.approx(-n / 2, abs=5 * 5.0)  # Σ (b − ½) with every b = 0, plus noise σ_b ≈ 5


def distributed_privacy(tmp_path, **privacy):
    from fedfm.privacy.server import RunPrivacy

    cfg = make_config(
        {
            "partition": {"num_clients": 10},
            "sampling": {"fraction": 1.0},
            "strategy": {"weighting": "uniform"},
            "secagg": {"enabled": True},
            "privacy": {"dp": "client", "noise": "distributed", **privacy},
        }
    )
    return RunPrivacy(cfg, 10, 10, 100, tmp_path / "checkpoint", note=lambda _: None)


def test_a_distributed_round_with_too_few_noise_shares_is_not_unmasked(tmp_path):
    from fedfm.privacy.server import ReleaseRefused

    rp = distributed_privacy(tmp_path, target_epsilon=20.0)
    state = rp.initial_state()
    skellam = rp.skellam_round(state, 10, 0)
    rp.before_release(state, 1, 10, skellam)  # the planned cohort fits the budget
    with pytest.raises(ReleaseRefused, match="only 1 noise shares"):
        rp.before_release(state, 1, 1, skellam)


def test_every_crashed_attempt_stays_charged(tmp_path):
    """Round 3 released, crash; resumed, round 3 released again (twice: distributed writes its
    charge before unmasking and at the aggregate), crash again: three releases, two of them lost."""
    first = distributed_privacy(tmp_path, noise_multiplier=2.0)
    state = first.initial_state()
    skellam = first.skellam_round(state, 10, 0)
    first.before_release(state, 3, 10, skellam)
    second = distributed_privacy(tmp_path, noise_multiplier=2.0)
    assert len(second.resume(second.initial_state(), 2)) == 1
    second.before_release(state, 3, 10, skellam)
    second.before_release(state, 3, 10, skellam)  # the same release, written twice
    third = distributed_privacy(tmp_path, noise_multiplier=2.0)
    resumed = third.initial_state()
    assert len(third.resume(resumed, 2)) == 2 and len(resumed["ledger"]) == 2
    lines = [json.loads(x) for x in (tmp_path / "checkpoint" / "privacy-wal.jsonl").read_text().splitlines()]
    assert len({x["attempt"] for x in lines}) == 2


def test_a_late_upload_cannot_mark_the_next_round():
    from fedfm.deploy.auth import Roster
    from fedfm.deploy.engine import Coordinator

    coord = Coordinator(Roster([]), "", [], "run")
    coord.round, coord.step, coord.waiting_for = 4, None, {1, 2}
    coord.admit(1, {"round": 4})
    coord.round, coord.waiting_for = 5, {1, 2}  # round 4 ended; round 5 asks client 1 again
    assert not coord.delivered(1, 4, None) and coord.waiting_for == {1, 2}
    assert coord.delivered(1, 5, None) and coord.waiting_for == {2}


def test_the_upload_watchdog_cuts_a_stall_not_a_slow_steady_upload():
    from fedfm.deploy.server import Watchdog

    cut = threading.Event()
    dog = Watchdog(0.3, cut.set)
    steady = list(dog.passing(iter_slowly(8, 0.1)))  # 0.8 s in all, never 0.3 s without a chunk
    assert len(steady) == 8 and not cut.is_set()
    time.sleep(0.5)
    assert cut.is_set()
    dog.stop()


def iter_slowly(n, pause):
    for i in range(n):
        time.sleep(pause)
        yield i
