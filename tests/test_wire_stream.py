"""Updates of any size: tensors streamed from memory, spooled to a file, read one tensor at a time."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load

from fedfm.algorithms.aggregators import weighted_mean
from fedfm.transforms.validation import update_problem
from fedfm.types import Update
from fedfm.wire import WireError, pack_tensors, unpack_tensors
from fedfm.wire import stream as ws
from fedfm.wire.stream import BrokenStream, TensorStream, load_groups, open_groups, spool

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.bool]


@st.composite
def groups(draw):
    out = {}
    for prefix in draw(st.lists(st.sampled_from(["p", "c", "e"]), unique=True, max_size=3)):
        names = draw(st.lists(st.text("abcxyz._", min_size=1, max_size=6), unique=True, max_size=4))
        out[prefix] = {}
        for n in names:
            shape = draw(st.lists(st.integers(0, 5), max_size=3))
            dtype = draw(st.sampled_from(DTYPES))
            out[prefix][n] = (torch.rand(shape) * 10).to(dtype)
    return out


@settings(max_examples=60, deadline=None)
@given(groups(), st.integers(min_value=1, max_value=300))
def test_a_stream_is_a_safetensors_file_in_chunks_of_the_asked_size(g, size):
    s = TensorStream(g)
    pieces = list(s.pieces(size))
    blob = b"".join(pieces)
    assert len(blob) == s.nbytes and all(len(p) == size for p in pieces[:-1])
    assert s.digest() == hashlib.sha256(blob).hexdigest() if blob else s.nbytes == 0
    back = unpack_tensors(blob)  # what safetensors itself reads, in the sender's order
    want = {p: t for p, t in g.items() if t}
    assert list(back) == list(want)
    for p, params in want.items():
        assert list(back[p]) == list(params)
        for k, v in params.items():
            assert back[p][k].dtype == v.dtype and torch.equal(back[p][k], v)
    if blob:  # the same tensors as pack_tensors gives (the bytes may be laid out differently)
        assert st_load(blob).keys() == st_load(pack_tensors(g)).keys()


def message(g, size=64, header=None):
    return list(TensorStream(g).message(header or {"round": 1}, size))


G = {"p": {"w": torch.randn(6, 5), "b": torch.randn(5)}, "c": {"x": torch.arange(3.0)}}


def test_spooled_payload_reads_back_tensor_by_tensor_and_the_file_goes_with_it(tmp_path):
    header, path = spool(message(G), tmp_path)
    assert header["round"] == 1 and header["nbytes"] == path.stat().st_size
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    lazy = open_groups(path)
    assert list(lazy["p"]) == ["w", "b"] and "w" in lazy["p"] and len(lazy["p"]) == 2
    assert torch.equal(lazy["p"]["w"], G["p"]["w"]) and torch.equal(lazy["c"]["x"], G["c"]["x"])
    with pytest.raises(KeyError):
        lazy["p"]["nope"]
    c = lazy["c"]
    del lazy
    assert path.exists()  # one group still reads from it
    del c
    assert not path.exists()
    _, path = spool(message(G), tmp_path)
    eager = load_groups(path)
    assert not path.exists() and torch.equal(eager["p"]["b"], G["p"]["b"])


def test_validation_and_the_streaming_mean_read_spilled_updates_as_they_read_memory(tmp_path):
    ups = [{k: torch.randn(4, 3) for k in "abc"} for _ in range(3)]
    lazy = [open_groups(spool(message({"p": u}), tmp_path)[1])["p"] for u in ups]
    ref = {k: torch.zeros(4, 3) for k in "abc"}
    for u in lazy:
        assert update_problem(Update(u, 5), ref, max_norm=100.0) is None
    assert "exceeds" in update_problem(Update(lazy[0], 5), ref, max_norm=1e-3)
    got = weighted_mean((u, w) for u, w in zip(lazy, [1.0, 2.0, 3.0], strict=True))
    want = weighted_mean((u, w) for u, w in zip(ups, [1.0, 2.0, 3.0], strict=True))
    assert all(torch.equal(got[k], want[k]) for k in want)


class Logged(dict):
    """An update that logs which of its tensors are read, in order."""

    def __init__(self, data, log, who):
        super().__init__(data)
        self.log, self.who = log, who

    def __getitem__(self, k):
        self.log.append((k, self.who))
        return super().__getitem__(k)


RULES = ["median", "trimmed_mean", "krum", "multi_krum", "bulyan", "norm_bound", "geometric_median"]


@pytest.mark.parametrize("rule", RULES)
def test_robust_rules_read_spilled_updates_one_tensor_name_at_a_time(tmp_path, rule):
    """The rules hold one tensor of every update at a time, never every update: every read of a
    name across the cohort comes before the next name's (per pass), and spilled updates give the
    same aggregate as the same updates in memory."""
    from fedfm.algorithms.aggregators import AGGREGATORS

    torch.manual_seed(0)
    ups = [{k: torch.randn(5, 4) * (1 + i) for k in ["a", "b", "c"]} for i in range(7)]
    spilled = [open_groups(spool(message({"p": u}), tmp_path)[1])["p"] for u in ups]
    fn = AGGREGATORS.get(rule)
    want = fn([(u, float(i + 1)) for i, u in enumerate(ups)])
    got = fn([(u, float(i + 1)) for i, u in enumerate(spilled)])
    assert all(torch.equal(got[k], want[k]) for k in want)
    log: list = []
    fn([(Logged(u, log, i), 1.0) for i, u in enumerate(ups)])
    names = [k for k, _ in log]
    runs = [k for i, k in enumerate(names) if i == 0 or names[i - 1] != k]  # consecutive groups
    assert len(runs) % 3 == 0 and all(runs[i : i + 3] == ["a", "b", "c"] for i in range(0, len(runs), 3))


class Reader:
    """A chunk stream that counts what the receiver pulled from it."""

    def __init__(self, pieces):
        self.pieces, self.read = pieces, 0

    def __iter__(self):
        for p in self.pieces:
            self.read += 1
            yield p


def test_the_declared_size_is_checked_before_a_byte_of_payload_is_read(tmp_path):
    r = Reader(message(G, size=16))
    with pytest.raises(WireError, match="declares .* more than 100, the most"):
        spool(r, tmp_path, admit=lambda h: 100)
    assert r.read == 1 and not os.listdir(tmp_path)
    with pytest.raises(WireError, match="declares"):
        spool(message(G), tmp_path, max_bytes=10)


def test_short_long_corrupt_and_undeclared_payloads_are_refused_and_leave_no_file(tmp_path):
    m = message(G, size=16)
    with pytest.raises(BrokenStream, match="broke off after .* send it again"):
        spool(m[:-2], tmp_path)
    with pytest.raises(WireError, match="passes the"):
        spool([*m, ("", b"extra")], tmp_path)
    flipped = list(m)
    flipped[2] = ("", bytes([flipped[2][1][0] ^ 1]) + flipped[2][1][1:])
    with pytest.raises(WireError, match="SHA-256 differs"):
        spool(flipped, tmp_path)
    with pytest.raises(WireError, match="passes the 0 bytes"):  # data without a declared size
        spool([('{"round": 1}', b"abc")], tmp_path)
    with pytest.raises(WireError, match="sha256"):
        spool([('{"nbytes": 3}', b"abc")], tmp_path)
    with pytest.raises(WireError, match="nbytes must be"):
        spool([('{"nbytes": -1}', b"")], tmp_path)
    assert not os.listdir(tmp_path)


def test_a_transport_failure_after_the_header_is_a_broken_stream_before_it_is_the_error(tmp_path):
    def failing(after):
        yield from message(G, size=16)[:after]
        raise ConnectionError("reset")

    with pytest.raises(BrokenStream, match="broke after 16 of"):
        spool(failing(1), tmp_path)
    with pytest.raises(ConnectionError):
        spool(failing(0), tmp_path)
    assert not os.listdir(tmp_path)


def test_a_payload_the_disk_cannot_hold_is_refused_before_it_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(ws, "DISK_RESERVE", 1 << 62)
    with pytest.raises(WireError, match="disk free"):
        spool(message(G), tmp_path)
    assert not os.listdir(tmp_path)


def test_a_malformed_file_with_a_matching_digest_is_refused_and_removed(tmp_path):
    junk = b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}"
    text = f'{{"nbytes": {len(junk)}, "sha256": "{hashlib.sha256(junk).hexdigest()}"}}'
    _, path = spool([(text, junk)], tmp_path)
    with pytest.raises(WireError, match="not a valid safetensors"):
        open_groups(path)
    assert not path.exists()


def test_deadlines_follow_the_byte_count():
    assert ws.transfer_s(0) == 0 and ws.transfer_s(1 << 30) == (1 << 30) / ws.SLOWEST_LINK == 128.0
