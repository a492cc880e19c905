"""The engine seam: what every engine is, and the registry each engine module registers itself in.

An engine executes a cohort: it receives the global trainable state, the cohort and the round
context, and yields one ``ClientResult`` per client (a payload, or a failure naming the client and
the stage). It knows nothing of strategies, privacy or aggregation: what a client runs arrives as
the picklable ``ClientProgram`` in its ``EngineSetup``.

Engines are built by their registered factory from an ``EngineSetup``. Optional parts of the
protocol: ``start_secure(cohort, layout, secagg_cfg, graph_seed, round)`` when the engine's clients
run secure aggregation elsewhere (remote clients), ``states`` (a ``ClientStates``) when the
engine keeps per-client state for the checkpoint. ``remote`` (a class attribute, readable on the
factory before the engine is built) says the clients hold their own data: a deployment.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from fedfm.registry import Registry
from fedfm.types import ClientResult, Params, RoundContext


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
    own), the engine's own config section (``ray`` for the Ray engine; None if it has none), and
    the ``batched`` section for engines that train clients in groups."""

    bundle: Any
    task: Any
    jobs: Sequence
    program: Any
    build_bundle: Callable[[], Any]
    options: Any = None
    group: Any = None


ENGINES: Registry[Callable[[EngineSetup], Engine]] = Registry("engine")


def engine(name: str):
    """Register an engine factory (a class or function taking an ``EngineSetup``) as ``name``."""
    return ENGINES.register(name)
