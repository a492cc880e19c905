"""The local training a client runs, as init → step → final (FedJAX's client_init / client_step /
client_final), so an engine can drive the steps of many clients together.

``client_init`` sets the global state into the (shared) model and prepares the objective's hooks
and the optimizer; ``client_step`` runs one micro-batch (the step variants: the objective's
penalty and gradient adjustment — FedProx, SCAFFOLD —, gradient accumulation, DP-SGD);
``client_final`` returns the delta θ_k − θ. ``client_update`` runs the three in turn.
Shuffling and dropout draw from seeds derived from (seed, round, client), never from the
order in which an engine happens to run clients.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch

from fedfm.algorithms.lora import lora_pairs
from fedfm.algorithms.objectives import Objective, make_objective
from fedfm.algorithms.personal import (
    PERSONAL_METHODS,
    PersonalSpec,
    client_start,
    kept_personal,
    method_options,
    personal_keys,
    personalizes,
)
from fedfm.algorithms.schedules import lr_at
from fedfm.client.costs import CostMeter
from fedfm.client.steps import (
    ClientJob,
    autocast_context,
    batch_order,
    client_batch,
    finish_update,
    num_local_steps,
)
from fedfm.models.build import ModelBundle, require_bitsandbytes
from fedfm.models.state import get_trainable_state, set_trainable_state
from fedfm.privacy.dpsgd import ExampleDp, dp_sgd_final, dp_sgd_init, dp_sgd_step, poisson_batches
from fedfm.seeding import NoiseSource, seed_torch, torch_generator
from fedfm.systems.ranks import current as current_ranks
from fedfm.systems.ranks import shard as shard_base
from fedfm.transforms import Pipeline
from fedfm.transforms.base import ClientStep
from fedfm.types import ClientResult, Params, RoundContext, Update


def scheduled_training(cfg):
    """``cfg.training`` with its learning-rate schedule spanning the run (``lr_rounds``, default
    ``run.rounds``): what every client's optimizer reads its round's learning rate from."""
    training = cfg.training
    if training.lr_schedule != "constant" and training.lr_rounds is None:
        training = training.model_copy(update={"lr_rounds": cfg.run.rounds})
    return training


def round_lr(training, t: int) -> float:
    """The local learning rate of round ``t`` (``training.lr_schedule``; without ``lr_rounds``
    set, only the warm-up applies: ``scheduled_training`` fills it in from run.rounds)."""
    s = training
    return lr_at(s.lr, t, s.lr_schedule, s.lr_rounds, s.lr_warmup_rounds, s.lr_min)


def check_optimizer_device(training, device: torch.device) -> None:
    """``ValueError`` (naming the field) when the local optimizer cannot run on ``device``."""
    if training.optimizer != "adamw8bit":
        return
    require_bitsandbytes(
        "training.optimizer = 'adamw8bit' (8-bit AdamW)", "training.optimizer = 'adamw'", device
    )


def make_optimizer(params, cfg, lr: float | None = None) -> torch.optim.Optimizer:
    """A fresh local optimizer over the trainable ``params`` at ``lr`` (default ``cfg.lr``)."""
    params = [p for p in params if p.requires_grad]  # statistics travel but are not optimised
    lr = cfg.lr if lr is None else lr
    if cfg.optimizer == "adamw8bit":
        check_optimizer_device(cfg, params[0].device if params else torch.device("cpu"))
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


@dataclass
class LocalTraining:
    """One client's local training in progress (``client_init``'s result): what ``client_step``
    advances and ``client_final`` turns into the update. Engines may hold many of these."""

    bundle: ModelBundle
    task: object
    job: ClientJob
    global_params: Params
    ctx: RoundContext
    cfg: object
    hook: object  # the objective's LocalHook: penalty, gradient adjustment, finish
    optimizer: torch.optim.Optimizer
    steps: int
    rows: torch.Tensor
    generator: torch.Generator
    rank_mask: dict = field(default_factory=dict)
    losses: list = field(default_factory=list)
    micro: int = 0  # micro-batches run (gradient accumulation steps once per `grad_accumulation`)
    dp_sgd: object = None  # fedfm.privacy.dpsgd.DpSgdState: the DP-SGD step variant
    client_state: Params | None = None
    ranks: object = None  # fedfm.systems.ranks.Ranks: this client trains on several processes


def client_init(bundle, task, job, global_params, ctx, cfg, objective: Objective, client_state=None):
    """Set θ into the (shared) model and prepare this client's training: rank masks, seeded
    dropout and shuffling, the objective's hook, the optimizer; with DP-SGD, Opacus' hooks."""
    n = len(job.indices)
    if n == 0:
        raise ValueError("the client has no training examples")
    trainable, device = bundle.trainable, bundle.device
    for p in trainable.values():  # nothing left over from a client that failed mid-step
        p.grad = None
    set_trainable_state(trainable, global_params)
    rank_mask = _rank_masks(trainable, job.rank)
    _apply_masks(trainable, rank_mask, params=True)
    seed_torch(ctx.seed, ctx.round, job.client_id, "dropout")
    generator = torch_generator(ctx.seed, ctx.round, job.client_id, "shuffle")
    hook = objective.client_hook(global_params, ctx, client_state, device)
    optimizer = make_optimizer(list(trainable.values()), cfg, round_lr(cfg, ctx.round))
    rows = torch.as_tensor(job.indices, dtype=torch.long)
    bundle.model.train()
    steps, dp_sgd = num_local_steps(n, cfg), None
    if isinstance(ctx.dp, ExampleDp):
        # Poisson batches and Opacus' noise are privacy randomness: from the round's noise source
        generator = (ctx.noise or NoiseSource()).generator(ctx.round, job.client_id, "dp-sgd")
        settings = SimpleNamespace(
            n=n, batch_size=cfg.batch_size, steps=steps, generator=generator,
            history=(client_state or {}).get("history"), device=device,
        )  # fmt: skip
        dp_sgd = dp_sgd_init(bundle.model, optimizer, ctx.dp, settings)
    ranks = current_ranks()
    if ranks is not None and dp_sgd is not None:
        raise ValueError("DP-SGD cannot train on several processes: run this client with --nproc 1")
    if ranks is not None and ranks.shard_base:
        shard_base(bundle.model, trainable)  # once, at the first local training
    return LocalTraining(
        bundle, task, job, global_params, ctx, cfg, hook, optimizer, steps, rows, generator,
        rank_mask=rank_mask, dp_sgd=dp_sgd, client_state=client_state, ranks=ranks,
    )  # fmt: skip


def local_batches(training: LocalTraining):
    """The client's batches of row positions, drawn lazily: seeded permutations (``steps ×
    grad_accumulation`` micro-batches), or DP-SGD's Poisson batches (one per step)."""
    n, cfg = len(training.rows), training.cfg
    if training.dp_sgd is not None:
        return poisson_batches(n, cfg.batch_size, training.steps, training.generator)
    return batch_order(n, cfg.batch_size, training.steps * cfg.grad_accumulation, training.generator)


def client_step(training: LocalTraining, positions: torch.Tensor) -> None:
    """One micro-batch: forward, the objective's penalty, backward; every ``grad_accumulation``
    micro-batches the objective's gradient adjustment, rank masks, clipping and the optimizer step.
    DP-SGD's variant: one Opacus step (per-sample clipping and noise) on a Poisson batch."""
    if training.dp_sgd is not None:
        dp_sgd_step(
            training.dp_sgd,
            training.bundle.trainable,
            training.task,
            training.rows[positions],
            training.bundle.device,
            training.losses,
        )
        return
    cfg, ctx, task, hook, trainable = (
        training.cfg,
        training.ctx,
        training.task,
        training.hook,
        training.bundle.trainable,
    )
    device, accum, ranks = training.bundle.device, cfg.grad_accumulation, training.ranks
    mine, scale = positions, 1.0
    if ranks is not None:  # several processes: this rank's share of the batch, weighted by its size
        mine = ranks.share(positions)
        scale = len(mine) / len(positions)
        if not len(mine) and ranks.shard_base:  # a sharded base gathers in every rank's forward
            mine = positions[:1]  # a row that counts for nothing
    if len(mine):
        batch = client_batch(task, ctx, training.job, training.rows[mine], training.generator, device)
        with autocast_context(cfg.precision, device):
            loss = task.loss(training.bundle.model, batch)
        value = float(loss.detach())
        if hook.penalty is not None:
            loss = loss + hook.penalty(trainable)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at local step {training.micro // accum + 1}")
        (loss * scale / accum).backward()
    else:
        value = 0.0
    training.losses.append(value if ranks is None else ranks.sum_value(value * scale))
    training.micro += 1
    if training.micro % accum:  # gradient accumulation: step once per `accum` micro-batches
        return
    if ranks is not None:  # every rank now holds the whole batch's gradient
        ranks.sum_gradients(trainable.values())
    if hook.adjust_gradients is not None:
        hook.adjust_gradients(trainable)
    _apply_masks(trainable, training.rank_mask, params=False)
    if cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(trainable.values(), cfg.max_grad_norm)
    training.optimizer.step()
    training.optimizer.zero_grad(set_to_none=True)


def client_final(training: LocalTraining) -> tuple[Update, Params | None]:
    """The update θ_k − θ with its metrics, and the client's new state (SCAFFOLD's control
    variate; DP-SGD's accountant history)."""
    final = get_trainable_state(training.bundle.trainable)
    n, steps = len(training.rows), training.steps
    if training.dp_sgd is not None:
        delta = {k: final[k] - training.global_params[k] for k in training.global_params}
        dp_sgd_final(training.dp_sgd)
        metrics = {
            "train_loss": float(np.mean(training.losses)) if training.losses else float("nan"),
            "steps": float(steps),
            "dp_epsilon": training.dp_sgd.epsilon,
            "dp_noise_multiplier": training.dp_sgd.noise_multiplier,
            "dp_sample_rate": min(1.0, training.cfg.batch_size / n),
            "dp_steps": float(steps),
        }
        return Update(delta, n, metrics), {"history": training.dp_sgd.history}
    lr = round_lr(training.cfg, training.ctx.round)  # the rate this round trained at (SCAFFOLD's η)
    return finish_update(
        training.hook, final, training.global_params, n, steps, training.losses, training.cfg,
        training.client_state, lr,
    )  # fmt: skip


def client_update(
    bundle: ModelBundle,
    task,
    job: ClientJob,
    global_params: Params,
    ctx: RoundContext,
    cfg,
    objective: Objective,
    client_state: Params | None = None,
    party: bool = True,
) -> tuple[Update, Params | None]:
    """Train one client from ``global_params``: init → step per batch → final. ``party``: a
    client (the bundle's ``training_context`` wraps it: split's cut); false: the server's own
    training (a baseline, the synthetic warm-up), which crosses no cut."""
    training = client_init(bundle, task, job, global_params, ctx, cfg, objective, client_state)
    meter = CostMeter(bundle.model, bundle.trainable, bundle.parts) if cfg.count_costs else None
    wrap = bundle.training_context if party else None
    around = wrap(job, ctx) if wrap else contextlib.nullcontext({})
    try:
        with around as extra, meter.counting() if meter else contextlib.nullcontext():
            for positions in local_batches(training):
                client_step(training, positions)
                if meter:
                    meter.step()
    except BaseException:
        if training.dp_sgd is not None:
            dp_sgd_final(training.dp_sgd)  # the base model is shared: take Opacus' hooks off again
        raise
    update, state = client_final(training)
    update.metrics.update(extra)
    if meter:
        update.metrics.update(meter.record(training.optimizer))
    return update, state


@contextlib.contextmanager
def frozen(trainable: dict, keys) -> None:
    """Train nothing in ``keys`` for a while (their optimizer never sees them; their delta is 0)."""
    held = [trainable[k] for k in keys if trainable[k].requires_grad]
    for p in held:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in held:
            p.requires_grad_(True)


def fedrep_update(bundle, task, job, start: Params, ctx, cfg, objective, spec) -> tuple[Update, None]:
    """FedRep's round: ``spec.head_steps`` steps of the head alone (the body frozen), then the
    local steps of the body alone (the head frozen); one update θ_end − θ_start over both."""
    personal = personal_keys(start, spec.is_personal)
    body = [k for k in start if k not in set(personal)]
    head_cfg = cfg.model_copy(update={"local_steps": spec.head_steps})
    with frozen(bundle.trainable, body):
        first, _ = client_update(bundle, task, job, start, ctx, head_cfg, Objective("plain"))
    middle = {k: start[k] + first.delta[k] for k in start}
    with frozen(bundle.trainable, personal):
        second, _ = client_update(bundle, task, job, middle, ctx, cfg, objective)
    delta = {k: first.delta[k] + second.delta[k] for k in start}
    losses = {"train_loss": second.metrics["train_loss"], "head_train_loss": first.metrics["train_loss"]}
    return Update(delta, second.num_examples, {**second.metrics, **losses}), None


def ditto_personal(bundle, task, job, mine: Params, anchor: Params, ctx, cfg, spec) -> Params:
    """Ditto's personal step: from the client's own adapter ``mine``, ``spec.personal_steps``
    (default: the local steps) on its loss + λ/2·‖v − w‖² with w = ``anchor`` (the round's global
    state); returns the new personal adapter. Its own dropout and shuffling seeds."""
    from dataclasses import replace as dc_replace

    from fedfm.algorithms.objectives import fedprox_hook
    from fedfm.seeding import derive_seed

    steps = spec.personal_steps or num_local_steps(len(job.indices), cfg)
    own_ctx = dc_replace(ctx, seed=derive_seed(ctx.seed, "ditto"))
    training = client_init(
        bundle, task, job, mine, own_ctx, cfg.model_copy(update={"local_steps": steps}), Objective("plain")
    )
    training.hook = fedprox_hook(spec.lam, anchor, own_ctx, None, bundle.device)
    for positions in local_batches(training):
        client_step(training, positions)
    return get_trainable_state(bundle.trainable)


def pick_cluster(bundle, task, client_id: int, rows, stacked: Params, spec, ctx) -> tuple[int, list[float]]:
    """IFCA's choice: the cluster model with the lowest loss on (the first
    ``spec.cluster_examples`` of) the client's rows; ties by a seeded draw of the client's own."""
    from fedfm.algorithms.clusters import choose_cluster, cluster_view
    from fedfm.seeding import numpy_rng

    rows = np.asarray(rows)[: spec.cluster_examples]
    losses = []
    for j in range(spec.clusters):
        set_trainable_state(bundle.trainable, cluster_view(stacked, j))
        losses.append(float(task.evaluate(bundle.model, task.train, rows, 32, bundle.device)["loss"]))
    rng = numpy_rng(ctx.seed, "ifca", ctx.round, client_id)
    return choose_cluster(losses, rng), losses


def train_from(
    bundle: ModelBundle, task, rows: np.ndarray, start: Params, steps: int, cfg, seed: int, key: int = -1
) -> tuple[Params, float]:
    """Train ``rows`` from ``start`` for ``steps`` with the plain objective, on one party's behalf
    (a baseline, or the server's synthetic warm-up); returns the new state and the mean loss."""
    # one party's training outside the rounds: at its own rate, no schedule across rounds
    training = cfg.model_copy(update={"local_steps": steps, "lr_schedule": "constant", "lr_warmup_rounds": 0})
    ctx = RoundContext(round=0, seed=seed)
    with own_statistics(bundle, {}):  # FedBN: a party of its own, from the loaded statistics
        update, _ = client_update(
            bundle, task, ClientJob(key, rows), start, ctx, training, Objective("plain"), party=False
        )
    return {k: start[k] + update.delta[k] for k in start}, update.metrics["train_loss"]


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


@contextlib.contextmanager
def own_statistics(bundle: ModelBundle, state: dict):
    """``model.batch_norm = "local"`` (FedBN's statistics): the client trains with its own
    BatchNorm statistics (the loaded ones on its first round) and keeps what training made of
    them in ``state["batch_norm"]``; the shared model gets the loaded ones back after. Other
    modes: nothing to do."""
    live = bundle.local_statistics
    if not live:
        yield
        return
    set_trainable_state(live, state.get("batch_norm") or bundle.initial_statistics)
    try:
        yield
        state["batch_norm"] = get_trainable_state(live)
    finally:
        set_trainable_state(live, bundle.initial_statistics)


@dataclass(frozen=True)
class ClientProgram:
    """What a client runs each round: local training (init → step → final), then the client
    halves of the update transforms in their declared order (``fedfm.transforms.base``).

    Picklable: engines receive it and call it unchanged, in this process, on a Ray worker or in
    a deployed client. Client state is a dict of named ``Params`` that the engine keeps per client
    and checkpoints: the objective's state under its ``state_key`` (SCAFFOLD: ``"scaffold"``, the
    control variate), ``"dp_sgd"`` (DP-SGD's accountant),
    ``"residual"`` (top-k error feedback), ``"batch_norm"`` (FedBN: its own statistics),
    ``"personal"`` (personalization: the tensors that never leave the client).
    """

    training: object
    objective: Objective
    pipeline: Pipeline
    personal: object = None  # personalization: key → whether the tensor stays with the client

    @classmethod
    def from_config(cls, cfg) -> ClientProgram:
        p = cfg.personalization
        personal = None
        if personalizes(p):
            k = p.clusters if PERSONAL_METHODS.get(p.method).clustered else 0
            options = tuple(method_options(p).items())
            personal = PersonalSpec(
                p.method, p.head_steps, p.ditto_lambda, p.personal_steps, k, p.cluster_examples, options
            )
        return cls(scheduled_training(cfg), make_objective(cfg.strategy), Pipeline.build(cfg), personal)

    def __call__(
        self,
        bundle: ModelBundle,
        task,
        job: ClientJob,
        global_params: Params,
        ctx: RoundContext,
        state: dict[str, Params] | None = None,
    ) -> tuple[object, dict[str, Params]]:
        state = dict(state or {})
        key = "dp_sgd" if isinstance(ctx.dp, ExampleDp) else self.objective.state_key
        spec = self.personal
        with own_statistics(bundle, state):
            start, cluster = self.begin(bundle, task, job, global_params, ctx, state)
            if spec is not None and spec.kind.head_first:
                update, own = fedrep_update(
                    bundle, task, job, start, ctx, self.training, self.objective, spec
                )
            else:
                update, own = client_update(
                    bundle, task, job, start, ctx, self.training, self.objective, state.get(key)
                )
            if spec is not None and spec.whole_copy:  # Ditto: the personal adapter's own steps
                mine = state.get("personal") or global_params
                state["personal"] = ditto_personal(
                    bundle, task, job, mine, global_params, ctx, self.training, spec
                )
        update = self.settle(update, start, cluster, state)
        return self.finish(update, own, job, ctx, state, key)

    def begin(self, bundle, task, job: ClientJob, global_params: Params, ctx: RoundContext, state):
        """Where the client trains from → (start, IFCA's (cluster, loss) or None): the global
        state, with its own personal tensors in place of the global ones (the global ones on its
        first round), or under IFCA the cluster model with its lowest loss."""
        spec = self.personal
        if spec is None or spec.whole_copy:
            return global_params, None
        if spec.clusters:
            from fedfm.algorithms.clusters import cluster_view

            j, losses = pick_cluster(bundle, task, job.client_id, job.indices, global_params, spec, ctx)
            return cluster_view(global_params, j), (j, losses[j])
        return client_start(global_params, state.get("personal")), None

    def settle(self, update: Update, start: Params, cluster, state: dict) -> Update:
        """After local training: the personal tensors kept in ``state`` (the "personal" transform
        keeps them home), or IFCA's update under its cluster's names with its index."""
        spec = self.personal
        if spec is None or spec.whole_copy:
            return update
        if cluster is not None:
            from fedfm.algorithms.clusters import as_cluster

            j, loss = cluster
            metrics = {**update.metrics, "cluster": j, "cluster_loss": loss}
            return Update(as_cluster(update.delta, j), update.num_examples, metrics, update.control_delta)
        state["personal"] = kept_personal(start, update.delta, personal_keys(start, spec.is_personal))
        return update

    def finish(self, update: Update, own, job: ClientJob, ctx: RoundContext, state: dict, key=None):
        """After local training: keep the objective's new state (under ``key``, by default the
        objective's ``state_key``), then the client transforms."""
        if own is not None:
            state[key or self.objective.state_key] = own
        return self.pipeline.client(update, ClientStep(job, ctx, state)), state

    def one(self, bundle, task, job: ClientJob, global_params: Params, ctx: RoundContext, state):
        """Train one client: ``(ClientResult, state)`` as ``group`` returns per client; an error
        fails that client with the reason (one broken client must not stop the round)."""
        try:
            payload, state = self(bundle, task, job, global_params, ctx, state)
        except Exception as err:
            return ClientResult.failed(job.client_id, "train", f"{type(err).__name__}: {err}"), state
        return ClientResult(job.client_id, update=payload), state

    def local_steps(self, job: ClientJob) -> int:
        return num_local_steps(len(job.indices), self.training)

    def group(self, bundle, task, jobs, global_params: Params, ctx: RoundContext, states) -> list:
        """Train ``jobs`` together in one pass per step over the shared base model
        (``fedfm.client.groups``); ``states`` holds each client's state (or None). Returns
        ``(ClientResult, state)`` per client, in ``jobs`` order."""
        from fedfm.client.groups import train_group

        return train_group(self, bundle, task, jobs, global_params, ctx, states)
