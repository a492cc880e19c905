"""The in-process engine: one frozen base model; each client's small state swapped in and out.

Memory does not grow with the number of clients: clients share the model, and results are
yielded one at a time for the server to fold into a running aggregate. Per-client state
(SCAFFOLD's control variates, top-k residuals) is held here and checkpointed through
``states`` (only what changed, row by row).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from fedfm.engines.base import EngineSetup, engine
from fedfm.engines.state import ClientStates
from fedfm.types import ClientResult, Params, RoundContext


@engine("inprocess")
class InProcessEngine:
    """Runs clients one after another in this process on one shared model."""

    remote = False
    in_process = True

    def __init__(self, setup: EngineSetup) -> None:
        self.bundle = setup.bundle
        self.task = setup.task
        self.clients = list(setup.jobs)
        self.program = setup.program
        self.states = ClientStates()

    def run_cohort(
        self, global_params: Params, cohort: Sequence[int], ctx: RoundContext
    ) -> Iterator[ClientResult]:
        one = self.program.one
        yield from self.states.delivered(
            one(self.bundle, self.task, self.clients[c], global_params, ctx, self.states.get(c))
            for c in cohort
        )

    def state_dict(self) -> dict:
        return self.states.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.states.load_state_dict(state)

    def close(self) -> None:
        pass
