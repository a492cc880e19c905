"""The Ray engine: cohorts trained by long-lived workers on a Ray cluster (local by default).

Each worker is a Ray actor that builds the frozen base model once (the setup's picklable
``build_bundle``) and then trains many clients in turn with the same ``ClientProgram`` as the
in-process engine — never a model load per client. The tokenized task, the client jobs and the
program are put in Ray's object store once; each call ships only the global trainable state (put
once per round), the round context and that client's state. Client state (SCAFFOLD's control
variate, the top-k residual) lives with the driver, keyed by client, and travels to whichever
worker trains the client next, so it follows the client and is checkpointed like the in-process
engine's. The worker imports no strategy: what it runs arrives inside the pickled program.

Results are yielded as workers finish, so the server's streaming mean folds them in completion
order; against the in-process engine the global state then differs only by floating-point
summation order (the contract test checks two rounds to 1e-6). On a real cluster every node must
be able to load the model (``model.name``: a registered packaged model, a shared folder or a hub id).

With ``ray.batched`` each worker trains groups of clients as the batched engine does
(``ClientProgram.group``): the driver splits the cohort into groups of the size the workers'
memory allows (``[batched]``) and hands each idle worker the next group. A worker whose process or
node dies fails the clients it was training (with the node and the reason) and is dropped; the
round goes on, and later rounds run on the workers that remain.

With ``ray.procs_per_client = N`` each client trains on N worker processes together
(``fedfm.systems.ranks``, gloo): a gang of N actors placed on one node (a ``STRICT_PACK``
placement group), rank 0 first. Every rank is handed the same client and trains its share of
each batch; gradients are summed across ranks before each step, so the update equals one
process's to float tolerance, and rank 0's result is the client's. With ``ray.fsdp`` the frozen
base is sharded across the gang (FSDP). A gang one of whose ranks fails or dies fails the client
it was training with the reason and is retired (its process group cannot be trusted after a
failed collective); the round goes on, later rounds run on the gangs left.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from pydantic import Field

from fedfm.config.sections import Section
from fedfm.engines.base import EngineSetup, engine
from fedfm.engines.state import ClientStates
from fedfm.types import ClientResult, Params, RoundContext


class _Worker:
    """One copy of the base model; trains whichever clients it is handed (one, or a group)."""

    def __init__(
        self, build_bundle, program, task, jobs, threads: int, group, gpu_share: float = 1.0
    ) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.bundle = build_bundle()
        self.task, self.jobs, self.program, self.group = task, jobs, program, group
        self.gpu_share = gpu_share
        self.rank = 0

    def address(self) -> str:
        """``host:port`` on this worker's node, free now: where its gang's ranks meet."""
        import socket

        import ray

        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return f"{host}:{s.getsockname()[1]}"

    def join(self, rank: int, layout, address: str) -> int:
        """Become ``rank`` of the gang that trains each client together."""
        from fedfm.systems import ranks

        ranks.join(rank, layout.nproc, address, layout.timeout_s, layout.shard_base)
        self.rank = rank
        return rank

    def describe(self) -> tuple[str, int]:
        """This worker's node id and, when it trains groups, the group size its memory allows."""
        import ray

        from fedfm.engines.batched import _max_length, check_stackable, group_size

        node = ray.get_runtime_context().get_node_id()
        if self.group is None:
            return node, 1
        check_stackable(self.bundle, "ray.batched")
        training, length = self.program.training, _max_length(self.task)
        size, _ = group_size(self.group, self.bundle, training, length, self.gpu_share)
        return node, size

    def train(self, client_ids: list[int], global_params: Params, ctx: RoundContext, states: list):
        """Per client: (ClientResult, state), as ``ClientProgram.one`` and ``.group`` return them
        (None from ranks other than 0: their update is rank 0's)."""
        jobs = [self.jobs[c] for c in client_ids]
        if self.group is not None:
            return self.program.group(self.bundle, self.task, jobs, global_params, ctx, states)
        one = self.program.one
        outcomes = [
            one(self.bundle, self.task, j, global_params, ctx, s) for j, s in zip(jobs, states, strict=True)
        ]
        return outcomes if self.rank == 0 else None


@dataclass(eq=False)
class _Gang:
    """The worker processes that train one client at a time together (one, or ``procs_per_client``
    ranks on one node), rank 0 first."""

    actors: list
    node: str = ""
    placement: object = None  # the placement group that keeps the ranks on one node
    refs: list = field(default_factory=list)  # the running call's object refs, rank 0 first


class RaySection(Section):
    """run.engine = "ray": workers on a Ray cluster (local by default)."""

    address: str | None = Field(
        None, description="Ray cluster to join (ray.init(address)); default: start a local one."
    )
    num_workers: int = Field(2, ge=1, description="Long-lived workers, each with one copy of the base model.")
    cpus_per_worker: float = Field(
        1.0, gt=0, description="CPUs reserved per worker (also its torch threads)."
    )
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker (fractions share one GPU).")
    batched: bool = Field(
        False,
        description="Each worker trains its share of the cohort in groups, as the batched engine does "
        "([batched] settings).",
    )
    procs_per_client: int = Field(
        1,
        ge=1,
        description="Processes that train each client together (torch.distributed, gloo; on one node): "
        "each takes a share of every batch. num_workers counts such gangs.",
    )
    fsdp: bool = Field(
        False,
        description="With procs_per_client > 1: shard the frozen base model across a client's "
        "processes (FSDP); each holds 1/N of it.",
    )
    rank_timeout_s: float = Field(
        300.0, gt=0, description="With procs_per_client > 1: seconds a rank waits for the others."
    )

    def layout(self):
        """How each client's training is laid out on processes (``fedfm.systems.ranks.Layout``)."""
        from fedfm.systems.ranks import Layout

        return Layout(self.procs_per_client, self.rank_timeout_s, self.fsdp)


@engine("ray", options=RaySection, section="ray")
class RayEngine:
    """Runs each cohort on ``ray.num_workers`` actors; the same results as ``InProcessEngine``."""

    remote = False
    section = "ray"  # the [ray] section
    shared_base = False  # every worker holds its own base model: a round cannot move "the" base

    @staticmethod
    def trains_in_groups(cfg) -> str | None:
        return "ray.batched" if cfg.ray.batched else None

    @staticmethod
    def check(cfg) -> None:
        """What the Ray engine cannot run (config validation calls this)."""
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise ValueError("run.engine = 'ray' needs Ray: pip install 'fedfm[ray]'")
        if cfg.secagg.enabled:
            raise ValueError("run.engine = 'ray' does not run secure aggregation yet (use 'inprocess')")
        r = cfg.ray
        if r.fsdp and r.procs_per_client < 2:
            raise ValueError(
                "ray.fsdp shards the base across a client's processes: set ray.procs_per_client ≥ 2"
            )
        if r.procs_per_client == 1:
            return
        who = f"ray.procs_per_client = {r.procs_per_client}"
        if r.batched:
            raise ValueError(
                f"{who} trains one client on several processes; ray.batched trains groups of clients in one"
            )
        if r.gpus_per_worker:
            raise ValueError(
                f"{who} trains on CPU (gloo); one GPU per rank (NCCL) is not built: "
                "set ray.gpus_per_worker = 0"
            )
        if cfg.sharing.mode != "none":
            raise ValueError(f"{who}: sharing.mode = {cfg.sharing.mode!r} trains each client in one process")
        from fedfm.systems import ranks

        ranks.check(cfg, r.fsdp)

    def __init__(self, setup: EngineSetup) -> None:
        import ray

        r = setup.options  # the [ray] section
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            if r.address:
                ray.init(address=r.address, log_to_driver=False)
            else:
                cpus = math.ceil(max(r.num_workers * r.procs_per_client * r.cpus_per_worker, 1))
                ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        task_ref, jobs_ref = ray.put(setup.task), ray.put(list(setup.jobs))
        program_ref = ray.put(setup.program)
        actor = ray.remote(num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker)(_Worker)
        threads = max(1, int(r.cpus_per_worker))
        group = setup.group if r.batched else None
        share = r.gpus_per_worker if 0 < r.gpus_per_worker < 1 else 1.0  # workers sharing one GPU
        args = (setup.build_bundle, program_ref, task_ref, jobs_ref, threads, group, share)
        self.layout = r.layout()
        self.workers = [self._gang(actor, args, r) for _ in range(r.num_workers)]
        described = ray.get([g.actors[0].describe.remote() for g in self.workers])
        for gang, (node, _) in zip(self.workers, described, strict=True):
            gang.node = node
        self.size = min(size for _, size in described)
        self.steps = lambda c: setup.program.local_steps(setup.jobs[c])
        self.running: dict[int, _Gang] = {}  # client id → the gang training it now
        self.states = ClientStates()
        if r.batched:
            self.summary = f"{r.num_workers} workers, each training groups of up to {self.size} clients"
        if self.layout.nproc > 1:
            self._join_ranks()
            sharded = ", the frozen base sharded (FSDP)" if self.layout.shard_base else ""
            self.summary = (
                f"{r.num_workers} workers, each training a client on {self.layout.nproc} processes{sharded}"
            )

    def _gang(self, actor, args, r) -> _Gang:
        """One gang of ``procs_per_client`` actors (one actor when 1), ranks on one node."""
        import ray

        if r.procs_per_client == 1:
            return _Gang([actor.remote(*args)])
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = placement_group([{"CPU": r.cpus_per_worker}] * r.procs_per_client, strategy="STRICT_PACK")
        ray.get(group.ready())
        actors = [
            actor.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=group, placement_group_bundle_index=i
                )
            ).remote(*args)
            for i in range(r.procs_per_client)
        ]
        return _Gang(actors, placement=group)

    def _join_ranks(self) -> None:
        """Each gang's ranks form their process group (gloo at rank 0's node)."""
        import ray

        addresses = ray.get([g.actors[0].address.remote() for g in self.workers])
        ray.get(
            [
                a.join.remote(rank, self.layout, address)
                for g, address in zip(self.workers, addresses, strict=True)
                for rank, a in enumerate(g.actors)
            ]
        )

    def _retire(self, gang: _Gang) -> None:
        """Stop a gang's processes and give back its placement."""
        import ray

        for a in gang.actors:
            ray.kill(a)
        if gang.placement is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(gang.placement)

    def _drop_dead_nodes(self) -> list:
        """Forget the workers on nodes Ray no longer lists as alive; the workers left."""
        import ray

        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        self.workers = [w for w in self.workers if w.node in alive]
        return self.workers

    def node_of(self, client_id: int) -> str | None:
        """The Ray node training ``client_id`` right now (None if it is not running)."""
        gang = self.running.get(client_id)
        return None if gang is None else gang.node

    def actors_of(self, client_id: int) -> list:
        """The Ray actors training ``client_id`` right now, rank 0 first (empty if it is not running)."""
        gang = self.running.get(client_id)
        return [] if gang is None else list(gang.actors)

    def run_cohort(
        self, global_params: Params, cohort: Sequence[int], ctx: RoundContext
    ) -> Iterator[ClientResult]:
        import ray

        from fedfm.engines.batched import groups

        params_ref, ctx_ref = ray.put(global_params), ray.put(ctx)
        queue = groups(cohort, self.size, self.steps) if self.size > 1 else [[k] for k in cohort]
        self._drop_dead_nodes()  # an idle worker whose node died since the last round
        idle, running = list(self.workers), {}
        while queue or running:
            if not idle and not running:
                raise RuntimeError("every Ray worker has died; no client of this round can train")
            while queue and idle:
                gang, unit = idle.pop(), queue.pop(0)
                states = [self.states.get(k) for k in unit]
                gang.refs = [a.train.remote(unit, params_ref, ctx_ref, states) for a in gang.actors]
                running[gang.refs[0]] = (gang, unit)
                self.running.update({k: gang for k in unit})
            done, _ = ray.wait(list(running), num_returns=1)
            gang, unit = running.pop(done[0])
            for k in unit:
                self.running.pop(k, None)
            try:
                outcomes = ray.get(done[0])
                ray.get(gang.refs[1:], timeout=self.layout.timeout_s)  # the other ranks end with it
            except Exception as err:  # a worker or its node died: its clients fail, the round goes on
                lost = isinstance(err, ray.exceptions.RayError) and not isinstance(
                    err, ray.exceptions.RayTaskError
                )  # the actor died, or its result went with its node
                if lost or len(gang.actors) > 1:  # a gang's process group is broken after a failure
                    self.workers.remove(gang)  # later rounds run on the others
                    self._retire(gang)
                    idle = [w for w in idle if w in self._drop_dead_nodes()]
                else:
                    idle.append(gang)
                reason = f"Ray worker on node {gang.node} failed: {type(err).__name__}: {err}"
                yield from (ClientResult.failed(k, "train", reason[:2000]) for k in unit)
                continue
            idle.append(gang)
            yield from self.states.delivered(outcomes)

    def state_dict(self) -> dict:
        return self.states.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.states.load_state_dict(state)

    def close(self) -> None:
        import ray

        for gang in self.workers:
            self._retire(gang)
        self.workers = []
        if self.started_ray:
            ray.shutdown()
