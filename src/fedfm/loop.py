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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedfm.algorithms.aggregators import EmptyCohortError, make_aggregator
from fedfm.algorithms.lora import PRODUCT, aggregate_lora, lora_pairs, truncate_rank
from fedfm.algorithms.objectives import make_objective
from fedfm.algorithms.server_optimizers import make_server_optimizer
from fedfm.attacks import attack_results, plan_round
from fedfm.checkpoint import CheckpointError, ClientStore, ServerState, load_checkpoint, save_checkpoint
from fedfm.config import RunConfig
from fedfm.engines import ENGINES
from fedfm.experiment import FederatedData, build_task, client_jobs, prepare_data, server_only_data
from fedfm.models.export import export_adapter
from fedfm.models.merge import merge_into_base, restart_adapters, scaling
from fedfm.models.state import get_trainable_state, set_trainable_state
from fedfm.privacy import packing
from fedfm.reporting import outputs
from fedfm.reporting.console import ConsoleReporter
from fedfm.reporting.metrics import MetricsLog, remove_stale_temporaries
from fedfm.sampling import cohort_size, poisson_cohort, sample_cohort
from fedfm.seeding import derive_seed, numpy_rng
from fedfm.tally import RoundTally
from fedfm.tasks.metrics import summarize_clients
from fedfm.training import ClientProgram
from fedfm.transforms.compression import decode, serialized_nbytes
from fedfm.transforms.validation import update_problem
from fedfm.types import Params, RoundContext, Update

if TYPE_CHECKING:  # the privacy extra is imported only by runs that use it
    from fedfm.privacy.secure_round import SecureRound

Callback = Callable[[dict], None]


@dataclass(frozen=True)
class RunResult:
    """What a finished run gives back: its folder, one record per round, and the last metrics."""

    run_dir: Path
    history: list[dict]
    final_metrics: dict
    config: RunConfig = field(repr=False)
    stopped: str | None = None  # why the run ended before its last round (privacy budget)
    num_trainable: int | None = None  # values that train (and travel) per client


class Run:
    """One experiment in one run folder; ``execute()`` runs the remaining rounds."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        *,
        progress: bool = True,
        callbacks=(),
        engine_factory=None,
        resume: bool = False,
    ) -> None:
        """``engine_factory`` replaces the configured engine with one whose clients hold their own data
        (a deployment: the server loads only its test split). ``resume``: the folder must hold a
        checkpoint (a missing or damaged one is an error, never a silent restart)."""
        self.started = time.perf_counter()
        self.resume = resume
        self.cfg = cfg
        self.run_dir = run_dir
        self.callbacks = list(callbacks)
        self.console = ConsoleReporter(enabled=progress)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.console.note(f"run folder: {run_dir}")
        with self.console.status("loading data and model"):
            self.data: FederatedData = server_only_data(cfg) if engine_factory else prepare_data(cfg)
            self.bundle, self.task = build_task(cfg, self.data)
        self.initial_params = get_trainable_state(self.bundle.trainable)  # the baselines start here
        outputs.write_partition(run_dir, self.data.partition_summary(cfg.partition.method))
        self.objective = make_objective(cfg.strategy)
        self.server_optimizer = make_server_optimizer(cfg.strategy)
        self.aggregate = choose_aggregation(cfg)
        program = ClientProgram(cfg.training, self.objective, cfg.compression)
        self.jobs = client_jobs(self.data, cfg.peft)
        make_engine = engine_factory or ENGINES.get(cfg.run.engine)
        self.engine = make_engine(self.bundle, self.task, self.jobs, program, cfg=cfg)
        self.cohort = cohort_size(
            self.data.num_clients, cfg.sampling.clients_per_round, cfg.sampling.fraction
        )
        remote_limit = 2**31 - 1  # remote clients' data sizes are theirs to know
        self.max_examples = cfg.validation.max_num_examples or (
            remote_limit if engine_factory else len(self.data.train)
        )
        self.privacy = None  # fedfm.privacy.server.RunPrivacy in DP runs
        if cfg.privacy.dp != "none":
            from fedfm.privacy.server import SEEDED_WARNING, RunPrivacy

            dim = sum(v.numel() for v in self.initial_params.values())
            n, folder, note = self.data.num_clients, run_dir / "checkpoint", self.console.note
            self.privacy = RunPrivacy(cfg, n, self.cohort, dim, folder, note=note)
            if self.privacy.noise.reproducible:
                self.console.warn(SEEDED_WARNING)
        self.current_round = 0
        self.metrics = MetricsLog(run_dir / "metrics.jsonl")
        self.elapsed_offset = 0.0
        self.state = self._initial_state()
        if cfg.synthetic.mode in ("warmup", "both") and self.state.round == 0:
            from fedfm.synthetic.mix import server_warmup

            with self.console.status(f"warm-up: {cfg.synthetic.warmup_steps} server steps on synthetic data"):
                loss = server_warmup(self)
            steps, num = cfg.synthetic.warmup_steps, len(self.data.synthetic_rows)
            self.metrics.write({"event": "warmup", "steps": steps, "train_loss": loss, "num_synthetic": num})
            self.console.note(f"warm-up on {num} synthetic examples: {steps} steps, mean loss {loss:.3f}")
        self.prompts = []
        if cfg.task.kind == "instruction":
            from fedfm.tasks.instruction import eval_prompts

            self.prompts = eval_prompts(cfg, self.data.test, numpy_rng(cfg.run.seed, "eval-prompts"))
        self.console.describe(cfg, self.data, self.bundle, self.cohort, getattr(self.task, "truncated", None))

    def _initial_state(self) -> ServerState:
        folder = self.run_dir / "checkpoint"
        for stale in [*remove_stale_temporaries(self.run_dir), *remove_stale_temporaries(folder)]:
            self.console.note(f"removed {stale.name}, left by an earlier crash")
        states = getattr(self.engine, "states", None)
        if states is not None:
            states.attach(ClientStore(folder))
        saved = load_checkpoint(folder)
        finished = [r["round"] for r in self.metrics.rounds() if r.get("round", 0) > 0]
        if saved is None and self.resume and finished:
            raise CheckpointError(
                f"cannot resume {self.run_dir}: metrics.jsonl records round {max(finished)} but {folder} "
                "holds no checkpoint (deleted?); nothing was changed. Start a new run in another folder"
            )
        if saved is None:  # a new run, or one that never finished its first round
            self.metrics.reset()
            params = get_trainable_state(self.bundle.trainable)
            state = ServerState(
                round=0,
                params=params,
                optimizer_state=self.server_optimizer.init(params),
                server_control=self.objective.server_init(params),
                privacy=self.privacy.initial_state() if self.privacy else {},
            )
            if (
                self.privacy is not None and self.resume
            ):  # a release before the first checkpoint stays charged
                self.privacy.resume(state.privacy, 0, not getattr(self.engine, "remote", False))
            return state
        self.metrics.truncate_after(saved.round)
        if self.privacy is not None:
            repeatable = not getattr(
                self.engine, "remote", False
            )  # remote clients' updates differ on a rerun
            for charge in self.privacy.resume(saved.privacy, saved.round, repeatable):
                self.console.warn(
                    f"round {charge['round']} released a noisy result before the crash; it stays "
                    "charged, and its rerun with fresh noise is charged again"
                )
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
                **self.privacy_record(),
            }
            self._finish_round(record)
        stopped = None
        with self.console.rounds(cfg.run.rounds, self.state.round) as bar:
            for t in range(self.state.round + 1, cfg.run.rounds + 1):
                stopped = self.privacy.budget_problem(self.state.privacy, t) if self.privacy else None
                if stopped:
                    self.console.warn(stopped)
                    self.metrics.write({"event": "stopped", "round": t - 1, "reason": stopped})
                    break
                record = self.run_round(t, bar)
                self._finish_round(record)
                self.state.engine_state = self.engine.state_dict()
                self.state.elapsed_s = self.elapsed()
                states = getattr(self.engine, "states", None)  # per-client state: only what changed
                changed = states.take_changed() if states is not None else {}
                save_checkpoint(self.run_dir / "checkpoint", self.state, changed)
                if states is not None:
                    states.committed()
                if self.privacy is not None:
                    self.privacy.checkpointed()
        return self._finish(stopped)

    def sample(self, t: int) -> list[int]:
        n, seed = self.data.num_clients, self.cfg.run.seed
        rng = self.privacy.cohort_rng(t) if self.privacy is not None else None  # DP: unpredictable
        if self.cfg.sampling.method == "poisson":
            return poisson_cohort(n, self.cohort / n, seed, t, rng)
        return sample_cohort(n, self.cohort, seed, t, rng)

    def run_round(self, t: int, bar) -> dict:
        cfg, state = self.cfg, self.state
        round_start = time.perf_counter()
        self.current_round = t
        cohort = self.sample(t)
        plan = plan_round(cfg.attack, cohort, cfg.run.seed, t)
        secure = None
        if cfg.secagg.enabled:
            secure = self.start_secure(cohort, t)
        ctx = RoundContext(
            round=t,
            seed=cfg.run.seed,
            server_control=state.server_control,
            attack=plan,
            dp=self.privacy.client_settings(state.privacy) if self.privacy else None,
            secure=secure,
            noise=self.privacy.noise if self.privacy else None,
        )
        tally = RoundTally()
        on_client = bar.start_round(t, len(cohort))
        try:
            aggregate, new_privacy, skipped = self.aggregate_round(t, cohort, ctx, tally, on_client)
        except Exception as err:  # a deployment survives whatever one client's messages do
            if not getattr(self.engine, "remote", False):
                raise
            aggregate, new_privacy = None, None
            skipped = f"the round failed ({type(err).__name__}: {err}); round skipped, state unchanged"
        if aggregate is not None and len(tally.accepted) < cfg.sampling.min_clients:
            skipped = (
                f"only {len(tally.accepted)} of {len(cohort)} clients delivered a valid update "
                f"(sampling.min_clients = {cfg.sampling.min_clients}); round skipped, state unchanged"
            )
        stacked_bytes = 0
        if self.privacy is not None:  # a skipped round is charged too (its counts were seen)
            if skipped is None and new_privacy is not None:
                state.privacy = new_privacy
            elif skipped is not None:
                skellam = secure.layout.skellam if secure is not None else None
                if skellam is None or tally.unmasked:  # distributed noise: only a recovered sum is a release
                    self.privacy.charge_skipped(
                        state.privacy, t, tally.unmasked or len(tally.accepted), skellam
                    )
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
            self.metrics.write({**rec, "event": "client", "round": t})
        record = {
            "round": t,
            "num_clients": len(tally.accepted),
            "cohort": cohort,
            "train_loss": tally.loss_sum / tally.examples if tally.examples else None,
            "failed": tally.failed,
            "rejected": tally.rejected,
            "round_s": time.perf_counter() - round_start,
            **self.count_bytes(cohort, tally.bytes_up, ctx, stacked_bytes, secure),
        }
        record.update(self.privacy_record())
        if secure is not None:
            record["secagg"] = secure.report()
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

    def aggregate_round(self, t: int, cohort: list[int], ctx: RoundContext, tally: RoundTally, on_client):
        """Run the cohort and reach the aggregate → (aggregate, new privacy state, why skipped)."""
        results = self.engine.run_cohort(self.state.params, cohort, ctx)
        secure = ctx.secure
        if secure is None:
            return self.plain_aggregate(results, tally, on_client, ctx.attack, cohort, t)
        from fedfm.privacy.secure_round import secure_aggregate

        before = self.before_unmask(t, secure)
        sums, skipped = secure_aggregate(results, secure, tally, on_client, self.check_clear, before)
        if sums is None:
            return None, None, skipped
        aggregate, new_privacy = self.mean_of_sums(sums, len(tally.accepted), t, secure)
        return aggregate, new_privacy, None

    def privacy_record(self) -> dict:
        return self.privacy.record(self.state.privacy) if self.privacy is not None else {}

    def plain_aggregate(self, results, tally: RoundTally, on_client, plan, cohort: list[int], t: int):
        """Decode → attack (simulated) → validate → aggregate, streamed. → (aggregate, privacy, skip)."""
        cfg = self.cfg
        results = tally.decoded(results, self.decode_delta, on_client)
        results = attack_results(results, plan, len(cohort), cfg.run.seed, t)
        updates = tally.valid_updates(results, self.check_update, cfg.strategy.weighting == "uniform")
        aggregate, new_privacy, skipped = None, None, None
        try:
            if self.privacy is None or self.privacy.plan is None:
                aggregate = self.aggregate(updates, self.state.params)
            else:  # central DP: the server clips every update and computes its clipped bit itself
                deltas = (delta for delta, _ in updates)
                aggregate, new_privacy = self.privacy.aggregate_updates(self.state.privacy, t, deltas)
                if aggregate is None:
                    raise EmptyCohortError("no updates to aggregate")
        except EmptyCohortError as err:
            skipped = str(err)
        for _ in updates:  # drain, so every client is tallied even if the aggregator stops early
            pass
        return aggregate, new_privacy, skipped

    def mean_of_sums(self, sums, contributors: int, t: int, secure) -> tuple[Params, dict | None]:
        """From unmasked sums to the aggregate: DP's noised fixed-denominator mean, else Σ w·Δ / Σ w.
        ``contributors`` is how many clients the server saw deliver (never a client-reported count)."""
        if self.privacy is None or self.privacy.plan is None:
            return {k: v / sums.scalars["weight"] for k, v in sums.delta.items()}, None
        skellam, count = secure.layout.skellam, sums.scalars["unclipped"]
        return self.privacy.aggregate_sums(self.state.privacy, t, sums.delta, count, contributors, skellam)

    def before_unmask(self, t: int, secure):
        """The write-ahead charge of a distributed-noise round, run just before its sum is unmasked."""
        if self.privacy is None or self.privacy.plan is None or secure.layout.skellam is None:
            return None
        return lambda survivors: self.privacy.before_release(
            self.state.privacy, t, survivors, secure.layout.skellam
        )

    def start_secure(self, cohort: list[int], t: int) -> SecureRound:
        from fedfm.privacy.secure_round import SecureRound

        uniform = self.cfg.strategy.weighting == "uniform"
        skellam = None
        if self.privacy is not None:
            rotation = derive_seed(self.cfg.run.seed, t, "rotation")  # public, like the graph
            skellam = self.privacy.skellam_round(self.state.privacy, max(1, len(cohort)), rotation)
        layout = packing.Layout.for_params(
            self.state.params,
            self.state.server_control is not None,
            clip_range=self.cfg.secagg.clip_range,
            quantization_bits=self.cfg.secagg.quantization_bits,
            max_weight=1 if uniform else self.max_examples,
            max_clients=max(1, len(cohort)),
            skellam=skellam,
        )
        graph_seed = derive_seed(self.cfg.run.seed, t, "graph")
        if hasattr(self.engine, "start_secure"):  # clients in other processes (gRPC)
            return self.engine.start_secure(cohort, layout, self.cfg.secagg, graph_seed, t)
        return SecureRound.start(cohort, layout, self.cfg.secagg, graph_seed, t)

    def count_bytes(
        self,
        cohort: list[int],
        bytes_up: int,
        ctx: RoundContext,
        stacked_bytes: int = 0,
        secure: SecureRound | None = None,
    ) -> dict:
        """This round's and the run's bytes, next to what full fine-tuning would move.

        Down, per cohort member: θ at its rank, SCAFFOLD's c, and in stack mode the stacked factors;
        under secure aggregation, every protocol message in both directions.
        """
        control = serialized_nbytes(ctx.server_control or {})
        by_rank: dict[int | None, int] = {}
        for c in cohort:
            rank = self.jobs[c].rank
            if rank not in by_rank:
                by_rank[rank] = serialized_nbytes(self.reference(c))
        down = sum(by_rank[self.jobs[c].rank] + control + stacked_bytes for c in cohort)
        if secure is not None:
            bytes_up, down = secure.bytes_up, down + secure.bytes_down
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
        if self.privacy is not None and self.privacy.example is not None:
            problem = self.check_clear(client_id, update.metrics, update.num_examples)
            if problem is not None:
                return problem
        return update_problem(
            update, self.reference(client_id), self.cfg.validation.max_update_norm, self.max_examples
        )

    def check_clear(self, client_id: int, metrics, num_examples: int | None = None) -> str | None:
        """DP-SGD: the mechanism a client states it ran must be the configured one; a matching
        statement is charged to that client in the server's own accountant (a release happened)."""
        if self.privacy is None or self.privacy.example is None:
            return None
        if num_examples is not None and (not isinstance(num_examples, int) or num_examples <= 0):
            return None  # update_problem names that
        problem = self.privacy.example_problem(metrics, num_examples, self.cfg.training)
        if problem is None:
            self.privacy.charge_example(self.state.privacy, self.current_round, client_id, metrics)
        return problem

    def evaluate(self, params: Params) -> dict:
        cfg, task = self.cfg, self.task
        set_trainable_state(self.bundle.trainable, params)
        if cfg.task.kind == "instruction":
            from fedfm.tasks.instruction import server_metrics

            with self.console.status("evaluating: held-out perplexity and greedy answers"):
                return server_metrics(task, self.bundle, cfg, self.prompts)
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

    def _finish(self, stopped: str | None = None) -> RunResult:
        history = self.metrics.rounds()
        if self.cfg.task.baselines:
            from fedfm.baselines import run_baselines, write_baselines

            with self.console.status("training the local-only and centralized baselines"):
                baselines = run_baselines(self, self.state.params, self.console.note)
            write_baselines(self.run_dir, baselines)
        with self.console.status("writing adapter, plots and report"):
            merged = self.cfg.strategy.lora_aggregation == "stack"
            export_adapter(self.bundle, self.state.params, self.run_dir / "adapter", merged=merged)
            outputs.write_outputs(self.run_dir)
        if hasattr(self.engine, "close"):  # e.g. Ray workers
            self.engine.close()
        final = next((r for r in reversed(history) if "test_accuracy" in r), history[-1] if history else {})
        self.console.summary(history, self.run_dir)
        result = RunResult(
            self.run_dir, history, final, self.cfg, stopped, num_trainable=self.bundle.num_trainable()
        )
        trained = [r for r in history if r.get("round", 0) > 0]
        if trained and not any(r.get("num_clients") for r in trained):
            raise RunFailedError(
                f"no client delivered a usable update in any of {len(trained)} rounds (see 'failed' and "
                f"'rejected' in {self.run_dir / 'metrics.jsonl'}); the model is the initial one",
                result,
            )
        return result


class RunFailedError(RuntimeError):
    """Every client failed in every round: the run produced nothing. ``result`` has its records."""

    def __init__(self, message: str, result: RunResult) -> None:
        super().__init__(message)
        self.result = result


def choose_aggregation(cfg: RunConfig) -> Callable[[Iterable[tuple[Params, float]], Params], Params]:
    """(updates, θ) → aggregate delta: LoRA-aware when configured, else the named aggregator."""
    if cfg.strategy.lora_aggregation != "naive" or cfg.peft.rank_tiers:
        mode, rank = cfg.strategy.lora_aggregation, cfg.peft.r
        return lambda updates, params: aggregate_lora(updates, params, mode, rank)
    aggregator = make_aggregator(cfg.strategy)
    return lambda updates, params: aggregator(updates)
