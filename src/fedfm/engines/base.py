"""The engine seam: what every engine is, and the registry each engine module registers itself in.

An engine executes a cohort: it receives the global trainable state, the cohort and the round
context, and yields one ``ClientResult`` per client (a payload, or a failure naming the client and
the stage). It knows nothing of strategies, privacy or aggregation: what a client runs arrives as
the picklable ``ClientProgram`` in its ``EngineSetup``.

Engines are built by their registered factory from an ``EngineSetup``. Optional parts of the
protocol: ``start_secure(cohort, layout, secagg_cfg, graph_seed, round)`` when the engine's clients
run secure aggregation elsewhere (remote clients), ``states`` (a ``ClientStates``) when the
engine keeps per-client state for the checkpoint.

What the rest of fedfm asks of an engine it asks of its capabilities (``EngineTraits``, read from
class attributes of the registered factory before the engine is built), never of its name:
``remote`` (the clients hold their own data: a deployment), ``in_process`` (clients train one at
a time in this process, on this process's model: what split learning, FedPFT, offsite
distillation and transfer need), ``shared_base`` (one base model a round may move),
``trains_in_groups(cfg)`` (the setting that makes it train clients in groups, or None) and
``section`` (the name of its own config section, or None). A subclass inherits them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from fedfm.registry import Registry
from fedfm.types import ClientResult, EngineTraits, Params, RoundContext


@runtime_checkable
class Engine(Protocol):
    remote: bool

    def run_cohort(
        self, global_params: Params, cohort: Sequence[int], ctx: RoundContext
    ) -> Iterator[ClientResult]:
        """One ClientResult per cohort member, in any order, as they finish."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class EngineSetup:
    """What an engine is built from: this process's model bundle and task, every client's job,
    the client program, a picklable way to build the bundle again (a worker process builds its
    own), the engine's own config section (``ray`` for the Ray engine; otherwise ``[run]``, where
    the options of an engine registered with ``options=`` join), and the ``batched`` section for
    engines that train clients in groups."""

    bundle: Any
    task: Any
    jobs: Sequence
    program: Any
    build_bundle: Callable[[], Any]
    options: Any = None
    group: Any = None


ENGINES: Registry[Callable[[EngineSetup], Engine]] = Registry("engine")


def engine_traits(cfg) -> EngineTraits:
    """The configured engine's capabilities (``run.engine``)."""
    return EngineTraits.of(ENGINES.get(cfg.run.engine), cfg)


def engine(name: str, options: Any = None, section: str | None = None):
    """Register an engine factory (a class or function taking an ``EngineSetup``) as ``name``;
    ``options``: a model of its own settings, which join ``[run]``, or form ``[section]`` (then
    the factory's ``section`` attribute names it, and ``setup.options`` is that section)."""
    return ENGINES.register(name, options=options, section=section)
