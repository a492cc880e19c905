"""Per-client state an engine keeps for its clients (SCAFFOLD's control variate, top-k residual).

Memory holds only what changed since the last checkpoint; everything else is read from the
checkpoint's client store on demand, so neither memory nor a round's checkpoint write grows with
the number of clients (``fedfm.server.checkpoint``).
"""

from __future__ import annotations

from fedfm.types import Params


class ClientStates:
    """Client id → that client's named state: changed ones in memory, the rest in the store."""

    def __init__(self, store=None) -> None:
        self.by_client: dict[int, dict[str, Params]] = {}  # changed since the last commit
        self.store = store  # fedfm.server.checkpoint.ClientStore, attached by the round loop

    def attach(self, store) -> None:
        self.store = store

    def get(self, client_id: int) -> dict[str, Params] | None:
        if client_id in self.by_client:
            return self.by_client[client_id]
        return self.store.get(client_id) if self.store is not None else None

    def keep(self, client_id: int, state: dict[str, Params] | None) -> None:
        if state:
            self.by_client[client_id] = state

    def delivered(self, outcomes):
        """Each ``(ClientResult, state)``'s result, keeping the state of the clients that delivered
        (a failed client keeps the state it had)."""
        for result, state in outcomes:
            if result.failure is None:
                self.keep(result.client_id, state)
            yield result

    def take_changed(self) -> dict[int, dict[str, Params]]:
        """The states to commit with this round's checkpoint."""
        return dict(self.by_client)

    def committed(self) -> None:
        """The checkpoint holds them now: memory goes back to empty."""
        if self.store is not None:
            self.by_client = {}

    def state_dict(self) -> dict:
        return {}  # client states are committed row by row with the checkpoint, not inside it

    def load_state_dict(self, state: dict) -> None:
        """A fedfm 0.1 checkpoint kept every client's state inside the server state: take them all
        as changed, so the first commit moves them into the client store."""
        self.by_client.update({int(k): v for k, v in state.get("client_states", {}).items()})
