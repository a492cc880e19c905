"""fedfm reproduce: intervals and paired tests against hand computations and scipy, the judge's
rules, the catalogue, the unsourced-table check, and real reruns (a script entry recorded then
judged both ways; the real catalogue's cheapest entry at its quick size)."""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfm.reproduce import Measurement, find_root, interval, judge, load, paired, reproduce, select
from fedfm.reproduce.judge import passed
from fedfm.reproduce.render import numeric_tables, sweep_table
from fedfm.reproduce.results import KINDS

ROOT = Path(__file__).resolve().parents[1]


def test_interval_by_hand():
    # [1, 2, 3]: mean 2, s = 1, t(0.975, 2) = 4.302653 → half-width 4.302653 / √3 = 2.48414
    iv = interval([1.0, 2.0, 3.0])
    assert iv.mean == 2.0 and iv.n == 3
    assert iv.half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert iv.format(2) == "2.00 ± 2.48"
    one = interval([0.5])
    assert one.half is None and one.contains(0.5) and not one.contains(0.5001)


def test_paired_test_by_hand_and_against_scipy():
    # differences 0.5, 0.6, 0.4: mean 0.5, s = 0.1, t = 0.5 / (0.1 / √3) = 8.660, df 2 → p = 0.01307
    a, b = {0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.5, 1: 1.4, 2: 2.6}
    test = paired(a, b)
    assert test.p == pytest.approx(0.013072, rel=1e-4) and test.verdict == "better"
    assert paired(b, a).verdict == "worse"
    assert paired(a, b, higher_is_better=False).verdict == "worse"  # a lower loss is better
    noisy = paired({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.5, 1: 1.5, 2: 2.9})
    assert noisy.verdict == "no clear difference"
    with pytest.raises(ValueError, match="at least 2 shared seeds"):
        paired({0: 1.0, 1: 2.0}, {1: 1.0, 2: 3.0})


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-100, 100), min_size=2, max_size=8),
    st.lists(st.floats(-5, 5), min_size=8, max_size=8),
)
def test_paired_matches_scipy_and_intervals_cover_the_mean(xs, noise):
    from scipy.stats import ttest_rel

    ys = [x + e for x, e in zip(xs, noise, strict=False)]
    a, b = dict(enumerate(xs)), dict(enumerate(ys))
    iv = interval(xs)
    assert iv.low <= iv.mean <= iv.high
    diffs = [x - y for x, y in zip(xs, ys, strict=True)]
    if max(diffs) - min(diffs) < 1e-9:
        return  # scipy's p is undefined for constant differences
    ours, theirs = paired(a, b), ttest_rel(xs, ys)
    assert ours.p == pytest.approx(float(theirs.pvalue), rel=1e-6, abs=1e-12)


def m(name, kind, values, seeds=None, **group):
    return Measurement(name, kind, values, seeds or list(range(len(values))), group)


def test_the_judge_exact_interval_and_machine_rules():
    committed = [
        m("bytes moved", "bytes", [100.0, 100.0]),
        m("final acc", "accuracy", [0.80, 0.84, 0.82], alpha="0.1"),
        m("step s", "seconds", [1.0, 1.1]),
    ]
    same = [
        m("bytes moved", "bytes", [100.0, 100.0]),
        m("final acc", "accuracy", [0.81, 0.83, 0.82], alpha="0.1"),
        m("step s", "seconds", [3.0, 3.1]),
    ]
    verdicts = judge(committed, same, same_machine=False)
    assert [v.verdict for v in verdicts] == ["same", "within", "reported"] and passed(verdicts)
    # on the committed machine a 3× slower step is judged, and falls outside
    assert judge(committed, same, same_machine=True)[2].verdict == "outside"
    off = [
        m("bytes moved", "bytes", [100.0, 101.0]),
        m("final acc", "accuracy", [0.5, 0.5, 0.5], alpha="0.1"),
    ]
    verdicts = judge(committed, off, same_machine=False)
    assert [v.verdict for v in verdicts] == ["differs", "outside", "missing"] and not passed(verdicts)
    with pytest.raises(ValueError, match="unknown kind"):
        m("x", "accuracyy", [1.0])


def test_the_catalogue_and_selection(tmp_path):
    root = find_root(ROOT / "docs")
    entries = load(root)
    names = [e.name for e in entries]
    assert "default-experiment" in names and len(names) == len(set(names))
    assert [e.name for e in select(entries, ["default-experiment"])] == ["default-experiment"]
    assert {e.group for e in select(entries, ["experiments"])} == {"experiments"}
    assert select(entries, ["all"]) == entries
    gpu = next(e for e in entries if e.gpu)
    [outcome] = reproduce([gpu], tmp_path, quick=True, note=lambda s: None) if not _cuda() else [None]
    if outcome is not None:
        assert outcome.ok and outcome.status == "skipped: needs a GPU; committed result only"
    with pytest.raises(ValueError, match="did you mean 'default-experiment'"):
        select(entries, ["default-experimnt"])
    for e in entries:  # every entry points at what it reruns, and at committed results
        assert (root / (e.sweep or e.command[1])).is_file(), e.name
        assert (root / e.results).is_file(), f"{e.name}: {e.results} is not committed"
        if not e.gpu:  # a GPU entry's quick results can only be recorded where a GPU is lent
            assert (root / e.results_path(quick=True)).is_file(), f"{e.name}: no committed quick results"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_numeric_tables_outside_markers_are_found():
    doc = textwrap.dedent(
        """\
        | a | b |
        | --- | --- |
        | x | 0.93 |

        <!-- results:sweep/x -->
        | a | b |
        | --- | --- |
        | x | 0.93 |
        <!-- /results:sweep/x -->

        | option | meaning |
        | --- | --- |
        | rounds | how many |
        """
    )
    assert numeric_tables(doc) == [(1, "| a | b |")]


SCRIPT = """\
import json, sys
from fedfm.reproduce.results import Measurement, stamp, write
out, bytes_moved = sys.argv[1], float(sys.argv[2])
found = [Measurement("bytes moved", "bytes", [bytes_moved], [0]),
         Measurement("final acc", "accuracy", [0.80, 0.82], [0, 1])]
write(out, stamp("test/tiny", {}, [0, 1]), found, 0.1, quick=False)
"""


def catalogue(root: Path, bytes_moved: int) -> None:
    (root / "benchmarks").mkdir(parents=True, exist_ok=True)
    (root / "bench.py").write_text(SCRIPT)
    (root / "benchmarks" / "reproduce.toml").write_text(
        textwrap.dedent(
            f"""\
            [[entry]]
            name = "tiny"
            group = "test"
            doc = "nowhere"
            command = ["{{python}}", "bench.py", "{{out}}", "{bytes_moved}"]
            results = "results/tiny.json"
            cost_min = 0.1
            quick_cost_min = 0.1
            """
        )
    )


def test_a_script_entry_is_recorded_then_judged_both_ways(tmp_path):
    catalogue(tmp_path, 1000)
    entries = load(tmp_path)
    [recorded] = reproduce(entries, tmp_path, record=True, note=lambda s: None)
    assert recorded.status.startswith("recorded") and (tmp_path / "results" / "tiny.json").is_file()
    [same] = reproduce(entries, tmp_path, note=lambda s: None)
    assert same.ok and [v.verdict for v in same.verdicts] == ["same", "within"]
    catalogue(tmp_path, 1001)  # the code now moves one more byte: the rerun says so
    [changed] = reproduce(load(tmp_path), tmp_path, note=lambda s: None)
    assert not changed.ok and changed.verdicts[0].verdict == "differs"
    report = json.loads((tmp_path / "benchmarks/results/reproduced/comparison.json").read_text())
    assert (
        report[0]["ok"] is False
        and "differs" in (tmp_path / "benchmarks/results/reproduced/comparison.md").read_text()
    )


def test_the_cheapest_real_entry_reruns_at_its_quick_size_and_matches(tmp_path):
    """`fedfm reproduce default-experiment --quick` from the command line: the embedded default
    experiment at its quick size (1 round, 300 examples, seeds 0 and 1), judged against the
    committed quick results: bytes exactly, accuracies within the committed interval."""
    import shutil
    import subprocess

    root = tmp_path / "checkout"
    for part in ("benchmarks/reproduce.toml", "examples", "docs/results"):
        src, dst = ROOT / part, root / part
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedfm.cli",
            "reproduce",
            "default-experiment",
            "--quick",
            "--root",
            str(root),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = json.loads((root / "benchmarks/results/reproduced/comparison.json").read_text())
    # Wall seconds are judged too on the machine that committed them, and a loaded machine (the
    # suite runs on every core) may fall outside: only machine-dependent kinds may fail here.
    failing = [v for v in report[0]["verdicts"] if v["verdict"] in ("differs", "outside", "missing")]
    assert all(KINDS[v["kind"]] == "machine" for v in failing), failing
    assert done.returncode == (1 if failing else 0), done.stdout[-3000:] + done.stderr[-3000:]
    verdicts = {v["name"]: v["verdict"] for v in report[0]["verdicts"]}
    assert verdicts["bytes moved"] == "same" and verdicts["final test_accuracy"] == "within"
    fresh = json.loads((root / "benchmarks/results/reproduced/default-experiment.quick.json").read_text())
    assert fresh["quick"] is True and fresh["seeds"] == [0, 1]
    assert "| seeds |" in sweep_table(fresh)
