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

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from pydantic import BaseModel, Field

from fedfm.registry import Registry, bind_options
from fedfm.types import Params, RoundContext


@dataclass
class LocalHook:
    """Per-client, per-round hooks into the local training loop (all optional)."""

    penalty: Callable[[Mapping[str, torch.Tensor]], torch.Tensor] | None = None
    adjust_gradients: Callable[[Mapping[str, torch.nn.Parameter]], None] | None = None
    # (final params, steps, lr) -> (control delta to upload, new client state)
    finish: Callable[[Params, int, float], tuple[Params | None, Params | None]] | None = None


def plain_hook(global_params: Params, ctx: RoundContext, client_state, device) -> LocalHook:
    """The task loss alone."""
    return LocalHook()


def fedprox_hook(mu: float, global_params: Params, ctx: RoundContext, client_state, device) -> LocalHook:
    """The task loss plus μ/2·‖w − w_global‖²."""
    if mu <= 0:
        return LocalHook()
    anchor = {k: v.to(device) for k, v in global_params.items()}
    return LocalHook(penalty=lambda trainable: proximal_term(trainable, anchor, mu))


HookFactory = Callable[[Params, RoundContext, "Params | None", "torch.device | str"], LocalHook]
ControlUpdate = Callable[[Params, Params, int, int], Params]


class ServerPart(Protocol):
    """An objective's server half: state the server keeps (checkpointed, never sent) and a
    correction of each round's aggregate delta before the server optimizer steps with it
    (FedDyn's h, ``docs/extending.md``)."""

    def init(self, params: Params) -> Params: ...

    def correct(
        self, delta: Params, state: Params, cohort: int, num_clients: int
    ) -> tuple[Params, Params]: ...


@dataclass(frozen=True)
class Objective:
    """A client objective: the hooks of its local training and, for objectives with control
    variates, the server's control update; ``server_part`` (a ``ServerPart``): state the server
    keeps and a correction of the aggregate. The registered entry carries the behaviour
    (picklable module functions, so engines in other processes get the same objective); a client's
    own state is kept under ``state_key``."""

    name: str
    hook: HookFactory = plain_hook
    control_update: ControlUpdate | None = None  # set: the objective keeps control variates
    server_part: ServerPart | None = None

    @property
    def uses_control_variates(self) -> bool:
        return self.control_update is not None

    @property
    def plain(self) -> bool:
        """Local training is plain loss minimisation: no hook, no control variates, no server part."""
        return self.hook is plain_hook and self.control_update is None and self.server_part is None

    @property
    def state_key(self) -> str:
        """The key of the state it keeps per client (its name: ``"scaffold"`` holds c_k)."""
        return self.name

    @property
    def per_example(self) -> bool:
        """Whether its local loss is a plain per-example loss (what DP-SGD needs): no proximal
        term, no control variates, no server half."""
        return self.hook is plain_hook and not self.uses_control_variates and self.server_part is None

    def client_hook(
        self,
        global_params: Params,
        ctx: RoundContext,
        client_state: Params | None,
        device: torch.device | str = "cpu",
    ) -> LocalHook:
        """Hooks for one client's local training; ``global_params`` are the CPU payload."""
        return self.hook(global_params, ctx, client_state, device)

    def server_init(self, params: Params) -> Params | None:
        if self.uses_control_variates:
            return {k: torch.zeros_like(v) for k, v in params.items()}
        return None

    def server_part_init(self, params: Params) -> Params | None:
        return self.server_part.init(params) if self.server_part is not None else None

    def correct(
        self, delta: Params, state: Params | None, cohort: int, num_clients: int
    ) -> tuple[Params, Params | None]:
        """The aggregate delta after the server half's correction, and its new state."""
        if self.server_part is None:
            return delta, state
        return self.server_part.correct(delta, state, cohort, num_clients)

    def server_update(
        self,
        control: Params | None,
        mean_control_delta: Params | None,
        cohort: int,
        num_clients: int,
    ) -> Params | None:
        if control is None or mean_control_delta is None or self.control_update is None:
            return control
        return self.control_update(control, mean_control_delta, cohort, num_clients)


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


def scaffold_hook(
    global_params: Params, ctx: RoundContext, client_state: Params | None, device=None
) -> LocalHook:
    """Gradients corrected by (c − c_k); at the end, the control delta and the new c_k."""
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


@OBJECTIVES.register("plain")
def plain(**_) -> Objective:
    return Objective("plain")


class FedProxOptions(BaseModel):
    mu: float = Field(0.01, ge=0, description="The proximal weight μ of μ/2·‖w − w_global‖².")


@OBJECTIVES.register("fedprox", options=FedProxOptions)
def fedprox(*, mu: float = 0.01, **_) -> Objective:
    return Objective("fedprox", functools.partial(fedprox_hook, mu))


@OBJECTIVES.register("scaffold")
def scaffold(**_) -> Objective:
    return Objective("scaffold", scaffold_hook, scaffold_server_control)


def make_objective(strategy) -> Objective:
    """The configured objective, its keyword-only options bound from ``[strategy]`` by name."""
    factory = OBJECTIVES.get(strategy.objective)
    return factory(**bind_options(factory, strategy))
