"""What crosses the network, as bytes: tensors in safetensors, everything else in JSON headers.

A task (server → client) is the global trainable state plus SCAFFOLD's server control; an
update (client → server) is the encoded delta plus SCAFFOLD's control delta. Both are one
safetensors blob whose tensor names are prefixed (``p/``, ``c/``), so one parser reads both.
Messages are streamed as chunks of at most ``CHUNK`` bytes (pure functions below).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
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
    """(header JSON, data) pairs: the header rides on the first chunk, with the payload's size and
    SHA-256 when there is one; at least one chunk. (Tensors stream without a blob:
    ``fedfm.wire.stream.TensorStream``.)"""
    if not blob:
        yield json.dumps(header), b""
        return
    text = json.dumps({**header, **declared(blob)})
    for i, start in enumerate(range(0, len(blob), size)):
        yield (text if i == 0 else ""), blob[start : start + size]


MAX_HEADER = 4 << 20  # a message's JSON header (secure-aggregation steps ride in it)


def _no_constant(name: str):
    raise WireError(f"the JSON header holds {name}, which is not a JSON number")


def parse_header(text: str) -> dict:
    """A chunk header: strict JSON (no NaN / Infinity), an object, at most ``MAX_HEADER`` bytes."""
    if len(text) > MAX_HEADER:
        raise WireError(f"the chunk header is {len(text)} bytes, more than {MAX_HEADER}")
    try:
        header = json.loads(text, parse_constant=_no_constant)
    except (json.JSONDecodeError, RecursionError, ValueError) as err:
        raise WireError(f"chunk header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise WireError("the chunk header must be a JSON object")
    return header


def declared(blob: bytes) -> dict:
    """What a message header says of a payload blob: its size and SHA-256 (nothing if empty)."""
    return {"nbytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()} if blob else {}


def declared_size(header: dict, limit: int | None) -> tuple[int, str | None]:
    """The payload size and digest a message header declares (``nbytes``, ``sha256``), checked
    against ``limit`` before any payload is read (``WireError`` otherwise)."""
    nbytes, sha = header.get("nbytes", 0), header.get("sha256")
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise WireError(f"nbytes must be a non-negative integer, got {str(nbytes)[:40]!r}")
    if nbytes and not (isinstance(sha, str) and len(sha) == 64 and set(sha) <= set("0123456789abcdef")):
        raise WireError("a message with a payload must declare its sha256 (64 lowercase hex digits)")
    if limit is not None and nbytes > limit:
        raise WireError(
            f"the payload declares {nbytes} bytes, more than {limit}, the most this message may carry"
        )
    return nbytes, sha


def join(pieces: Iterable[tuple[str, bytes]], max_bytes: int | None = None, admit=None) -> tuple[dict, bytes]:
    """The header and the whole payload of a small chunk stream (a cut exchange, a poll reply).

    ``admit(header)`` runs on the first chunk, before any more is read: it returns the byte limit
    for the payload (or raises ``WireError`` to refuse the message); ``max_bytes`` caps it too.
    The declared size is checked against the limit before reading, every chunk against the
    declared size, and the SHA-256 at the end. Large payloads are spooled to a file instead
    (``fedfm.wire.stream.spool``).
    """
    header, parts, size, nbytes, sha = None, [], 0, 0, None
    for text, data in pieces:
        if header is None:
            if not text:
                raise WireError("the first chunk carries no header")
            header = parse_header(text)
            if admit is not None:
                limit = admit(header)
                max_bytes = limit if max_bytes is None else min(max_bytes, limit)
            nbytes, sha = declared_size(header, max_bytes)
        size += len(data)
        if size > nbytes:
            raise WireError(f"the payload passes the {nbytes} bytes its header declared")
        parts.append(data)
    if header is None:
        raise WireError("empty message: no chunks")
    if size < nbytes:
        raise WireError(f"the stream ended after {size} of {nbytes} bytes")
    blob = b"".join(parts)
    if nbytes and hashlib.sha256(blob).hexdigest() != sha:
        raise WireError("the payload's SHA-256 differs from the one its header declared")
    return header, blob


PRIVACY_PURPOSES = ("dp", "dp-sgd")  # the draws a client makes from the noise source


def context_header(ctx, client_id: int | None = None) -> dict:
    """The JSON part of a RoundContext for one client (its tensors travel in the payload).

    Privacy randomness: nothing is sent when the noise is fresh (the client draws its own from the
    OS); with a noise seed, only this client's own per-purpose seeds for this round."""
    dp = None
    if ctx.dp is not None:
        dp = {"kind": type(ctx.dp).__name__, **dataclasses.asdict(ctx.dp)}
    header = {"round": ctx.round, "seed": ctx.seed, "dp": dp, "secure": ctx.secure is not None}
    if ctx.noise is not None and ctx.noise.reproducible and client_id is not None:
        given = ctx.noise.for_client(ctx.round, client_id, PRIVACY_PURPOSES).given
        header["noise_seeds"] = [list(p) for p in given]
    return header


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
    from fedfm.seeding import NoiseSource

    given = tuple((str(p), int(v)) for p, v in header.get("noise_seeds", []))
    return RoundContext(
        round=header["round"],
        seed=header["seed"],
        server_control=server_control,
        dp=dp,
        secure=secure,
        noise=NoiseSource(given=given),
    )


def float_metrics(metrics: dict) -> dict:
    """Client metrics as plain finite floats (JSON has no NaN: a non-finite value is left out)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


MAX_METRICS = 64
RESERVED = {"event", "round", "client", "num_examples", "stage", "reason"}


def received_metrics(value) -> dict[str, float]:
    """A client's metrics as the server accepts them: at most 64 short names, finite floats."""
    if not isinstance(value, dict) or len(value) > MAX_METRICS:
        raise WireError(f"metrics must be an object of at most {MAX_METRICS} entries")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or len(k) > 64:
            raise WireError("metric names must be strings of at most 64 characters")
        if k in RESERVED:
            raise WireError(f"metric name {k!r} is reserved for the server's own fields")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise WireError(f"metric {k!r} is not a finite number")
        out[k] = float(v)
    return out


def bounded_int(value, low: int, high: int, what: str) -> int:
    """A JSON integer within [low, high] (booleans and floats refused), else ``WireError``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise WireError(f"{what} must be an integer in [{low}, {high}], got {str(value)[:40]!r}")
    return value
