"""What consuming one round's client results leaves behind, besides the aggregate.

The round's server halves record into it: who delivered (and the bytes they sent), who failed
(stage and reason), who was rejected (and why) and who was accepted; it sums what the round
record reports (training loss and examples, SCAFFOLD control deltas).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from fedfm.transforms.compression import serialized_nbytes
from fedfm.types import ClientResult, Params, Update


@dataclass
class RoundTally:
    """Side results of consuming a cohort: accepted clients, rejections, losses, control deltas."""

    accepted: list[int] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    client_records: list[dict] = field(default_factory=list)
    loss_sum: float = 0.0
    examples: int = 0
    control_sum: Params | None = None
    bytes_up: int = 0
    unmasked: int = 0  # secure rounds: how many clients' inputs were in the recovered sum (0: none)

    def delivered(self, results: Iterable[ClientResult], on_client: Callable) -> Iterator[ClientResult]:
        """Results that carry a payload (its bytes counted); failures are recorded with their
        client, stage and reason."""
        for result in results:
            on_client()
            if result.failure is not None:
                self.failed.append(result.failure.as_dict())
                continue
            self.bytes_up += payload_nbytes(result.update)
            yield result

    def reject(self, client_id: int, reason: str) -> None:
        self.rejected.append({"client": client_id, "reason": reason})

    def accept(self, client_id: int, update: Update) -> None:
        """A dense update passed validation: count it, its loss, weight and control delta."""
        self.accepted.append(client_id)
        loss = float(update.metrics.get("train_loss", float("nan")))
        self.loss_sum += loss * update.num_examples
        self.examples += update.num_examples
        self.client_records.append(  # the server's fields last: a metric cannot overwrite them
            {**update.metrics, "client": client_id, "num_examples": update.num_examples}
        )
        if update.control_delta is not None:
            if self.control_sum is None:
                self.control_sum = {k: torch.zeros_like(v) for k, v in update.control_delta.items()}
            for k, v in update.control_delta.items():
                self.control_sum[k] += v


def payload_nbytes(payload) -> int:
    """Bytes of a payload's tensors as they travel (safetensors blobs)."""
    return sum(serialized_nbytes(group or {}) for group in payload.tensors().values())
