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
from fedfm.types import ClientFailure, ClientResult, Params, RoundContext


@engine("inprocess")
class InProcessEngine:
    """Runs clients one after another in this process on one shared model."""

    remote = False

    def __init__(self, setup: EngineSetup) -> None:
        self.bundle = setup.bundle
        self.task = setup.task
        self.clients = list(setup.jobs)
        self.program = setup.program
        self.states = ClientStates()

    def run_cohort(
        self, global_params: Params, cohort: Sequence[int], ctx: RoundContext
    ) -> Iterator[ClientResult]:
        for client_id in cohort:
            job = self.clients[client_id]
            try:
                update, state = self.program(
                    self.bundle, self.task, job, global_params, ctx, self.states.get(client_id)
                )
            except Exception as err:  # one broken client must not stop the round
                reason = f"{type(err).__name__}: {err}"
                yield ClientResult(client_id, failure=ClientFailure(client_id, "train", reason))
                continue
            self.states.keep(client_id, state)
            yield ClientResult(client_id, update=update)

    def state_dict(self) -> dict:
        return self.states.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.states.load_state_dict(state)

    def close(self) -> None:
        pass
