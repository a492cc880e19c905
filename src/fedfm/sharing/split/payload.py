"""Split fine-tuning's payload (``sharing.mode = "split"``): a client's update leaves as a
``SplitUpdate`` whose travelling part is only the client's bottom layers (the server's part was
trained by the server); the server merges the two back into one dense update before validation."""

from __future__ import annotations

import re
from dataclasses import replace

from fedfm.transforms.base import Passthrough, transform
from fedfm.types import SplitUpdate, Update

# where a payload key names a layer of the stack (PEFT's own layer patterns)
LAYER_KEY = re.compile(r"\.(?:layer|layers|h|blocks)\.(\d+)\.")
EMBEDDING_PARTS = ("embeddings", "embed_tokens", "wte", "wpe")


def is_server_key(key: str, cut_layer: int, u_shaped: bool) -> bool:
    """Whether a payload tensor belongs to the server's part: a layer at or above the cut, or
    (unless U-shaped) the head and anything else after the stack. Embeddings are the client's."""
    m = LAYER_KEY.search(key)
    if m is not None:
        return int(m[1]) >= cut_layer
    if any(part in key for part in EMBEDDING_PARTS):
        return False
    return not u_shaped


def client_part(params, cut_layer: int, u_shaped: bool):
    """The tensors a split client holds (and is sent each round)."""
    return {k: v for k, v in params.items() if not is_server_key(k, cut_layer, u_shaped)}


def split_update(update: Update, cut_layer: int, u_shaped: bool) -> SplitUpdate:
    server = {k for k in update.delta if is_server_key(k, cut_layer, u_shaped)}
    return SplitUpdate(
        {k: v for k, v in update.delta.items() if k not in server},
        update.num_examples,
        dict(update.metrics),
        {k: v for k, v in update.delta.items() if k in server},
        update.control_delta,
    )


class SplitParts(Passthrough):
    name = "split"

    def __init__(self, cut_layer: int, u_shaped: bool) -> None:
        self.cut_layer, self.u_shaped = cut_layer, u_shaped

    def client(self, payload, step):
        return split_update(payload, self.cut_layer, self.u_shaped)

    def server(self, stream, rnd, reduce):
        def merged():
            for result in stream:
                if isinstance(result.update, SplitUpdate):
                    result = replace(result, update=result.update.merged())
                yield result

        return merged(), reduce


@transform("split", 60)
def split_parts(cfg) -> SplitParts | None:
    if cfg.sharing.mode != "split":
        return None
    return SplitParts(cfg.split.cut_layer, cfg.split.u_shaped)
