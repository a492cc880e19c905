"""Per-client state an engine keeps for its clients (SCAFFOLD's control variate, top-k residual)."""

from __future__ import annotations

from fedfm.types import Params


class ClientStates:
    """Client id → that client's named state; checkpointed through ``state_dict``."""

    def __init__(self) -> None:
        self.by_client: dict[int, dict[str, Params]] = {}

    def get(self, client_id: int) -> dict[str, Params] | None:
        return self.by_client.get(client_id)

    def keep(self, client_id: int, state: dict[str, Params] | None) -> None:
        if state:
            self.by_client[client_id] = state

    def state_dict(self) -> dict:
        return {"client_states": {str(k): v for k, v in self.by_client.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.by_client = {int(k): v for k, v in state.get("client_states", {}).items()}
