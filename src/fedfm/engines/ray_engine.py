"""The Ray engine: cohorts trained by long-lived workers on a Ray cluster (local by default).

Each worker is a Ray actor that builds the frozen base model once, from the run's config, and
then trains many clients in turn with the same ``ClientProgram`` as the in-process engine — never
a model load per client. The tokenized task and the client jobs are put in Ray's object store
once; each call ships only the global trainable state (put once per round), the round context and
that client's state. Client state (SCAFFOLD's control variate, the top-k residual) lives with the
driver, keyed by client, and travels to whichever worker trains the client next, so it follows the
client and is checkpointed like the in-process engine's.

Results are yielded as workers finish, so the server's streaming mean folds them in completion
order; against the in-process engine the global state then differs only by floating-point
summation order (the contract test checks two rounds to 1e-6). On a real cluster every node must
be able to load the model (``model.name``: a registered packaged model, a shared folder or a hub id).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

from fedfm.engines.state import ClientStates
from fedfm.types import ClientFailure, ClientResult, Params, RoundContext


class _Worker:
    """One copy of the base model; trains whichever client it is handed."""

    def __init__(self, cfg_dict: dict, label_names: list[str], task, jobs, threads: int) -> None:
        import torch

        from fedfm.algorithms.objectives import make_objective
        from fedfm.config import RunConfig
        from fedfm.experiment import build_bundle
        from fedfm.training import ClientProgram

        torch.set_num_threads(max(1, threads))
        cfg = RunConfig.model_validate(cfg_dict)
        self.bundle = build_bundle(cfg, label_names)
        self.task, self.jobs = task, jobs
        self.program = ClientProgram(cfg.training, make_objective(cfg.strategy), cfg.compression)

    def train(self, client_id: int, global_params: Params, ctx: RoundContext, state):
        try:
            update, new_state = self.program(
                self.bundle, self.task, self.jobs[client_id], global_params, ctx, state
            )
        except Exception as err:  # one broken client must not stop the round
            return client_id, None, f"{type(err).__name__}: {err}", state
        return client_id, update, None, new_state


class RayEngine:
    """Runs each cohort on ``ray.num_workers`` actors; the same results as ``InProcessEngine``."""

    def __init__(self, bundle, task, clients: Sequence, program, cfg=None) -> None:
        import ray

        if cfg is None:
            raise ValueError("the Ray engine needs the run config to build its workers")
        r = cfg.ray
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            if r.address:
                ray.init(address=r.address, log_to_driver=False)
            else:
                cpus = math.ceil(max(r.num_workers * r.cpus_per_worker, 1))
                ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        labels = _label_names(bundle)  # the classifier's head; a causal LM has none
        task_ref, jobs_ref = ray.put(task), ray.put(list(clients))
        actor = ray.remote(num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker)(_Worker)
        threads = max(1, int(r.cpus_per_worker))
        self.workers = [
            actor.remote(cfg.model_dump(), labels, task_ref, jobs_ref, threads) for _ in range(r.num_workers)
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


def _label_names(bundle) -> list[str]:
    config = getattr(bundle.model, "config", None)
    id2label = getattr(config, "id2label", None) or {}
    return [id2label[i] for i in sorted(id2label)]
