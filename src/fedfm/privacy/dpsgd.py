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

The ε fedfm reports is the server's own: each client states the z, q and steps it ran, the
server checks them against the mechanism it configured (``report_problem``: an update that ran
anything else is rejected) and composes them in its own accountant (``server_epsilon``). A
client's own report of its ε is never used.
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


@dataclass
class DpSgdState:
    """One client's DP-SGD in progress: Opacus' per-sample-gradient module and DP optimizer on
    the shared model, and this client's accountant history with this round's steps charged."""

    gsm: object
    optimizer: object
    history: torch.Tensor
    epsilon: float
    noise_multiplier: float


def dp_sgd_init(model, optimizer, settings: ExampleDp, ctx) -> DpSgdState:
    """Charge this round's steps (before they run) and put Opacus' hooks on the shared model.
    ``ctx`` has ``n``, ``batch_size``, ``steps``, ``generator``, ``history``."""
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
    history = torch.tensor(accountant.history, dtype=torch.float64)
    return DpSgdState(gsm, dp_optimizer, history, after, z)


def dp_sgd_step(dp: DpSgdState, trainable: dict, task, rows, device, losses: list) -> None:
    """One DP-SGD step on a Poisson batch (possibly empty: noise only, no data)."""
    if len(rows) == 0:
        for p in trainable.values():
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    else:
        with warnings.catch_warnings():
            # Opacus' hooks on a frozen base whose inputs need no gradient: expected, not actionable
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            loss = task.loss(dp.gsm, task.batch(task.train, rows, device))
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f"non-finite training loss at local step {len(losses) + 1}")
            losses.append(float(loss.detach()))
            loss.backward()
    dp.optimizer.step()
    dp.optimizer.zero_grad(set_to_none=True)


def dp_sgd_final(dp: DpSgdState) -> None:
    """Take Opacus' hooks off the shared base model again (also after a failed step)."""
    dp.gsm._close()


def train_dp_sgd(model, trainable: dict, optimizer, task, batches, settings: ExampleDp, ctx):
    """All local DP-SGD steps at once (init → steps → final). Returns (losses, new history
    tensor, ε after these steps, z)."""
    dp = dp_sgd_init(model, optimizer, settings, ctx)
    losses: list = []
    try:
        for rows in batches:
            dp_sgd_step(dp, trainable, task, rows, ctx.device, losses)
    finally:
        dp_sgd_final(dp)
    return losses, dp.history, dp.epsilon, dp.noise_multiplier


def poisson_batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """``steps`` batches, each holding every local row independently with probability B / n."""
    q = min(1.0, batch_size / n)
    for _ in range(steps):
        yield (torch.rand(n, generator=generator) < q).nonzero().flatten()


# ---------------------------------------------------------------- the server's own account


def report_problem(settings: ExampleDp, metrics, num_examples: int | None, batch_size: int, steps_for):
    """Why a DP-SGD client's statement of what it ran is not the configured mechanism, or None.

    The client states z, q and its step count; the server recomputes z from the settings it set
    (``noise_for``) and, when it knows the client's example count, q = B / n and the steps.
    ``steps_for(n)`` is the configured number of local steps for n examples.
    """
    try:
        z, q, steps = (float(metrics[k]) for k in ("dp_noise_multiplier", "dp_sample_rate", "dp_steps"))
    except (KeyError, TypeError, ValueError):
        return "DP-SGD update without its noise multiplier, sample rate and steps"
    if not all(map(math.isfinite, (z, q, steps))) or not 0 < q <= 1 or steps < 1 or steps != int(steps):
        return f"implausible DP-SGD settings (z = {z!r}, q = {q!r}, steps = {steps!r})"
    if num_examples is not None:
        if not math.isclose(q, min(1.0, batch_size / num_examples), rel_tol=1e-9):
            return f"DP-SGD sample rate {q:.6g} is not B / n = {batch_size} / {num_examples}"
        if int(steps) != steps_for(num_examples):
            return f"DP-SGD ran {int(steps)} steps, the configuration gives {steps_for(num_examples)}"
    expected = noise_for(settings, q, int(steps))
    if not math.isclose(z, expected, rel_tol=1e-9):
        return f"DP-SGD noise multiplier {z:.6g} is not the configured {expected:.6g} for q = {q:.6g}"
    return None


def server_epsilon(history: list, delta: float) -> float:
    """ε of one client's DP-SGD rounds [(z, q, steps), ...], from an accountant the server runs."""
    if not history:
        return 0.0
    acc = _accountant(torch.tensor(history, dtype=torch.float64))
    return float(acc.get_epsilon(delta))
