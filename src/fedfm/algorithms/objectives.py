"""Client objectives: what a client minimises locally, and the server half that goes with it.

- ``plain``: the task loss (FedAvg / FedOpt).
- ``fedprox``: task loss + μ/2·‖w − w_global‖² over the trainable parameters
  (Li et al., 2020, "Federated Optimization in Heterogeneous Networks"). The proximal term is
  added inside fedfm's client loop; users only set ``strategy.mu``.
- ``scaffold``: each gradient is corrected by (c − c_k), with c the server and c_k the client
  control variate; after K local steps with learning rate η the client sets
  c_k⁺ = c_k − c + (w_global − w_k)/(K·η) ("option II") and sends Δc_k = c_k⁺ − c_k; the server sets
  c ← c + (|S|/N)·mean_S(Δc_k) (Karimireddy et al., 2020, "SCAFFOLD", Algorithm 1). c_k is
  per-client state kept by the engine and checkpointed. Option II assumes plain SGD steps; with
  AdamW it is a heuristic, so use ``training.optimizer = "sgd"`` with SCAFFOLD.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from fedfm.registry import Registry
from fedfm.types import Params, RoundContext


@dataclass
class LocalHook:
    """Per-client, per-round hooks into the local training loop (all optional)."""

    penalty: Callable[[Mapping[str, torch.Tensor]], torch.Tensor] | None = None
    adjust_gradients: Callable[[Mapping[str, torch.nn.Parameter]], None] | None = None
    # (final params, steps, lr) -> (control delta to upload, new client state)
    finish: Callable[[Params, int, float], tuple[Params | None, Params | None]] | None = None


@dataclass(frozen=True)
class Objective:
    name: str
    mu: float = 0.0

    @property
    def uses_control_variates(self) -> bool:
        return self.name == "scaffold"

    def client_hook(
        self,
        global_params: Params,
        ctx: RoundContext,
        client_state: Params | None,
        device: torch.device | str = "cpu",
    ) -> LocalHook:
        """Hooks for one client's local training; ``global_params`` are the CPU payload."""
        if self.name == "fedprox" and self.mu > 0:
            anchor = {k: v.to(device) for k, v in global_params.items()}
            return LocalHook(penalty=lambda trainable: proximal_term(trainable, anchor, self.mu))
        if self.name == "scaffold":
            return _scaffold_hook(global_params, ctx, client_state)
        return LocalHook()

    def server_init(self, params: Params) -> Params | None:
        if self.uses_control_variates:
            return {k: torch.zeros_like(v) for k, v in params.items()}
        return None

    def server_update(
        self,
        control: Params | None,
        mean_control_delta: Params | None,
        cohort: int,
        num_clients: int,
    ) -> Params | None:
        if control is None or mean_control_delta is None:
            return control
        return scaffold_server_control(control, mean_control_delta, cohort, num_clients)


def proximal_term(
    trainable: Mapping[str, torch.Tensor], global_params: Mapping[str, torch.Tensor], mu: float
) -> torch.Tensor:
    """μ/2 · Σ_k ‖w_k − w_global,k‖²."""
    total = sum(((w - global_params[k]) ** 2).sum() for k, w in trainable.items())
    return 0.5 * mu * total


def scaffold_client_control(
    client_control: Params,
    server_control: Params,
    global_params: Params,
    final: Params,
    steps: int,
    lr: float,
) -> Params:
    """SCAFFOLD option II: c_k⁺ = c_k − c + (w_global − w_k) / (K·η)."""
    scale = 1.0 / (steps * lr)
    return {
        k: client_control[k] - server_control[k] + (global_params[k] - final[k]) * scale
        for k in global_params
    }


def scaffold_server_control(control: Params, mean_delta: Params, cohort: int, num_clients: int) -> Params:
    """c ← c + (|S| / N) · mean_S(Δc_k)."""
    return {k: control[k] + (cohort / num_clients) * mean_delta[k] for k in control}


def _scaffold_hook(global_params: Params, ctx: RoundContext, client_state: Params | None) -> LocalHook:
    if ctx.server_control is None:
        raise ValueError("SCAFFOLD needs the server control variate in the round context")
    c = ctx.server_control
    c_k = client_state if client_state is not None else {k: torch.zeros_like(v) for k, v in c.items()}
    correction = {k: c[k] - c_k[k] for k in c}

    def adjust(trainable: Mapping[str, torch.nn.Parameter]) -> None:
        for k, p in trainable.items():
            if p.grad is not None:
                p.grad.add_(correction[k].to(p.grad.device, p.grad.dtype))

    def finish(final: Params, steps: int, lr: float) -> tuple[Params, Params]:
        new_c_k = scaffold_client_control(c_k, c, global_params, final, max(steps, 1), lr)
        return {k: new_c_k[k] - c_k[k] for k in new_c_k}, new_c_k

    return LocalHook(adjust_gradients=adjust, finish=finish)


Factory = Callable[..., Objective]
OBJECTIVES: Registry[Factory] = Registry("objective")
OBJECTIVES.register("plain")(lambda **_: Objective("plain"))
OBJECTIVES.register("fedprox")(lambda *, mu=0.01, **_: Objective("fedprox", mu=mu))
OBJECTIVES.register("scaffold")(lambda **_: Objective("scaffold"))


def make_objective(strategy) -> Objective:
    return OBJECTIVES.get(strategy.objective)(mu=strategy.mu)
