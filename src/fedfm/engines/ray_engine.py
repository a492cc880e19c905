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
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

from fedfm.engines.base import EngineSetup, engine
from fedfm.engines.state import ClientStates
from fedfm.types import ClientFailure, ClientResult, Params, RoundContext


class _Worker:
    """One copy of the base model; trains whichever client it is handed."""

    def __init__(self, build_bundle, program, task, jobs, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.bundle = build_bundle()
        self.task, self.jobs, self.program = task, jobs, program

    def train(self, client_id: int, global_params: Params, ctx: RoundContext, state):
        try:
            update, new_state = self.program(
                self.bundle, self.task, self.jobs[client_id], global_params, ctx, state
            )
        except Exception as err:  # one broken client must not stop the round
            return client_id, None, f"{type(err).__name__}: {err}", state
        return client_id, update, None, new_state


@engine("ray")
class RayEngine:
    """Runs each cohort on ``ray.num_workers`` actors; the same results as ``InProcessEngine``."""

    remote = False
    shared_base = False  # every worker holds its own base model: a round cannot move "the" base

    @staticmethod
    def check(cfg) -> None:
        """What the Ray engine cannot run (config validation calls this)."""
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise ValueError("run.engine = 'ray' needs Ray: pip install 'fedfm[ray]'")
        if cfg.secagg.enabled:
            raise ValueError("run.engine = 'ray' does not run secure aggregation yet (use 'inprocess')")

    def __init__(self, setup: EngineSetup) -> None:
        import ray

        r = setup.options  # the [ray] section
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            if r.address:
                ray.init(address=r.address, log_to_driver=False)
            else:
                cpus = math.ceil(max(r.num_workers * r.cpus_per_worker, 1))
                ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        task_ref, jobs_ref = ray.put(setup.task), ray.put(list(setup.jobs))
        program_ref = ray.put(setup.program)
        actor = ray.remote(num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker)(_Worker)
        threads = max(1, int(r.cpus_per_worker))
        self.workers = [
            actor.remote(setup.build_bundle, program_ref, task_ref, jobs_ref, threads)
            for _ in range(r.num_workers)
        ]
        self.states = ClientStates()

    def run_cohort(
        self, global_params: Params, cohort: Sequence[int], ctx: RoundContext
    ) -> Iterator[ClientResult]:
        import ray

        params_ref, ctx_ref = ray.put(global_params), ray.put(ctx)
        queue, idle, running = list(cohort), list(self.workers), {}
        while queue or running:
            while queue and idle:
                worker, k = idle.pop(), queue.pop(0)
                ref = worker.train.remote(k, params_ref, ctx_ref, self.states.get(k))
                running[ref] = (worker, k)
            done, _ = ray.wait(list(running), num_returns=1)
            worker, k = running.pop(done[0])
            idle.append(worker)
            try:
                client_id, update, failure, state = ray.get(done[0])
            except Exception as err:  # a worker that died: the client fails, the round goes on
                yield ClientResult(k, failure=ClientFailure(k, "train", f"Ray worker failed: {err}"))
                continue
            if failure is not None:
                yield ClientResult(client_id, failure=ClientFailure(client_id, "train", failure))
                continue
            self.states.keep(client_id, state)
            yield ClientResult(client_id, update=update)

    def state_dict(self) -> dict:
        return self.states.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.states.load_state_dict(state)

    def close(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w)
        self.workers = []
        if self.started_ray:
            ray.shutdown()
