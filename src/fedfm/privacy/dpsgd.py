"""Example-level DP inside each client: DP-SGD (Abadi et al., 2016) through Opacus.

Every local step draws a Poisson batch (each local example with probability q = B / n_k, the
sampling Opacus' accountant assumes), computes per-example gradients of the trainable (LoRA)
parameters with Opacus' ``GradSampleModule``, clips each to ``privacy.clip_norm`` and adds
Gaussian noise of std z·C in Opacus' ``DPOptimizer``. Each client keeps its own Opacus RDP
accountant; its history travels in the client state, so a resumed run reports the same ε.

The guarantee is per client and per example: one example of client k changes k's updates
little. It says nothing about a client's data as a whole (client-level DP does that).
A client whose ε would pass ``privacy.target_epsilon`` refuses to train; the server records
that as a failure with the reason, and the round goes on without it.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch


class PrivacyBudgetExhausted(RuntimeError):
    """This client's example-level budget does not allow another round."""


@dataclass(frozen=True)
class ExampleDp:
    """The run's DP-SGD settings, the same for every client."""

    clip_norm: float
    delta: float
    rounds: int
    noise_multiplier: float | None = None  # None: each client calibrates to target_epsilon
    target_epsilon: float | None = None


def _accountant(history: torch.Tensor | None):
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    if history is not None:
        acc.history = [(float(z), float(q), int(n)) for z, q, n in history.tolist()]
    return acc


@functools.lru_cache(maxsize=256)
def noise_for(settings: ExampleDp, sample_rate: float, steps_per_round: int) -> float:
    """z for this client: the configured one, or calibrated so that ``rounds`` rounds of
    ``steps_per_round`` steps at rate q reach ``target_epsilon`` (every round counted)."""
    if settings.noise_multiplier is not None:
        return settings.noise_multiplier
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=settings.target_epsilon,
            target_delta=settings.delta,
            sample_rate=sample_rate,
            steps=steps_per_round * settings.rounds,
            accountant="rdp",
            epsilon_tolerance=0.005,
        )
    )


def train_dp_sgd(model, trainable: dict, optimizer, task, batches, settings: ExampleDp, ctx):
    """Run the local DP-SGD steps. ``batches`` yields index tensors (possibly empty); ``ctx`` has
    ``n``, ``batch_size``, ``steps``, ``generator``, ``history`` (this client's accountant so far).
    Returns (losses, new history tensor, ε after these steps)."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    q = min(1.0, ctx.batch_size / ctx.n)
    z = noise_for(settings, q, ctx.steps)
    accountant = _accountant(ctx.history)
    accountant.history.append((z, q, ctx.steps))  # this round's steps, charged before they run
    after = float(accountant.get_epsilon(settings.delta))
    if settings.target_epsilon is not None and after > settings.target_epsilon * 1.001:
        raise PrivacyBudgetExhausted(
            f"example-level ε would reach {after:.3f} > privacy.target_epsilon = {settings.target_epsilon}"
        )
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
    dp_optimizer = DPOptimizer(
        optimizer,
        noise_multiplier=z,
        max_grad_norm=settings.clip_norm,
        expected_batch_size=ctx.batch_size,
        loss_reduction="mean",
        generator=ctx.generator,
    )
    losses = []
    with warnings.catch_warnings():
        # Opacus' hooks on a frozen base whose inputs need no gradient: expected, not actionable
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        _steps(gsm, dp_optimizer, trainable, task, batches, ctx.device, losses)
    history = torch.tensor(accountant.history, dtype=torch.float64)
    return losses, history, after, z


def _steps(gsm, dp_optimizer, trainable: dict, task, batches, device, losses: list) -> None:
    try:
        for rows in batches:
            if len(rows) == 0:  # an empty Poisson batch: noise only, no data
                for p in trainable.values():
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            else:
                loss = task.loss(gsm, task.batch(task.train, rows, device))
                if not math.isfinite(float(loss.detach())):
                    raise FloatingPointError(f"non-finite training loss at local step {len(losses) + 1}")
                losses.append(float(loss.detach()))
                loss.backward()
            dp_optimizer.step()
            dp_optimizer.zero_grad(set_to_none=True)
    finally:
        gsm._close()  # the base model is shared: take Opacus' hooks off again


def poisson_batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """``steps`` batches, each holding every local row independently with probability B / n."""
    q = min(1.0, batch_size / n)
    for _ in range(steps):
        yield (torch.rand(n, generator=generator) < q).nonzero().flatten()
