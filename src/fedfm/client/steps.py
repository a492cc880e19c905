"""What a client's local training is made of, shared by one client's training
(``fedfm.client.program``) and a group's (``fedfm.client.groups``): the job, the number of steps,
the batch order, bf16 autocast, a (possibly poisoned) batch, and the finished update."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from fedfm.attacks import poison_batch
from fedfm.types import Params, RoundContext, Update


@dataclass(frozen=True)
class ClientJob:
    """One client's work in a round: who it is and which training rows it holds."""

    client_id: int
    indices: np.ndarray
    rank: int | None = None  # heterogeneous LoRA: train and send only the first `rank` components


def num_local_steps(num_examples: int, cfg) -> int:
    """``training.local_steps`` if set, else ceil(local_epochs · n / (batch_size · grad_accumulation)),
    at least 1. A step is one optimizer step."""
    return cfg.steps_for(num_examples)


def batch_order(num_examples: int, batch_size: int, steps: int, generator: torch.Generator):
    """Index batches over repeated seeded permutations (epochs), ``steps`` of them."""
    produced = 0
    while produced < steps:
        perm = torch.randperm(num_examples, generator=generator)
        for start in range(0, num_examples, batch_size):
            if produced == steps:
                return
            yield perm[start : start + batch_size]
            produced += 1


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast of forward passes where the device supports it; fp32: no change."""
    if precision != "bf16":
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("training.precision = 'bf16' but this GPU has no bfloat16 support; use 'fp32'")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def client_batch(task, ctx: RoundContext, job: ClientJob, rows: torch.Tensor, generator, device) -> dict:
    """The client's batch of training ``rows``, as a data attack alters it for a poisoning client."""
    if ctx.attack is not None and ctx.attack.poisons_data(job.client_id):
        return poison_batch(ctx.attack, task, rows, generator, device)
    return task.batch(task.train, rows, device)


def finish_update(
    hook, final: Params, global_params: Params, n: int, steps: int, losses, cfg, client_state, lr=None
):
    """The update θ_k − θ of a client whose training ended at ``final``, its metrics, and the
    objective's finish (SCAFFOLD's control delta and new control variate, from the learning rate
    the round trained at: ``lr``, default ``cfg.lr``)."""
    delta = {k: final[k] - global_params[k] for k in global_params}
    control_delta, new_state = None, client_state
    if hook.finish is not None:
        control_delta, new_state = hook.finish(final, steps, cfg.lr if lr is None else lr)
    metrics = {"train_loss": float(np.mean(losses)), "steps": float(steps)}
    return Update(delta, n, metrics, control_delta), new_state
