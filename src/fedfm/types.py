"""The values that flow through a round: parameters, payloads, client results, round context.

Tensors between server and client are ``Params``: named tensors of the trainable parameters
only, keyed as PEFT's ``get_peft_model_state_dict`` keys them. What a client sends is one of a
small family of typed payloads, each with a ``kind`` (its wire name) and ``tensors()`` (what
travels): ``Update`` (the dense delta θ_k − θ), ``Encoded`` (a compressed delta) and ``Masked``
(a secure-aggregation input). ``Summed`` is the server's own: the unmasked sums of a secure
round. New payload kinds (feature mixtures, logits on a transfer set, cut-layer activations,
cluster models) join the family with ``@payload`` (the ``PAYLOADS`` registry); see
docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

Params = dict[str, torch.Tensor]

# Payload keys that are statistics, not weights (BatchNorm's running mean and variance under
# ``model.batch_norm = "aggregated"``): the server averages them and never steps an optimizer on them.
STATISTIC_SUFFIXES = (".running_mean", ".running_var")


def is_statistic(key: str) -> bool:
    return key.endswith(STATISTIC_SUFFIXES)


def _dense_from_wire(cls, groups: Mapping[str, Params], num_examples, metrics):
    """A payload of (tensors, num_examples, metrics, control delta) as the wire carries it."""
    return cls(groups.get("p", {}), num_examples, metrics, groups.get("c") or None)


@dataclass(frozen=True)
class Update:
    """A client's dense update after local training.

    ``delta`` is always ``θ_k − θ`` for every trainable tensor (never an encoded or masked
    payload); ``num_examples`` is the number of local training examples (the FedAvg weight);
    ``control_delta`` is SCAFFOLD's ``c_k⁺ − c_k``.
    """

    delta: Params
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    control_delta: Params | None = None

    kind = "update"
    dense = True  # the whole delta as it is: validation checks it, the aggregation rule reads it

    def tensors(self) -> dict[str, Params]:
        return {"p": self.delta, "c": self.control_delta or {}}

    from_wire = classmethod(_dense_from_wire)


@dataclass(frozen=True)
class Encoded:
    """A compressed update as it travels: the codec's named tensors (``payload``); the server half
    of compression decodes it into an ``Update``."""

    payload: Params
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    control_delta: Params | None = None
    kind = "encoded"
    dense = False

    def tensors(self) -> dict[str, Params]:
        return {"p": self.payload, "c": self.control_delta or {}}

    from_wire = classmethod(_dense_from_wire)


@dataclass(frozen=True)
class Masked:
    """A secure-aggregation input: the masked field vector (``vector["masked"]``) is all a client
    sends, besides what it states in the clear (``metrics``: DP-SGD's settings). No weight: the
    example count travels inside the masked vector."""

    vector: Params
    metrics: Mapping[str, float] = field(default_factory=dict)
    kind = "masked"
    dense = False
    num_examples = None

    def tensors(self) -> dict[str, Params]:
        return {"p": self.vector}

    @classmethod
    def from_wire(cls, groups: Mapping[str, Params], num_examples, metrics):
        return cls(groups.get("p", {}), metrics)


@dataclass(frozen=True)
class Summed:
    """Server side only: the unmasked sums of a secure round (``fedfm.privacy.packing.Sums``) and
    how many clients the server saw contribute to them."""

    sums: Any
    contributors: int


@dataclass(frozen=True)
class Aggregate:
    """What the reduce gives the round: the aggregate delta, and the new privacy state when a DP
    mechanism formed it (None: unchanged)."""

    delta: Params
    privacy: dict | None = None


@dataclass(frozen=True)
class SplitUpdate:
    """Split fine-tuning's round result (``fedfm.sharing.split``): the client's bottom part's delta
    travels; the top part's delta, which the server trained on this client's activations, stays
    with the server (over gRPC it arrives empty and the server's session fills it in)."""

    client_delta: Params
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    server_delta: Params = field(default_factory=dict)
    control_delta: Params | None = None
    kind = "split"
    dense = False  # the client's part only

    def tensors(self) -> dict[str, Params]:
        return {"p": self.client_delta, "c": self.control_delta or {}}

    @classmethod
    def from_wire(cls, groups: Mapping[str, Params], num_examples, metrics):
        """The server adds its own part (``fedfm.sharing.split.server``)."""
        return cls(groups.get("p", {}), num_examples, metrics, {}, groups.get("c") or None)

    def merged(self) -> Update:
        delta = {**self.client_delta, **self.server_delta}
        return Update(delta, self.num_examples, self.metrics, self.control_delta)


@dataclass(frozen=True)
class Logits:
    """Knowledge transfer's payload (``fedfm.protocols.transfer``): a client's logits on the transfer set,
    one row per transfer text, and its example count (the ensemble's weight). In-process only."""

    values: torch.Tensor
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    kind = "logits"
    dense = False

    def tensors(self) -> dict[str, Params]:
        return {"p": {"logits": self.values}}


PAYLOADS: dict[str, type] = {}  # wire name → payload type (``payload`` adds one); types import nothing


def payload(cls: type) -> type:
    """Register a payload type under its ``kind`` (its wire name). It needs ``tensors()`` (what
    travels, as named groups of tensors), a classmethod ``from_wire(groups, num_examples,
    metrics)`` that rebuilds it on the receiving side, and ``dense``: whether it is the whole
    delta as it is, with ``delta`` and ``num_examples`` as an ``Update`` has them (validation
    checks dense payloads and rejects the others, which their own transforms turn dense)."""
    for need in ("kind", "tensors", "from_wire", "dense"):
        if not hasattr(cls, need):
            raise TypeError(f"payload type {cls.__name__} has no {need!r}")
    if cls.kind in PAYLOADS:
        raise ValueError(f"payload kind {cls.kind!r} is already registered")
    PAYLOADS[cls.kind] = cls
    return cls


for _kind in (Update, Encoded, Masked, SplitUpdate):
    payload(_kind)


def payload_from_wire(kind: str, groups: Mapping[str, Params], num_examples, metrics) -> Any:
    """A received payload rebuilt by its wire name (``ValueError`` for an unknown one)."""
    if not isinstance(kind, str) or kind not in PAYLOADS:
        known = ", ".join(sorted(PAYLOADS))
        raise ValueError(f"unknown payload kind {str(kind)[:40]!r}; known: {known}")
    return PAYLOADS[kind].from_wire(groups, num_examples, metrics)


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
    update: Any = None  # one payload of the family (Update, Encoded, Masked)
    failure: ClientFailure | None = None

    def __post_init__(self) -> None:
        if (self.update is None) == (self.failure is None):
            raise ValueError("ClientResult needs exactly one of update or failure")

    @classmethod
    def failed(cls, client_id: int, stage: str, reason: str) -> ClientResult:
        return cls(client_id, failure=ClientFailure(client_id, stage, reason))


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


@dataclass(frozen=True)
class EngineTraits:
    """What the rest of fedfm asks of an engine, read from class attributes of its registered
    factory (``fedfm.engines.base`` explains each)."""

    remote: bool
    in_process: bool
    shared_base: bool
    grouped: str | None  # the setting that makes it train clients in groups
    section: str | None  # its own config section

    @classmethod
    def of(cls, factory, cfg) -> EngineTraits:
        grouped = getattr(factory, "trains_in_groups", None)
        return cls(
            remote=bool(getattr(factory, "remote", False)),
            in_process=bool(getattr(factory, "in_process", False)),
            shared_base=bool(getattr(factory, "shared_base", True)),
            grouped=grouped(cfg) if grouped is not None else None,
            section=getattr(factory, "section", None),
        )
