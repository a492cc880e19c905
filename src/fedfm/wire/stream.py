"""Tensors as a byte stream both ways, never joined into one object: updates of any size.

A sender streams a safetensors file straight from its tensors (``TensorStream``): the header is
computed from the shapes, then each tensor's bytes are cut into chunks as they go, so sending a
1 GiB update holds one chunk beside the tensors. The message header says how many bytes follow
(``nbytes``) and their SHA-256 (``sha256``), so the receiver checks the size against its limit
before reading a byte, and the digest before anything uses the data.

A receiver writes the chunks to a spill file while hashing (``spool``), then reads it tensor by
tensor (``open_groups``: a mapping that loads one tensor from the file when it is asked for, and
removes the file when the last reference to it goes). The round's validation and the streaming
mean read one tensor at a time; the robust rules read the same tensor of every spilled update,
one tensor name at a time. A stream that ends before its declared size is a ``BrokenStream``
(send again); one whose digest differs is refused.

Deadlines follow the byte count: ``transfer_s(nbytes)`` is the time a transfer may take at
``SLOWEST_LINK`` bytes per second, on top of the fixed allowance for the call itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

from fedfm.types import Params
from fedfm.wire.messages import CHUNK, WireError, declared_size, float_metrics, parse_header

DISK_RESERVE = 256 << 20  # disk a spill always leaves free
SLOWEST_LINK = 8 << 20  # bytes per second a transfer is allowed to be as slow as (64 Mbit/s)
DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


BROKEN = "the stream broke"  # how a BrokenStream's reason starts (a reply a sender retries on)


class BrokenStream(WireError):
    """The stream ended, or failed, before the bytes its header declared arrived: send it again."""


def transfer_s(nbytes: int) -> float:
    """Seconds a transfer of ``nbytes`` may take at the slowest link fedfm plans for."""
    return nbytes / SLOWEST_LINK


class TensorStream:
    """Named groups of tensors as one safetensors byte stream, made chunk by chunk on demand.

    The bytes are a valid safetensors file (``safetensors.torch.load`` reads them) whose metadata
    keeps the tensors' order, as ``pack_tensors`` does. Streaming the same object to N receivers
    holds the tensors once."""

    def __init__(self, groups: Mapping[str, Params | None]) -> None:
        self.tensors = [
            (f"{prefix}/{name}", t) for prefix, params in groups.items() for name, t in (params or {}).items()
        ]
        entries, offset = {}, 0
        for key, t in self.tensors:
            if t.dtype not in DTYPES:
                raise WireError(f"{key}: dtype {t.dtype} cannot travel")
            size = t.numel() * t.element_size()
            span = [offset, offset + size]
            entries[key] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": span}
            offset += size
        self._digest: str | None = None
        if not self.tensors:
            self.head, self.nbytes = b"", 0
            return
        meta = {"__metadata__": {"order": json.dumps([k for k, _ in self.tensors])}, **entries}
        text = json.dumps(meta, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.head = struct.pack("<Q", len(text)) + text
        self.nbytes = len(self.head) + offset

    def segments(self) -> Iterator[memoryview]:
        """The header, then each tensor's bytes (on the CPU, contiguous: one tensor at a time)."""
        if not self.nbytes:
            return
        yield memoryview(self.head)
        for _, t in self.tensors:
            flat = t.detach().to("cpu").contiguous().reshape(-1)
            if flat.numel():
                yield memoryview(flat.view(torch.uint8).numpy())

    def pieces(self, size: int = CHUNK) -> Iterator[bytes]:
        """The stream in chunks of exactly ``size`` bytes (the last may be shorter)."""
        buf = bytearray()
        for seg in self.segments():
            pos = 0
            while pos < len(seg):
                take = min(size - len(buf), len(seg) - pos)
                buf += seg[pos : pos + take]
                pos += take
                if len(buf) == size:
                    yield bytes(buf)
                    buf.clear()
        if buf:
            yield bytes(buf)

    def digest(self) -> str:
        """SHA-256 of the whole stream (computed once, by a pass over the tensors)."""
        if self._digest is None:
            h = hashlib.sha256()
            for seg in self.segments():
                h.update(seg)
            self._digest = h.hexdigest()
        return self._digest

    def message(self, header: dict, size: int = CHUNK) -> Iterator[tuple[str, bytes]]:
        """(header JSON, data) pairs: the header, with ``nbytes`` and ``sha256``, on the first."""
        text = json.dumps({**header, **self.declared()})
        first = True
        for piece in self.pieces(size):
            yield (text if first else ""), piece
            first = False
        if first:
            yield text, b""

    def declared(self) -> dict:
        """What the message header says of the payload: its size and digest (nothing if empty)."""
        return {"nbytes": self.nbytes, "sha256": self.digest()} if self.nbytes else {}

    def blob(self) -> bytes:
        """The whole stream as one bytes object (small messages and tests only)."""
        return b"".join(self.pieces())


def spool(
    pieces: Iterable[tuple[str, bytes]], folder: Path | str, admit=None, max_bytes: int | None = None
) -> tuple[dict, Path | None]:
    """Read a chunk stream into a spill file in ``folder`` (mode 0600) while hashing it; the
    header and the file (None: no payload).

    ``admit(header)`` runs on the first chunk, before any payload is read: it returns the byte
    limit (or raises ``WireError``); ``max_bytes`` caps it too. The declared size is checked
    against the limit first, every chunk against the declared size, and the digest at the end.
    A stream that ends short, or fails while reading, raises ``BrokenStream``; the file is
    removed whenever the message is refused."""
    header, path, handle, hasher, size, nbytes, sha = None, None, None, hashlib.sha256(), 0, 0, None
    try:
        try:
            for text, data in pieces:
                if header is None:
                    if not text:
                        raise WireError("the first chunk carries no header")
                    header = parse_header(text)
                    limit = admit(header) if admit is not None else None
                    if max_bytes is not None:
                        limit = max_bytes if limit is None else min(limit, max_bytes)
                    nbytes, sha = declared_size(header, limit)
                    if nbytes:
                        room(folder, nbytes)
                        fd, name = tempfile.mkstemp(dir=folder, prefix="spill-", suffix=".safetensors")
                        path, handle = Path(name), os.fdopen(fd, "wb")
                size += len(data)
                if size > nbytes:
                    raise WireError(f"the payload passes the {nbytes} bytes its header declared")
                if data:
                    hasher.update(data)
                    handle.write(data)
        except WireError:
            raise
        except Exception as err:  # the transport failed while reading: the sender may try again
            if header is None:  # before the header (a refused call, an empty stream): as it is
                raise
            raise BrokenStream(f"{BROKEN} after {size} of {nbytes} bytes ({type(err).__name__})") from None
        if header is None:
            raise WireError("empty message: no chunks")
        if size < nbytes:
            raise BrokenStream(f"{BROKEN} off after {size} of {nbytes} bytes; send it again")
        if handle is not None:
            handle.close()
            handle = None
            if hasher.hexdigest() != sha:
                raise WireError("the payload's SHA-256 differs from the one its header declared")
        return header, path
    except BaseException:
        if handle is not None:
            handle.close()
        if path is not None:
            path.unlink(missing_ok=True)
        raise


def room(folder, nbytes: int) -> None:
    """Refuse (``WireError``) a payload the receiver's disk cannot hold with ``DISK_RESERVE`` to spare."""
    free = shutil.disk_usage(folder or tempfile.gettempdir()).free
    if free < nbytes + DISK_RESERVE:
        raise WireError(f"the receiver has {free} bytes of disk free, too few for this {nbytes}-byte payload")


class SpilledParams(Mapping):
    """One group of a spilled payload: tensor name → the tensor, read from the file when asked
    for (nothing stays in memory between reads). The file goes when the last group of it goes."""

    def __init__(self, spill: _Spill, prefix: str, names: list[str]) -> None:
        self.spill, self.prefix, self.names = spill, prefix, names
        self._index = set(names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._index:
            raise KeyError(name)
        from safetensors import safe_open

        with safe_open(self.spill.path, framework="pt") as f:
            return f.get_tensor(f"{self.prefix}/{name}")

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name) -> bool:
        return name in self._index


class _Spill:
    """The spill file of one message; removed when no group reads from it any more."""

    def __init__(self, path: Path) -> None:
        self.path = path
        weakref.finalize(self, _remove, str(path))


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def open_groups(path: Path | None) -> dict[str, SpilledParams]:
    """The groups of a spilled payload as lazy mappings (``WireError`` for a malformed file, which
    is then removed). The tensors keep the sender's order (the metadata's ``order``)."""
    if path is None:
        return {}
    spill = _Spill(Path(path))
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            order = json.loads((f.metadata() or {}).get("order", "[]"))
    except Exception as err:
        _remove(str(path))
        raise WireError(f"payload is not a valid safetensors file ({type(err).__name__}: {err})") from None
    if not isinstance(order, list) or sorted(order) != sorted(keys):
        order = sorted(keys)
    names: dict[str, list[str]] = {}
    for key in order:
        prefix, _, name = key.partition("/")
        if not name:
            raise WireError(f"payload tensor {key!r} has no group prefix")
        names.setdefault(prefix, []).append(name)
    return {p: SpilledParams(spill, p, ns) for p, ns in names.items()}


def load_groups(path: Path | None) -> dict[str, Params]:
    """A spilled payload read into memory in full (a client's task), the file then removed."""
    if path is None:
        return {}
    try:
        return {p: dict(g.items()) for p, g in open_groups(path).items()}
    finally:
        _remove(str(path))


def payload_stream(rnd: int, payload):
    """A client's payload as it travels: the header (round, payload kind, weight, metrics) and its
    tensors as a ``TensorStream``; the server rebuilds it with ``fedfm.types.payload_from_wire``."""
    header = {
        "round": rnd,
        "payload": payload.kind,
        "num_examples": payload.num_examples,
        "metrics": float_metrics(payload.metrics),
    }
    return header, TensorStream({k: v or None for k, v in payload.tensors().items()})


def payload_message(rnd: int, payload) -> tuple[dict, bytes]:
    """``payload_stream`` as a header (with the payload's size and digest) and one blob (tests)."""
    header, stream = payload_stream(rnd, payload)
    return {**header, **stream.declared()}, stream.blob()


__all__ = [
    "SLOWEST_LINK",
    "BrokenStream",
    "SpilledParams",
    "TensorStream",
    "load_groups",
    "payload_message",
    "payload_stream",
    "open_groups",
    "spool",
    "transfer_s",
]
