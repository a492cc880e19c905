"""Local training of k clients at once over one shared base model: ``client_init`` /
``client_step`` / ``client_final`` (``fedfm.client.program``) for a group.

Each client keeps what it has when it trains alone — its data order (its shuffle generator), its
LoRA-dropout generator, its step count, its LoRA rank, its head, its optimizer state and its
objective's hooks (FedProx's anchor, SCAFFOLD's control variates) — while every micro-batch of the
group is one forward and one backward through the frozen base: the rows of all active clients'
batches, each row through its own client's adapter (``fedfm.models.multilora``). Clients'
trainable tensors are disjoint slices of stacked tensors, so the backward of the sum of the
clients' losses gives each client exactly the gradient of its own loss. A client with fewer steps
leaves the batch once it has run them and is masked out of every later optimizer step.

What does not batch is refused at config time (``fedfm.config.check_batchable``): DP-SGD
(Opacus clips per example on one client's model), PEFT methods other than LoRA and heads.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from fedfm.algorithms.lora import lora_pairs
from fedfm.algorithms.stacked_optim import clip_grad_norm, stacked_optimizer
from fedfm.client.steps import (
    ClientJob,
    autocast_context,
    batch_order,
    client_batch,
    finish_update,
    num_local_steps,
)
from fedfm.models.multilora import MultiAdapter, Segments, collate, stack_each, stack_params
from fedfm.seeding import derive_seed, seed_torch, torch_generator
from fedfm.types import ClientResult, Params, RoundContext


@dataclass
class Member:
    """One client of the group: its slot in the stacks and its own training state."""

    job: ClientJob
    slot: int
    rows: torch.Tensor
    hook: object
    steps: int
    micro_batches: int
    batches: Iterator
    generator: torch.Generator
    dropout: torch.Generator
    client_state: Params | None
    losses: list = field(default_factory=list)
    micro: int = 0
    failure: str | None = None

    @property
    def active(self) -> bool:
        return self.failure is None and self.micro < self.micro_batches


class _GradSlot:
    """What an objective's gradient adjustment sees of one client's parameter: its ``.grad``."""

    __slots__ = ("grad",)

    def __init__(self, grad) -> None:
        self.grad = grad


@dataclass
class GroupTraining:
    bundle: object
    task: object
    cfg: object
    ctx: RoundContext
    starts: list[Params]  # where each member starts: θ, or its own (personalization)
    members: list[Member]
    stacks: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    optimizer: object
    adapter: MultiAdapter


def group_init(bundle, task, jobs, starts, ctx, cfg, objective, states, adapter) -> GroupTraining:
    """Stack each client's start (θ, or θ with its personal tensors: ``starts``); each client's
    generators, hooks and step count; the rank masks."""
    device, members = bundle.device, []
    for slot, (job, state, start) in enumerate(zip(jobs, states, starts, strict=True)):
        n = len(job.indices)
        steps = num_local_steps(n, cfg)
        generator = torch_generator(ctx.seed, ctx.round, job.client_id, "shuffle")
        batches = batch_order(n, cfg.batch_size, steps * cfg.grad_accumulation, generator)
        members.append(
            Member(
                job, slot, torch.as_tensor(job.indices, dtype=torch.long),
                objective.client_hook(start, ctx, state, device), steps,
                steps * cfg.grad_accumulation, batches, generator,
                dropout_generator(ctx, job.client_id, device), state,
            )
        )  # fmt: skip
    # the base model's own dropout draws from torch's default generator, over the combined batch
    seed_torch(ctx.seed, ctx.round, "group-dropout", tuple(job.client_id for job in jobs))
    same = all(start is starts[0] for start in starts)
    stacks = stack_params(starts[0], len(jobs), device) if same else stack_each(starts, device)
    masks = rank_masks(stacks, [job.rank for job in jobs])
    with torch.no_grad():
        for key, mask in masks.items():
            stacks[key].mul_(mask)
    adapter.stacks = stacks
    return GroupTraining(
        bundle, task, cfg, ctx, list(starts), members, stacks, masks, stacked_optimizer(stacks, cfg), adapter
    )


def dropout_generator(ctx: RoundContext, client_id: int, device) -> torch.Generator:
    """The client's LoRA-dropout generator: seeded as ``client_init`` seeds torch's default
    generator, so on the CPU it draws the masks the client draws alone; on a GPU it lives on the
    device (masks drawn there, in distribution only: CUDA's fused dropout draws differently)."""
    seed = derive_seed(ctx.seed, ctx.round, client_id, "dropout")
    return torch.Generator(device=device).manual_seed(seed)


def rank_masks(stacks: dict[str, torch.Tensor], ranks: list[int | None]) -> dict[str, torch.Tensor]:
    """0/1 masks that zero each client's LoRA components beyond its rank (heterogeneous ranks)."""
    if all(r is None for r in ranks):
        return {}
    masks = {}
    for a_key, b_key in lora_pairs(stacks).values():
        ma, mb = torch.ones_like(stacks[a_key]), torch.ones_like(stacks[b_key])
        for slot, r in enumerate(ranks):
            if r is not None:
                ma[slot, r:] = 0  # A: [k, r, in]
                mb[slot, :, r:] = 0  # B: [k, out, r]
        masks[a_key], masks[b_key] = ma, mb
    return masks


def group_step(g: GroupTraining) -> None:
    """One micro-batch of every active client in one forward and backward; every
    ``grad_accumulation`` micro-batches the objectives' gradient adjustments, rank masks,
    per-client clipping and the stacked optimizer step of the clients that stepped."""
    cfg, device, task = g.cfg, g.bundle.device, g.task
    built = [
        (
            m,
            _own(
                m, lambda m=m: client_batch(task, g.ctx, m.job, m.rows[next(m.batches)], m.generator, device)
            ),
        )
        for m in g.members
        if m.active
    ]
    running = [m for m, b in built if m.failure is None]
    batches = [b for m, b in built if m.failure is None]
    if not running:
        return
    sizes = tuple(len(next(iter(b.values()))) for b in batches)
    widths = tuple(b["input_ids"].shape[1] if "input_ids" in b else None for b in batches)  # images: None
    g.adapter.segments = Segments(
        torch.tensor([m.slot for m in running], device=device), sizes, widths,
        tuple(m.dropout for m in running),
        every_slot=len(running) == len(g.members),
    )  # fmt: skip
    with autocast_context(cfg.precision, device):
        losses = task.segment_losses(g.bundle.model, collate(batches, task.pad), sizes)
    penalties = [
        _own(m, m.hook.penalty, {k: s[m.slot] for k, s in g.stacks.items()}) if m.hook.penalty else None
        for m in running
    ]
    seen = losses.detach().float().cpu().tolist()
    totals = [loss if pen is None else loss + pen for loss, pen in zip(losses, penalties, strict=True)]
    finite = torch.stack([t.detach() for t in totals]).isfinite().cpu().tolist()
    stepping, total = [], None
    for m, value, ok, t in zip(running, seen, finite, totals, strict=True):
        m.losses.append(value)
        if m.failure is not None:  # its penalty raised
            continue
        if not ok:
            step = m.micro // cfg.grad_accumulation + 1
            m.failure = f"FloatingPointError: non-finite training loss at local step {step}"
            continue
        stepping.append(m)
        total = t if total is None else total + t
    if total is not None:
        (total / cfg.grad_accumulation).backward()
    for m in stepping:
        m.micro += 1
    if not stepping or stepping[0].micro % cfg.grad_accumulation:
        return
    for m in stepping:
        if m.hook.adjust_gradients is not None:
            _own(m, m.hook.adjust_gradients, {k: _GradSlot(s.grad[m.slot]) for k, s in g.stacks.items()})
    stepping = [m for m in stepping if m.failure is None]
    with torch.no_grad():
        for key, mask in g.masks.items():
            if g.stacks[key].grad is not None:
                g.stacks[key].grad.mul_(mask)
    if cfg.max_grad_norm:
        clip_grad_norm(g.stacks, cfg.max_grad_norm)
    active = torch.zeros(len(g.members), dtype=torch.bool)
    active[[m.slot for m in stepping]] = True
    g.optimizer.step(active)
    for s in g.stacks.values():
        s.grad = None


def group_final(g: GroupTraining) -> list[tuple[object, Params | None]]:
    """Per member, in order: (Update and new state) or (the failure reason, the old state)."""
    out = []
    for m in g.members:
        if m.failure is not None:
            out.append((m.failure, m.client_state))
            continue
        final = {k: s[m.slot].detach().to("cpu", torch.float32, copy=True) for k, s in g.stacks.items()}
        n = len(m.job.indices)
        done = _own(
            m, finish_update, m.hook, final, g.starts[m.slot], n, m.steps, m.losses, g.cfg, m.client_state
        )
        out.append((m.failure, m.client_state) if m.failure is not None else done)
    return out


def _own(m: Member, fn, *args):
    """One client's own part of the group's work (its batch, its objective's hooks, its finish):
    an error there fails that client alone, with the reason."""
    try:
        return fn(*args)
    except Exception as err:
        m.failure = f"{type(err).__name__}: {err}"
        return None


def train_group(program, bundle, task, jobs, global_params, ctx, states) -> list[tuple[ClientResult, dict]]:
    """The client program for a group: group init → steps → final, then each client's transforms.
    One client's failure (an empty shard, a non-finite loss, a transform's error) fails that client;
    an error of the group's pass fails the clients still training, with the reason."""
    states = [dict(s or {}) for s in states]
    results: dict[int, tuple[ClientResult, dict]] = {}
    ready = []
    for job, state in zip(jobs, states, strict=True):
        if len(job.indices) == 0:
            results[job.client_id] = (
                ClientResult.failed(
                    job.client_id, "train", "ValueError: the client has no training examples"
                ),
                state,
            )
        else:
            ready.append((job, state))
    begun = []
    for job, state in ready:  # each client's start: θ, its personal tensors in place, its cluster
        try:
            begun.append((job, state, *program.begin(bundle, task, job, global_params, ctx, state)))
        except Exception as err:
            reason = f"{type(err).__name__}: {err}"
            results[job.client_id] = (ClientResult.failed(job.client_id, "train", reason), state)
    if begun:
        outcomes = _train(program, bundle, task, begun, ctx)
        for (job, state, start, cluster), (outcome, own) in zip(begun, outcomes, strict=True):
            if isinstance(outcome, str):
                results[job.client_id] = (ClientResult.failed(job.client_id, "train", outcome), state)
                continue
            try:
                outcome = program.settle(outcome, start, cluster, state)
                payload, state = program.finish(outcome, own, job, ctx, state)
            except Exception as err:  # one broken client must not stop the round
                results[job.client_id] = (
                    ClientResult.failed(job.client_id, "train", f"{type(err).__name__}: {err}"),
                    state,
                )
                continue
            results[job.client_id] = (ClientResult(job.client_id, update=payload), state)
    return [results[job.client_id] for job in jobs]


def _train(program, bundle, task, begun, ctx):
    jobs, starts = [b[0] for b in begun], [b[2] for b in begun]
    adapter = MultiAdapter(bundle.model, bundle.trainable)
    bundle.model.train()
    with adapter:
        g = group_init(
            bundle, task, jobs, starts, ctx, program.training, program.objective,
            [b[1].get(program.objective.state_key) for b in begun], adapter,
        )  # fmt: skip
        try:
            while any(m.active for m in g.members):
                group_step(g)
        except Exception as err:
            reason = f"{type(err).__name__}: {err} (in the group's batched pass)"
            for m in g.members:
                if m.active:  # clients that had finished keep their results
                    m.failure = reason
        return group_final(g)
