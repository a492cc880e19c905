"""Local optimizers for k clients at once: one ``[k, *shape]`` tensor per parameter, client j in
slice j, each client with its own optimizer state and step count.

The updates are torch's own (``torch.optim.AdamW`` and ``torch.optim.SGD``, single-tensor path,
the formulas in their documentation) with every per-client quantity a length-k vector, so a
client's slice moves exactly as its own torch optimizer would move it. ``step(active)`` moves only
the clients marked active: an inactive client (it has finished its local steps, or failed) keeps
its parameters, moments, momentum buffer and step count untouched — no weight decay, no momentum.
``clip_grad_norm`` is ``torch.nn.utils.clip_grad_norm_`` per client.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def _per_client(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A length-k vector shaped to broadcast over ``[k, *shape]``."""
    return v.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))


class StackedAdamW:
    """AdamW (decoupled weight decay) per client slice."""

    def __init__(self, stacks: Mapping[str, torch.Tensor], lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:  # fmt: skip
        self.stacks, self.lr, self.weight_decay, self.betas, self.eps = stacks, lr, weight_decay, betas, eps
        k = len(next(iter(stacks.values())))
        self.steps = torch.zeros(k, dtype=torch.float64)
        self.exp_avg = {
            key: torch.zeros_like(p, memory_format=torch.preserve_format) for key, p in stacks.items()
        }
        self.exp_avg_sq = {key: torch.zeros_like(p) for key, p in stacks.items()}

    @torch.no_grad()
    def step(self, active: torch.Tensor) -> None:
        beta1, beta2 = self.betas
        self.steps += active.to(torch.float64)
        steps = self.steps.clamp(min=1)  # inactive clients that never stepped: no division by zero
        step_size = self.lr / (1 - beta1**steps)
        bc2_sqrt = (1 - beta2**steps).sqrt()
        for key, p in self.stacks.items():
            g = p.grad
            if g is None:
                continue
            on = _per_client(active, p).bool()
            moved = p * (1 - self.lr * self.weight_decay)
            m = self.exp_avg[key].lerp(g, 1 - beta1)
            v = self.exp_avg_sq[key].mul(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / _per_client(bc2_sqrt, p)).add_(self.eps)
            moved = moved + (m / denom) * -_per_client(step_size, p)
            p.copy_(torch.where(on, moved, p))
            self.exp_avg[key] = torch.where(on, m, self.exp_avg[key])
            self.exp_avg_sq[key] = torch.where(on, v, self.exp_avg_sq[key])


class StackedSGD:
    """SGD with optional momentum (no dampening, no Nesterov) and L2 weight decay per client slice."""

    def __init__(self, stacks: Mapping[str, torch.Tensor], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:  # fmt: skip
        self.stacks, self.lr, self.momentum, self.weight_decay = stacks, lr, momentum, weight_decay
        k = len(next(iter(stacks.values())))
        self.steps = torch.zeros(k, dtype=torch.float64)
        self.buffers: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, active: torch.Tensor) -> None:
        self.steps += active.to(torch.float64)
        first = _per_client(self.steps == 1, next(iter(self.stacks.values()))).bool()
        for key, p in self.stacks.items():
            g = p.grad
            if g is None:
                continue
            on = _per_client(active, p).bool()
            if self.weight_decay:
                g = g.add(p, alpha=self.weight_decay)
            if self.momentum:
                buf = self.buffers.get(key)
                later = g if buf is None else buf.mul(self.momentum).add_(g)
                buf = torch.where(first.view(-1, *([1] * (p.dim() - 1))), g, later)
                self.buffers[key] = torch.where(on, buf, self.buffers.get(key, torch.zeros_like(p)))
                g = buf
            p.copy_(torch.where(on, p.add(g, alpha=-self.lr), p))


def stacked_optimizer(stacks: Mapping[str, torch.Tensor], cfg):
    """The stacked counterpart of ``fedfm.client.program.make_optimizer`` for ``training`` settings."""
    if cfg.optimizer == "sgd":
        return StackedSGD(stacks, cfg.lr, cfg.momentum, cfg.weight_decay)
    return StackedAdamW(stacks, cfg.lr, cfg.weight_decay)


@torch.no_grad()
def clip_grad_norm(stacks: Mapping[str, torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale each client's gradients (all its tensors together) to L2 norm at most ``max_norm``,
    as ``clip_grad_norm_`` does for one client; returns the per-client norms before clipping."""
    grads = [p.grad for p in stacks.values() if p.grad is not None]
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads], dim=1).norm(dim=1)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(_per_client(coef, g))
    return norms
