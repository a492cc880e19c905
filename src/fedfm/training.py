"""The local training a client runs: one function every engine calls unchanged.

``client_update`` sets the global state into the (shared) model, trains for the configured
number of local steps with the client objective's hooks, and returns the delta θ_k − θ.
Shuffling and dropout draw from seeds derived from (seed, round, client), never from the
order in which an engine happens to run clients.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from types import SimpleNamespace

import numpy as np
import torch

from fedfm.algorithms.lora import lora_pairs, truncate_rank
from fedfm.algorithms.objectives import Objective
from fedfm.attacks import poison_batch
from fedfm.models.build import ModelBundle
from fedfm.models.state import get_trainable_state, set_trainable_state
from fedfm.privacy import dp, packing
from fedfm.privacy.dpsgd import ExampleDp, poisson_batches, train_dp_sgd
from fedfm.seeding import NoiseSource, seed_torch, torch_generator
from fedfm.transforms.compression import encode
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
    if cfg.local_steps:
        return cfg.local_steps
    return max(1, math.ceil(cfg.local_epochs * num_examples / (cfg.batch_size * cfg.grad_accumulation)))


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


def make_optimizer(params, cfg) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def client_update(
    bundle: ModelBundle,
    task,
    job: ClientJob,
    global_params: Params,
    ctx: RoundContext,
    cfg,
    objective: Objective,
    client_state: Params | None = None,
) -> tuple[Update, Params | None]:
    """Train one client from ``global_params``; return its update and its new client state."""
    n = len(job.indices)
    if n == 0:
        raise ValueError("the client has no training examples")
    model, trainable, device = bundle.model, bundle.trainable, bundle.device
    set_trainable_state(trainable, global_params)
    rank_mask = _rank_masks(trainable, job.rank)
    _apply_masks(trainable, rank_mask, params=True)
    seed_torch(ctx.seed, ctx.round, job.client_id, "dropout")
    generator = torch_generator(ctx.seed, ctx.round, job.client_id, "shuffle")
    hook = objective.client_hook(global_params, ctx, client_state, device)
    optimizer = make_optimizer(list(trainable.values()), cfg)
    steps = num_local_steps(n, cfg)
    rows = torch.as_tensor(job.indices, dtype=torch.long)
    model.train()
    if isinstance(ctx.dp, ExampleDp):
        return _dp_sgd_update(bundle, task, job, global_params, ctx, cfg, optimizer, steps, client_state)
    losses = []
    accum = cfg.grad_accumulation
    autocast = autocast_context(cfg.precision, device)
    for i, positions in enumerate(batch_order(n, cfg.batch_size, steps * accum, generator)):
        if ctx.attack is not None and ctx.attack.poisons_data(job.client_id):
            batch = poison_batch(ctx.attack, task, rows[positions], generator, device)
        else:
            batch = task.batch(task.train, rows[positions], device)
        with autocast:
            loss = task.loss(model, batch)
        losses.append(float(loss.detach()))
        if hook.penalty is not None:
            loss = loss + hook.penalty(trainable)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at local step {i // accum + 1}")
        (loss / accum).backward()
        if (i + 1) % accum:  # gradient accumulation: step once per `accum` micro-batches
            continue
        if hook.adjust_gradients is not None:
            hook.adjust_gradients(trainable)
        _apply_masks(trainable, rank_mask, params=False)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable.values(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    final, delta = trained_delta(trainable, global_params)
    control_delta, new_state = None, client_state
    if hook.finish is not None:
        control_delta, new_state = hook.finish(final, steps, cfg.lr)
    metrics = {"train_loss": float(np.mean(losses)), "steps": float(steps)}
    return Update(delta, n, metrics, control_delta), new_state


def train_from(
    bundle: ModelBundle, task, rows: np.ndarray, start: Params, steps: int, cfg, seed: int, key: int = -1
) -> tuple[Params, float]:
    """Train ``rows`` from ``start`` for ``steps`` with the plain objective, on one party's behalf
    (a baseline, or the server's synthetic warm-up); returns the new state and the mean loss."""
    training = cfg.model_copy(update={"local_steps": steps})
    ctx = RoundContext(round=0, seed=seed)
    update, _ = client_update(bundle, task, ClientJob(key, rows), start, ctx, training, Objective("plain"))
    return {k: start[k] + update.delta[k] for k in start}, update.metrics["train_loss"]


def trained_delta(trainable: dict, global_params: Params) -> tuple[Params, Params]:
    """The state after local training and the update θ_k − θ."""
    final = get_trainable_state(trainable)
    return final, {k: final[k] - global_params[k] for k in global_params}


def _dp_sgd_update(bundle, task, job, global_params, ctx, cfg, optimizer, steps, client_state):
    """Local training as DP-SGD (Opacus); the client state carries its accountant's history."""
    n = len(job.indices)
    rows = torch.as_tensor(job.indices, dtype=torch.long)
    # Poisson batches and Opacus' noise are privacy randomness: from the round's noise source
    generator = (ctx.noise or NoiseSource()).generator(ctx.round, job.client_id, "dp-sgd")
    batches = (rows[p] for p in poisson_batches(n, cfg.batch_size, steps, generator))
    history = (client_state or {}).get("history")
    run = SimpleNamespace(
        n=n,
        batch_size=cfg.batch_size,
        steps=steps,
        generator=generator,
        history=history,
        device=bundle.device,
    )
    losses, history, eps, z = train_dp_sgd(
        bundle.model, bundle.trainable, optimizer, task, batches, ctx.dp, run
    )
    _, delta = trained_delta(bundle.trainable, global_params)
    metrics = {
        "train_loss": float(np.mean(losses)) if losses else float("nan"),
        "steps": float(steps),
        "dp_epsilon": eps,
        "dp_noise_multiplier": z,
        "dp_sample_rate": min(1.0, cfg.batch_size / n),
        "dp_steps": float(steps),
    }
    return Update(delta, n, metrics), {"history": history}


def _rank_masks(trainable: dict, rank: int | None) -> dict[str, tuple[slice, ...]]:
    """For a client of LoRA rank ``rank``: the components beyond it, per LoRA tensor."""
    if rank is None:
        return {}
    masks = {}
    for a_key, b_key in lora_pairs(trainable).values():
        masks[a_key] = (slice(rank, None),)
        masks[b_key] = (slice(None), slice(rank, None))
    return masks


@torch.no_grad()
def _apply_masks(trainable: dict, masks: dict, params: bool) -> None:
    """Zero the masked components of the parameters (at start) or of their gradients (each step)."""
    for key, index in masks.items():
        target = trainable[key] if params else trainable[key].grad
        if target is not None:
            target[index] = 0


@dataclass(frozen=True)
class ClientProgram:
    """What a client runs each round: local training, then the client halves of the transforms.

    The client halves run in the documented order: rank cut → (under secure aggregation with
    client-level DP) clip → compress, or fixed-point encode → mask; with distributed DP,
    clip → rotate and quantise → Skellam noise → mask. With central DP and no secure aggregation
    the server clips.

    Engines call it unchanged. Client state is a dict of named ``Params`` that the engine keeps
    per client and checkpoints: ``"scaffold"`` (control variate), ``"residual"`` (top-k error
    feedback).
    """

    training: object
    objective: Objective
    compression: object

    def __call__(
        self,
        bundle: ModelBundle,
        task,
        job: ClientJob,
        global_params: Params,
        ctx: RoundContext,
        state: dict[str, Params] | None = None,
    ) -> tuple[Update, dict[str, Params]]:
        state = dict(state or {})
        example_dp = isinstance(ctx.dp, ExampleDp)
        own = state.get("dp_sgd") if example_dp else state.get("scaffold")
        update, control = client_update(
            bundle, task, job, global_params, ctx, self.training, self.objective, own
        )
        if control is not None:
            state["dp_sgd" if example_dp else "scaffold"] = control
        if job.rank is not None:  # send only the components this client trains
            update = replace(update, delta=truncate_rank(update.delta, job.rank))
        bit = None
        if isinstance(ctx.dp, dp.DpRound):  # client-level DP under secure aggregation: clients clip
            layout = ctx.secure.layout if ctx.secure is not None else None
            slack = layout.rounding_slack if layout is not None and layout.skellam is None else 0.0
            delta, bit = dp.client_half(update.delta, ctx.dp, slack)
            update = replace(update, delta=delta)
        if ctx.secure is not None:  # → encode (→ integer noise) → mask: the masked vector is all that is sent
            noise = None
            if ctx.secure.layout.skellam is not None:
                noise = (ctx.noise or NoiseSource()).generator(ctx.round, job.client_id, "dp")
            vector = packing.pack(
                ctx.secure.layout,
                update.delta,
                update.num_examples,
                update.metrics["train_loss"],
                torch_generator(ctx.seed, ctx.round, job.client_id, "secagg"),
                update.control_delta,
                bit,
                noise,
            )
            # DP-SGD's settings are a client's own statement; they travel beside the masked vector
            shown = {k: v for k, v in update.metrics.items() if k.startswith("dp_")}
            return Update(ctx.secure.mask(job.client_id, vector), 1, shown), state
        generator = torch_generator(ctx.seed, ctx.round, job.client_id, "compress")
        payload, residual = encode(update.delta, self.compression, generator, state.get("residual"))
        if residual is not None:
            state["residual"] = residual
        return replace(update, delta=payload), state
