"""The round loop, top to bottom: sample a cohort, run it, validate, aggregate, step, evaluate, save.

for round t:
  cohort  = sample_cohort(seed, t)
  results = engine.run_cohort(θ, cohort, ctx)        # the one seam to execution
  Δ       = aggregator(valid updates, weights)         # streamed: no list of all updates
  θ       = server_optimizer.step(θ, Δ)
  metrics = evaluate(θ); checkpoint(state); callbacks(metrics)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from fedfm.algorithms.aggregators import EmptyCohortError, make_aggregator
from fedfm.algorithms.lora import PRODUCT, aggregate_lora, lora_pairs, truncate_rank
from fedfm.algorithms.objectives import make_objective
from fedfm.algorithms.server_optimizers import make_server_optimizer
from fedfm.attacks import attack_results, plan_round
from fedfm.checkpoint import ServerState, load_checkpoint, save_checkpoint
from fedfm.config import RunConfig
from fedfm.engines import ENGINES
from fedfm.experiment import FederatedData, build_task, client_jobs, prepare_data
from fedfm.models.export import export_adapter
from fedfm.models.merge import merge_into_base, restart_adapters, scaling
from fedfm.models.state import get_trainable_state, set_trainable_state
from fedfm.reporting import outputs
from fedfm.reporting.console import ConsoleReporter
from fedfm.reporting.metrics import MetricsLog
from fedfm.sampling import cohort_size, sample_cohort
from fedfm.tasks.metrics import summarize_clients
from fedfm.training import ClientProgram
from fedfm.transforms.compression import decode, serialized_nbytes
from fedfm.transforms.validation import update_problem
from fedfm.types import ClientResult, Params, RoundContext, Update

Callback = Callable[[dict], None]


@dataclass(frozen=True)
class RunResult:
    """What a finished run gives back: its folder, one record per round, and the last metrics."""

    run_dir: Path
    history: list[dict]
    final_metrics: dict
    config: RunConfig = field(repr=False)


@dataclass
class _RoundTally:
    """Side results of consuming a cohort: accepted clients, rejections, losses, control deltas."""

    accepted: list[int] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    client_records: list[dict] = field(default_factory=list)
    loss_sum: float = 0.0
    examples: int = 0
    control_sum: Params | None = None
    bytes_up: int = 0

    def decoded(
        self,
        results: Iterable[ClientResult],
        decode_delta: Callable[[int, Params], Params],
        on_client: Callable,
    ) -> Iterator[ClientResult]:
        """Server halves of the transforms: count the bytes received, decode; undecodable → rejected."""
        for result in results:
            on_client()
            if result.failure is not None:
                self.failed.append(result.failure.as_dict())
                continue
            self.bytes_up += upload_nbytes(result.update)
            try:
                delta = decode_delta(result.client_id, result.update.delta)
            except Exception as err:  # a malformed payload is rejected, never raised
                reason = f"undecodable payload ({type(err).__name__}: {err})"
                self.rejected.append({"client": result.client_id, "reason": reason})
                continue
            yield replace(result, update=replace(result.update, delta=delta))

    def valid_updates(
        self, results: Iterable[ClientResult], check: Callable[[int, Update], str | None], uniform: bool
    ) -> Iterator[tuple[Params, float]]:
        for result in results:
            update = result.update
            problem = check(result.client_id, update)
            if problem is not None:
                self.rejected.append({"client": result.client_id, "reason": problem})
                continue
            self.accepted.append(result.client_id)
            loss = float(update.metrics.get("train_loss", float("nan")))
            self.loss_sum += loss * update.num_examples
            self.examples += update.num_examples
            self.client_records.append(
                {"client": result.client_id, "num_examples": update.num_examples, **update.metrics}
            )
            if update.control_delta is not None:
                if self.control_sum is None:
                    self.control_sum = {k: torch.zeros_like(v) for k, v in update.control_delta.items()}
                for k, v in update.control_delta.items():
                    self.control_sum[k] += v
            yield update.delta, 1.0 if uniform else float(update.num_examples)


class Run:
    """One experiment in one run folder; ``execute()`` runs the remaining rounds."""

    def __init__(self, cfg: RunConfig, run_dir: Path, *, progress: bool = True, callbacks=()) -> None:
        self.started = time.perf_counter()
        self.cfg = cfg
        self.run_dir = run_dir
        self.callbacks = list(callbacks)
        self.console = ConsoleReporter(enabled=progress)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.console.note(f"run folder: {run_dir}")
        with self.console.status("loading data and model"):
            self.data: FederatedData = prepare_data(cfg)
            self.bundle, self.task = build_task(cfg, self.data)
        outputs.write_partition(run_dir, self.data.partition_summary(cfg.partition.method))
        self.objective = make_objective(cfg.strategy)
        self.server_optimizer = make_server_optimizer(cfg.strategy)
        self.aggregate = choose_aggregation(cfg)
        program = ClientProgram(cfg.training, self.objective, cfg.compression)
        self.jobs = client_jobs(self.data, cfg.peft)
        self.engine = ENGINES.get(cfg.run.engine)(self.bundle, self.task, self.jobs, program)
        self.cohort = cohort_size(
            self.data.num_clients, cfg.sampling.clients_per_round, cfg.sampling.fraction
        )
        self.max_examples = cfg.validation.max_num_examples or len(self.data.train)
        self.metrics = MetricsLog(run_dir / "metrics.jsonl")
        self.elapsed_offset = 0.0
        self.state = self._initial_state()
        self.console.describe(cfg, self.data, self.bundle, self.cohort)

    def _initial_state(self) -> ServerState:
        saved = load_checkpoint(self.run_dir / "checkpoint")
        if saved is None:
            self.metrics.reset()
            params = get_trainable_state(self.bundle.trainable)
            return ServerState(
                round=0,
                params=params,
                optimizer_state=self.server_optimizer.init(params),
                server_control=self.objective.server_init(params),
            )
        self.metrics.truncate_after(saved.round)
        self.engine.load_state_dict(saved.engine_state)
        merge_into_base(self.bundle.model, saved.merged)  # stack mode: the base weights moved too
        self.console.note(f"resuming after round {saved.round}")
        self.elapsed_offset = saved.elapsed_s
        return saved

    def elapsed(self) -> float:
        return self.elapsed_offset + time.perf_counter() - self.started

    def execute(self) -> RunResult:
        cfg = self.cfg
        if self.state.round == 0 and cfg.eval.at_start and not self.metrics.has_round(0):
            record = {
                "round": 0,
                "num_clients": 0,
                "train_loss": None,
                **self.evaluate(self.state.params),
            }
            self._finish_round(record)
        with self.console.rounds(cfg.run.rounds, self.state.round) as bar:
            for t in range(self.state.round + 1, cfg.run.rounds + 1):
                record = self.run_round(t, bar)
                self._finish_round(record)
                self.state.engine_state = self.engine.state_dict()
                self.state.elapsed_s = self.elapsed()
                save_checkpoint(self.run_dir / "checkpoint", self.state)
        return self._finish()

    def run_round(self, t: int, bar) -> dict:
        cfg, state = self.cfg, self.state
        round_start = time.perf_counter()
        cohort = sample_cohort(self.data.num_clients, self.cohort, cfg.run.seed, t)
        plan = plan_round(cfg.attack, cohort, cfg.run.seed, t)
        ctx = RoundContext(round=t, seed=cfg.run.seed, server_control=state.server_control, attack=plan)
        tally = _RoundTally()
        results = self.engine.run_cohort(state.params, cohort, ctx)
        results = tally.decoded(results, self.decode_delta, bar.start_round(t, len(cohort)))
        results = attack_results(results, plan, len(cohort), cfg.run.seed, t)
        updates = tally.valid_updates(results, self.check_update, cfg.strategy.weighting == "uniform")
        skipped = None
        try:
            aggregate = self.aggregate(updates, state.params)
        except EmptyCohortError as err:
            aggregate, skipped = None, str(err)
        for _ in updates:  # drain, so every client is tallied even if the aggregator stops early
            pass
        if aggregate is not None and len(tally.accepted) < cfg.sampling.min_clients:
            skipped = (
                f"only {len(tally.accepted)} of {len(cohort)} clients delivered a valid update "
                f"(sampling.min_clients = {cfg.sampling.min_clients}); round skipped, state unchanged"
            )
        stacked_bytes = 0
        if skipped is None:
            if cfg.strategy.lora_aggregation == "stack":
                aggregate, stacked_bytes = self.fold_into_base(aggregate, t, len(tally.accepted))
            state.params, state.optimizer_state = self.server_optimizer.step(
                state.params, aggregate, state.optimizer_state
            )
            if tally.control_sum is not None:
                mean_control = {k: v / len(tally.accepted) for k, v in tally.control_sum.items()}
                state.server_control = self.objective.server_update(
                    state.server_control, mean_control, len(tally.accepted), self.data.num_clients
                )
        state.round = t
        for rec in tally.client_records:
            self.metrics.write({"event": "client", "round": t, **rec})
        record = {
            "round": t,
            "num_clients": len(tally.accepted),
            "cohort": cohort,
            "train_loss": tally.loss_sum / tally.examples if tally.examples else None,
            "failed": tally.failed,
            "rejected": tally.rejected,
            "round_s": time.perf_counter() - round_start,
            **self.count_bytes(cohort, tally.bytes_up, ctx, stacked_bytes),
        }
        if plan is not None:
            record["malicious"] = sorted(plan.malicious)
        if skipped:
            record["skipped"] = skipped
            self.console.warn(f"round {t}: {skipped}")
        for f in tally.failed:
            self.console.warn(f"round {t}: client {f['client']} failed at {f['stage']}: {f['reason']}")
        for r in tally.rejected:
            self.console.warn(f"round {t}: update of client {r['client']} rejected: {r['reason']}")
        if t % cfg.eval.every == 0 or t == cfg.run.rounds:
            record.update(self.evaluate(state.params))
        return record

    def count_bytes(
        self, cohort: list[int], bytes_up: int, ctx: RoundContext, stacked_bytes: int = 0
    ) -> dict:
        """This round's and the run's bytes, next to what full fine-tuning would move.

        Down, per cohort member: θ at its rank, SCAFFOLD's c, and in stack mode the stacked factors.
        """
        control = serialized_nbytes(ctx.server_control or {})
        by_rank: dict[int | None, int] = {}
        for c in cohort:
            rank = self.jobs[c].rank
            if rank not in by_rank:
                by_rank[rank] = serialized_nbytes(self.reference(c))
        down = sum(by_rank[self.jobs[c].rank] + control + stacked_bytes for c in cohort)
        comm = self.state.comm
        comm["bytes_up_total"] = comm.get("bytes_up_total", 0) + bytes_up
        comm["bytes_down_total"] = comm.get("bytes_down_total", 0) + down
        return {
            "bytes_up": bytes_up,
            "bytes_down": down,
            **comm,
            "full_finetune_bytes": 2 * len(cohort) * 4 * self.bundle.num_total(),
        }

    def fold_into_base(self, aggregate: Params, t: int, senders: int) -> tuple[Params, int]:
        """FLoRA round end: merge s·mean(B·A) into the base weights, restart the adapters.

        Returns the delta that takes θ to (fresh LoRA, averaged other tensors), and the bytes of the
        stacked factors each client downloads to merge the same (senders × r × (in + out) float32
        values per module), counted in this round.
        """
        model = self.bundle.model
        products = {k.removesuffix(PRODUCT): v for k, v in aggregate.items() if k.endswith(PRODUCT)}
        increments = {p: scaling(model, p) * m for p, m in products.items()}
        merge_into_base(model, increments)
        for p, inc in increments.items():
            self.state.merged[p] = self.state.merged.get(p, 0) + inc
        restart_adapters(model, products, self.cfg.run.seed, t)
        fresh = get_trainable_state(self.bundle.trainable)
        delta = {k: v for k, v in aggregate.items() if not k.endswith(PRODUCT)}
        for a_key, b_key in lora_pairs(self.state.params).values():
            for key in (a_key, b_key):
                delta[key] = fresh[key] - self.state.params[key]
        stacked_values = sum(senders * self.cfg.peft.r * sum(m.shape) for m in products.values())
        return delta, 4 * stacked_values

    def reference(self, client_id: int) -> Params:
        """The global state as this client holds it (its own LoRA rank, when ranks differ)."""
        rank = self.jobs[client_id].rank
        return self.state.params if rank is None else truncate_rank(self.state.params, rank)

    def decode_delta(self, client_id: int, payload: Params) -> Params:
        return decode(payload, self.cfg.compression, self.reference(client_id))

    def check_update(self, client_id: int, update: Update) -> str | None:
        return update_problem(
            update, self.reference(client_id), self.cfg.validation.max_update_norm, self.max_examples
        )

    def evaluate(self, params: Params) -> dict:
        cfg, task = self.cfg, self.task
        set_trainable_state(self.bundle.trainable, params)
        with self.console.status("evaluating"):
            m = task.evaluate(self.bundle.model, task.test, None, cfg.eval.batch_size, self.bundle.device)
            record = {
                "test_accuracy": m["accuracy"],
                "test_macro_f1": m["macro_f1"],
                "test_loss": m["loss"],
            }
            if cfg.eval.local:
                accs = [
                    task.evaluate(
                        self.bundle.model, task.train, rows, cfg.eval.batch_size, self.bundle.device
                    )["accuracy"]
                    for rows in self.data.client_test
                    if len(rows)
                ]
                record.update(summarize_clients(accs))
            if cfg.attack.kind == "backdoor":
                record["attack_success_rate"] = task.attack_success_rate(
                    self.bundle.model, cfg.attack.target_label, cfg.eval.batch_size, self.bundle.device
                )
        return record

    def _finish_round(self, record: dict) -> None:
        record = {"event": "round", **record, "elapsed_s": self.elapsed()}
        self.metrics.write(record)
        self.console.round_row(record)
        for callback in self.callbacks:
            callback(record)

    def _finish(self) -> RunResult:
        history = self.metrics.rounds()
        with self.console.status("writing adapter, plots and report"):
            merged = self.cfg.strategy.lora_aggregation == "stack"
            export_adapter(self.bundle, self.state.params, self.run_dir / "adapter", merged=merged)
            outputs.write_outputs(self.run_dir)
        final = next((r for r in reversed(history) if "test_accuracy" in r), history[-1] if history else {})
        self.console.summary(history, self.run_dir)
        return RunResult(self.run_dir, history, final, self.cfg)


def choose_aggregation(cfg: RunConfig) -> Callable[[Iterable[tuple[Params, float]], Params], Params]:
    """(updates, θ) → aggregate delta: LoRA-aware when configured, else the named aggregator."""
    if cfg.strategy.lora_aggregation != "naive" or cfg.peft.rank_tiers:
        mode, rank = cfg.strategy.lora_aggregation, cfg.peft.r
        return lambda updates, params: aggregate_lora(updates, params, mode, rank)
    aggregator = make_aggregator(cfg.strategy)
    return lambda updates, params: aggregator(updates)


def upload_nbytes(update: Update) -> int:
    return serialized_nbytes(update.delta) + serialized_nbytes(update.control_delta or {})
