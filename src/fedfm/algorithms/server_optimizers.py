"""Server optimizers: turn the aggregate delta into the next global state (FedOpt).

Reddi et al., 2021, "Adaptive Federated Optimization". The aggregate delta Δ = mean(θ_k − θ)
is treated as a negative pseudo-gradient:

- ``sgd``:     m ← β·m + Δ;  θ ← θ + η·m   (β = 0, η = 1 is FedAvg; β > 0 is FedAvgM)
- ``adam``:    m ← β1·m + (1−β1)·Δ;  v ← β2·v + (1−β2)·Δ²;            θ ← θ + η·m / (√v + τ)
- ``yogi``:    m as adam;  v ← v − (1−β2)·Δ²·sign(v − Δ²);             θ ← θ + η·m / (√v + τ)
- ``adagrad``: m as adam;  v ← v + Δ²;                                  θ ← θ + η·m / (√v + τ)

As in the paper there is no bias correction, and v starts at τ² (paper: v₋₁ ≥ τ²).
State is a plain dict of tensors so it checkpoints as a value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import BaseModel, Field

from fedfm.registry import Registry, bind_options
from fedfm.types import Params, is_statistic

ServerState = dict[str, Params]


SecondMoment = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]  # (v, Δ², β2) → v'


@dataclass(frozen=True)
class ServerOptimizer:
    """``init(θ) -> state`` and ``step(θ, Δ, state) -> (θ', state')``, both pure.

    The registered entry decides the behaviour: ``second_moment`` None is SGD with momentum
    (FedAvg, FedAvgM); a function is an adaptive FedOpt rule with that second-moment update.
    """

    name: str
    lr: float
    beta1: float = 0.0
    beta2: float = 0.0
    tau: float = 1e-3
    second_moment: SecondMoment | None = None

    @property
    def stateful(self) -> bool:
        """Whether it keeps state across rounds (momentum, moments)."""
        return self.beta1 != 0 or self.second_moment is not None

    @property
    def adds_aggregate(self) -> bool:
        """Whether a step is exactly θ + Δ (FedAvg's server step)."""
        return not self.stateful and self.lr == 1

    def init(self, params: Params) -> ServerState:
        state: ServerState = {"m": {k: torch.zeros_like(v) for k, v in params.items()}}
        if self.second_moment is not None:
            state["v"] = {k: torch.full_like(v, self.tau**2) for k, v in params.items()}
        return state

    def step(self, params: Params, delta: Params, state: ServerState) -> tuple[Params, ServerState]:
        new_params: Params = {}
        new_m: Params = {}
        new_v: Params = {}
        for k, p in params.items():
            d = delta[k].to(p.dtype)
            m_prev = state["m"][k]
            if is_statistic(k):  # BatchNorm statistics: the clients' weighted mean, as it is
                new_params[k], new_m[k] = p + d, m_prev
                if self.second_moment is not None:
                    new_v[k] = state["v"][k]
                continue
            if self.second_moment is None:
                m = self.beta1 * m_prev + d
                new_params[k] = p + self.lr * m
            else:
                m = self.beta1 * m_prev + (1 - self.beta1) * d
                v = self.second_moment(state["v"][k], d * d, self.beta2)
                new_v[k] = v
                new_params[k] = p + self.lr * m / (v.sqrt() + self.tau)
            new_m[k] = m
        new_state: ServerState = {"m": new_m}
        if new_v:
            new_state["v"] = new_v
        return new_params, new_state


def adam_moment(v: torch.Tensor, d2: torch.Tensor, beta2: float) -> torch.Tensor:
    return beta2 * v + (1 - beta2) * d2


def yogi_moment(v: torch.Tensor, d2: torch.Tensor, beta2: float) -> torch.Tensor:
    return v - (1 - beta2) * d2 * torch.sign(v - d2)


def adagrad_moment(v: torch.Tensor, d2: torch.Tensor, beta2: float) -> torch.Tensor:
    return v + d2


Factory = Callable[..., ServerOptimizer]
SERVER_OPTIMIZERS: Registry[Factory] = Registry("server optimizer")


class SgdOptions(BaseModel):
    server_lr: float = Field(1.0, gt=0, le=100, description="Server learning rate (1.0 with sgd is FedAvg).")
    server_momentum: float = Field(0.0, ge=0, lt=1, description="Server momentum (FedAvgM).")


class FedOptOptions(BaseModel):
    server_lr: float = Field(1.0, gt=0, le=100, description="Server learning rate (1.0 with sgd is FedAvg).")
    beta1: float = Field(0.9, ge=0, lt=1, description="First-moment decay.")
    beta2: float = Field(0.99, ge=0, lt=1, description="Second-moment decay.")
    tau: float = Field(1e-3, gt=0, description="Adaptivity (epsilon).")


@SERVER_OPTIMIZERS.register("sgd", options=SgdOptions)
def sgd(*, lr: float = 1.0, momentum: float = 0.0, **_: float) -> ServerOptimizer:
    return ServerOptimizer("sgd", lr=lr, beta1=momentum)


def _adaptive(name: str, moment: SecondMoment) -> Factory:
    def factory(*, lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3, **_):
        return ServerOptimizer(name, lr=lr, beta1=beta1, beta2=beta2, tau=tau, second_moment=moment)

    factory.__doc__ = f"FedOpt server optimizer {name!r} (Reddi et al., 2021)."
    return factory


for _name, _moment in (("adam", adam_moment), ("yogi", yogi_moment), ("adagrad", adagrad_moment)):
    SERVER_OPTIMIZERS.register(_name, options=FedOptOptions)(_adaptive(_name, _moment))


def make_server_optimizer(strategy) -> ServerOptimizer:
    """Build the configured server optimizer from a ``StrategySection``."""
    factory = SERVER_OPTIMIZERS.get(strategy.server_optimizer)
    given = {
        "lr": strategy.server_lr,
        "momentum": strategy.server_momentum,
        "beta1": strategy.beta1,
        "beta2": strategy.beta2,
        "tau": strategy.tau,
    }
    return factory(**bind_options(factory, strategy, **given))
