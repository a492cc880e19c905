"""The bytes that cross the network: chunking, tensor packing, context round trips."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedfm.types import RoundContext
from fedfm.wire import (
    WireError,
    chunks,
    context_from,
    context_header,
    join,
    pack_tensors,
    unpack_tensors,
)


@given(st.binary(max_size=5000), st.integers(min_value=1, max_value=700))
def test_chunks_join_back_to_the_same_message(blob, size):
    pieces = list(chunks({"round": 3}, blob, size))
    assert all(len(d) <= size for _, d in pieces) and pieces[0][0] and not any(h for h, _ in pieces[1:])
    assert len(pieces) == max(1, -(-len(blob) // size))
    header, data = join(pieces)
    assert data == blob and header["round"] == 3 and header.get("nbytes", 0) == len(blob)
    if blob:  # the size and digest ride in the header; a changed byte is refused
        bad = [(pieces[0][0], bytes([pieces[0][1][0] ^ 1]) + pieces[0][1][1:]), *pieces[1:]]
        with pytest.raises(WireError, match="SHA-256"):
            join(bad)


def test_join_refuses_broken_streams():
    with pytest.raises(WireError, match="no chunks"):
        join([])
    with pytest.raises(WireError, match="no header"):
        join([("", b"x")])
    with pytest.raises(WireError, match="not JSON"):
        join([("{", b"x")])


def test_tensors_keep_their_groups_dtypes_and_insertion_order():
    params = {"z.weight": torch.randn(3, 2), "a.bias": torch.arange(4, dtype=torch.int8)}
    control = {"m": torch.ones(2, dtype=torch.float16)}
    groups = unpack_tensors(pack_tensors({"p": params, "c": control, "none": None}))
    assert list(groups) == ["p", "c"] and list(groups["p"]) == ["z.weight", "a.bias"]
    for k, v in params.items():
        assert torch.equal(groups["p"][k], v) and groups["p"][k].dtype == v.dtype
    assert torch.equal(groups["c"]["m"], control["m"])
    assert unpack_tensors(b"") == {}
    with pytest.raises(WireError, match="not a valid safetensors"):
        unpack_tensors(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")


def test_round_context_round_trip_with_dp_settings():
    from fedfm.privacy.dp import DpRound

    ctx = RoundContext(round=4, seed=7, dp=DpRound(0.5, True))
    back = context_from(context_header(ctx), {"c": torch.zeros(1)})
    assert back.round == 4 and back.seed == 7 and back.dp == ctx.dp and "c" in back.server_control
