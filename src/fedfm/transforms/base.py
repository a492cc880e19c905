"""The update-transform seam: one interface with a client half and a server half.

A transform is registered with a *position*; ``Pipeline.build`` takes every registered transform
that the config activates and orders them by position. Client halves run in that order on what
local training produced; server halves run in reverse on what arrived:

    client:  validation(0) → rank(10) → dp(20) → attack(30) → compression(40) → secure(50)
    server:  secure → compression → attack → dp → rank → validation → reduce

A client half maps one payload to the next (``Update`` → ``Update`` for a rank cut or a clip,
``Update`` → ``Encoded`` for compression, ``Update`` → ``Masked`` for secure aggregation). A
server half maps the stream of arriving results to a new stream (decode, unmask, replace,
filter) and may replace the *reduce*, the function that turns the final stream into the
aggregate: central DP replaces the aggregator with its noised fixed-denominator mean. Every half
is a pure function of its inputs and the round it is handed; what a half records (who was
rejected, and why) goes into the round's tally, never into the run.

A transform's compatibility rules (``check``) live with it, and run when the pipeline is built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedfm.registry import Registry

Stream = Iterator[Any]  # ClientResult items, or one Summed after unmasking
Reduce = Callable[[Stream], Any]  # the final stream → Aggregate


class Transform(Protocol):
    """One update transform. ``prepare`` adds round-context fields before the cohort runs."""

    name: str

    def prepare(self, rnd) -> dict:  # RoundContext fields this transform sets (dp, secure, attack)
        ...

    def client(self, payload, step: ClientStep):  # one client's payload → the next payload
        ...

    def server(self, stream: Stream, rnd, reduce: Reduce) -> tuple[Stream, Reduce]: ...


@dataclass
class ClientStep:
    """What a client half sees besides the payload: the job, the round context, the client's own
    state (kept by the engine) and notes the halves leave for later halves (the clipped bit)."""

    job: Any
    ctx: Any
    state: dict
    notes: dict = field(default_factory=dict)


class Passthrough:
    """Default halves: a transform implements only the ones it needs."""

    name = "passthrough"

    def prepare(self, rnd) -> dict:
        return {}

    def client(self, payload, step: ClientStep):
        return payload

    def server(self, stream: Stream, rnd, reduce: Reduce) -> tuple[Stream, Reduce]:
        return stream, reduce


@dataclass(frozen=True)
class TransformEntry:
    """A registered transform: where it sits in the order and how the config builds it (or None:
    not active). ``check(cfg)`` raises ``ValueError`` naming the field when the config combines it
    with something it cannot work with."""

    position: float
    build: Callable[[Any], Any]
    check: Callable[[Any], None] | None = None
    named: bool = False  # active only when the run names it in ``pipeline.extra`` (plug-ins)


TRANSFORMS: Registry[TransformEntry] = Registry("transform")


def transform(
    name: str,
    position: float,
    check: Callable[[Any], None] | None = None,
    named: bool = False,
    options: Any = None,
):
    """Register ``build(cfg) -> Transform | None`` as the transform ``name`` at ``position``.

    ``build`` decides from the config whether the transform is active (None: not this run). With
    ``named`` (a plug-in with no config section of its own) it is built only when the run names
    it in ``pipeline.extra``. ``options``: a model of its own settings, which join ``[pipeline]``
    (``cfg.pipeline.<field>`` in ``build``)."""

    def decorator(build):
        TRANSFORMS.register(name, options=options)(TransformEntry(position, build, check, named))
        return build

    return decorator


def check_transforms(cfg) -> None:
    """Every registered transform's compatibility rules (config validation calls this)."""
    for name in cfg.pipeline.extra:
        if not TRANSFORMS.get(name).named:
            raise ValueError(
                f"pipeline.extra names {name!r}, a transform switched on by its own config section, "
                "not by name"
            )
    for name in TRANSFORMS.names():
        entry = TRANSFORMS.get(name)
        if entry.check is not None:
            entry.check(cfg)


@dataclass(frozen=True)
class Pipeline:
    """The active transforms in their declared order; picklable, so it travels with the client
    program to whichever process trains a client."""

    transforms: tuple = ()

    @classmethod
    def build(cls, cfg) -> Pipeline:
        entries = sorted((TRANSFORMS.get(n).position, n) for n in TRANSFORMS.names())
        wanted = [n for _, n in entries if not TRANSFORMS.get(n).named or n in cfg.pipeline.extra]
        built = (TRANSFORMS.get(n).build(cfg) for n in wanted)
        return cls(tuple(t for t in built if t is not None))

    def names(self) -> list[str]:
        return [t.name for t in self.transforms]

    def prepare(self, rnd) -> dict:
        fields: dict = {}
        for t in self.transforms:
            fields.update(t.prepare(rnd))
        return fields

    def client(self, payload, step: ClientStep):
        for t in self.transforms:
            payload = t.client(payload, step)
        return payload

    def server(self, stream: Iterable, rnd, reduce: Reduce) -> tuple[Stream, Reduce]:
        stream = iter(stream)
        for t in reversed(self.transforms):
            stream, reduce = t.server(stream, rnd, reduce)
        return stream, reduce
