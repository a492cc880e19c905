"""What crosses the network, as bytes: JSON headers and tensors in safetensors, in 1 MiB chunks.

``messages``: the message shapes (a task's and an update's headers, the round context, chunks,
small payloads joined in memory); ``stream``: tensors streamed both ways without one object
(``TensorStream``, ``spool`` to a file, lazy reads). Everything is importable from here.
"""

from fedfm.wire.messages import (
    CHUNK,
    MAX_HEADER,
    MAX_METRICS,
    PRIVACY_PURPOSES,
    RESERVED,
    WireError,
    blob_metadata,
    bounded_int,
    chunks,
    context_from,
    context_header,
    declared,
    declared_size,
    float_metrics,
    join,
    pack_tensors,
    parse_header,
    received_metrics,
    unpack_tensors,
)
from fedfm.wire.stream import payload_message, payload_stream

__all__ = [
    "CHUNK",
    "MAX_HEADER",
    "MAX_METRICS",
    "PRIVACY_PURPOSES",
    "RESERVED",
    "WireError",
    "blob_metadata",
    "bounded_int",
    "chunks",
    "context_from",
    "context_header",
    "declared",
    "declared_size",
    "float_metrics",
    "join",
    "pack_tensors",
    "parse_header",
    "payload_message",
    "payload_stream",
    "received_metrics",
    "unpack_tensors",
]
