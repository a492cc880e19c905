"""What consuming one round's client results leaves behind, besides the aggregate.

The server halves of the transforms run here as generators over the engine's results: count
bytes and decode, then validate; each step records who was accepted, failed or rejected (and
why), and sums what the round record reports (training loss, SCAFFOLD control deltas).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

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
        """Results that carry an update; failures are recorded with their client, stage and reason."""
        for result in results:
            on_client()
            if result.failure is not None:
                self.failed.append(result.failure.as_dict())
                continue
            yield result

    def decoded(
        self,
        results: Iterable[ClientResult],
        decode_delta: Callable[[int, Params], Params],
        on_client: Callable,
    ) -> Iterator[ClientResult]:
        """Server halves of the transforms: count the bytes received, decode; undecodable → rejected."""
        for result in self.delivered(results, on_client):
            self.bytes_up += upload_nbytes(result.update)
            try:
                delta = decode_delta(result.client_id, result.update.delta)
            except Exception as err:  # a malformed payload is rejected, never raised
                reason = f"undecodable payload ({type(err).__name__}: {err})"
                self.rejected.append({"client": result.client_id, "reason": reason})
                continue
            yield replace(result, update=replace(result.update, delta=delta))

    def valid_updates(
        self, results: Iterable[ClientResult], check: Callable[[int, Update], str | None], uniform: bool
    ) -> Iterator[tuple[Params, float]]:
        for result in results:
            update = result.update
            problem = check(result.client_id, update)
            if problem is not None:
                self.rejected.append({"client": result.client_id, "reason": problem})
                continue
            self.accepted.append(result.client_id)
            loss = float(update.metrics.get("train_loss", float("nan")))
            self.loss_sum += loss * update.num_examples
            self.examples += update.num_examples
            self.client_records.append(  # the server's fields last: a metric cannot overwrite them
                {**update.metrics, "client": result.client_id, "num_examples": update.num_examples}
            )
            if update.control_delta is not None:
                if self.control_sum is None:
                    self.control_sum = {k: torch.zeros_like(v) for k, v in update.control_delta.items()}
                for k, v in update.control_delta.items():
                    self.control_sum[k] += v
            yield update.delta, 1.0 if uniform else float(update.num_examples)


def upload_nbytes(update: Update) -> int:
    return serialized_nbytes(update.delta) + serialized_nbytes(update.control_delta or {})
