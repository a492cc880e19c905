"""The values that flow through a round: parameters, updates, client results, round context.

The payload between server and client is ``Params``: named tensors of the trainable parameters
only, keyed as PEFT's ``get_peft_model_state_dict`` keys them. Clients send deltas
(``θ_k − θ``), never absolute weights, plus a typed weight and metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Update:
    """What one client sends back after local training.

    ``delta`` is ``θ_k − θ`` for every trainable tensor; ``num_examples`` is the number of local
    training examples (the FedAvg weight); ``control_delta`` is SCAFFOLD's ``c_k⁺ − c_k``.
    """

    delta: Params
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    control_delta: Params | None = None


@dataclass(frozen=True)
class ClientFailure:
    """A client that could not deliver an update: which client, at which stage, and why."""

    client_id: int
    stage: str
    reason: str

    def as_dict(self) -> dict:
        return {"client": self.client_id, "stage": self.stage, "reason": self.reason}


@dataclass(frozen=True)
class ClientResult:
    """One client's outcome in a round: an update or a failure, never both."""

    client_id: int
    update: Update | None = None
    failure: ClientFailure | None = None

    def __post_init__(self) -> None:
        if (self.update is None) == (self.failure is None):
            raise ValueError("ClientResult needs exactly one of update or failure")


@dataclass(frozen=True)
class RoundContext:
    """What every client of a round is told besides the global parameters.

    ``server_control`` is SCAFFOLD's global control variate ``c`` (``None`` for other objectives).
    """

    round: int
    seed: int
    server_control: Params | None = None
    attack: Any = None  # fedfm.attacks.AttackPlan in simulated attacks; None otherwise
    dp: Any = None  # DpRound (clients clip: client-level DP under secagg) or ExampleDp (DP-SGD)
    secure: Any = None  # fedfm.privacy.secure_round.SecureRound under secure aggregation
    noise: Any = None  # fedfm.seeding.NoiseSource: where privacy randomness comes from
