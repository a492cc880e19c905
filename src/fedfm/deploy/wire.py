"""What crosses the network, as bytes: tensors in safetensors, everything else in JSON headers.

A task (server → client) is the global trainable state plus SCAFFOLD's server control; an
update (client → server) is the encoded delta plus SCAFFOLD's control delta. Both are one
safetensors blob whose tensor names are prefixed (``p/``, ``c/``), so one parser reads both.
Messages are streamed as chunks of at most ``CHUNK`` bytes (pure functions below).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedfm.types import Params

CHUNK = 1 << 20  # 1 MiB: far below gRPC's default 4 MiB message limit


class WireError(ValueError):
    """Bytes that do not decode into what the protocol expects; the message says what is wrong."""


def pack_tensors(groups: dict[str, Params | None]) -> bytes:
    """Several named groups of tensors in one safetensors blob (``None`` groups are left out)."""
    flat = {}
    for prefix, params in groups.items():
        for name, tensor in (params or {}).items():
            flat[f"{prefix}/{name}"] = tensor.detach().to("cpu").contiguous()
    # safetensors stores names sorted; the order is kept in the metadata because seeded draws that
    # walk a dict (DP noise, stochastic rounding) must see the same order on both sides
    return st_save(flat, metadata={"order": json.dumps(list(flat))}) if flat else b""


def unpack_tensors(blob: bytes) -> dict[str, Params]:
    """The inverse of ``pack_tensors``; malformed bytes raise ``WireError``."""
    if not blob:
        return {}
    try:
        flat = st_load(blob)
        order = json.loads(blob_metadata(blob).get("order", "[]"))
    except Exception as err:
        raise WireError(f"payload is not a valid safetensors blob ({type(err).__name__}: {err})") from None
    if sorted(order) != sorted(flat):
        order = sorted(flat)
    groups: dict[str, Params] = {}
    for key in order:
        tensor = flat[key]
        prefix, _, name = key.partition("/")
        if not name:
            raise WireError(f"payload tensor {key!r} has no group prefix")
        groups.setdefault(prefix, {})[name] = tensor
    return groups


def blob_metadata(blob: bytes) -> dict:
    """The ``__metadata__`` of a safetensors blob (its JSON header, after an 8-byte length)."""
    size = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + size]).get("__metadata__") or {}


def chunks(header: dict, blob: bytes, size: int = CHUNK) -> Iterator[tuple[str, bytes]]:
    """(header JSON, data) pairs: the header rides on the first chunk; at least one chunk."""
    text = json.dumps(header)
    if not blob:
        yield text, b""
        return
    for i, start in enumerate(range(0, len(blob), size)):
        yield (text if i == 0 else ""), blob[start : start + size]


def join(pieces: Iterable[tuple[str, bytes]]) -> tuple[dict, bytes]:
    """The header and the whole payload of a chunk stream."""
    header, parts = None, []
    for text, data in pieces:
        if header is None:
            if not text:
                raise WireError("the first chunk carries no header")
            try:
                header = json.loads(text)
            except json.JSONDecodeError as err:
                raise WireError(f"chunk header is not JSON: {err}") from None
        parts.append(data)
    if header is None:
        raise WireError("empty message: no chunks")
    return header, b"".join(parts)


def context_header(ctx) -> dict:
    """The JSON part of a RoundContext (its tensors travel in the payload)."""
    dp = None
    if ctx.dp is not None:
        dp = {"kind": type(ctx.dp).__name__, **dataclasses.asdict(ctx.dp)}
    return {"round": ctx.round, "seed": ctx.seed, "dp": dp, "secure": ctx.secure is not None}


def context_from(header: dict, server_control: Params | None, secure=None):
    """Rebuild the RoundContext a client trains with (``secure``: its masker under secure aggregation)."""
    from fedfm.types import RoundContext

    dp = header.get("dp")
    if dp is not None:
        kind = dp.pop("kind")
        if kind == "DpRound":
            from fedfm.privacy.dp import DpRound as cls
        elif kind == "ExampleDp":
            from fedfm.privacy.dpsgd import ExampleDp as cls
        else:
            raise WireError(f"unknown DP setting {kind!r}")
        dp = cls(**dp)
    if header.get("secure") and secure is None:
        raise WireError("the round uses secure aggregation but this client has not set it up")
    return RoundContext(
        round=header["round"], seed=header["seed"], server_control=server_control, dp=dp, secure=secure
    )


def float_metrics(metrics: dict) -> dict:
    """Client metrics as plain floats (JSON)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


__all__ = ["CHUNK", "WireError", "chunks", "join", "pack_tensors", "unpack_tensors"]
