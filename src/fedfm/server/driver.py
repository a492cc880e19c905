"""The driver around the round: set-up, cadence, checkpoints, evaluation, callbacks, the end.

for round t:
  cohort  = sample(seed, t)                              # unpredictable under DP
  ctx     = round_context(rnd, pipeline)                  # transforms' prepare: DP, secure, attack
  results = engine.run_cohort(θ, cohort, ctx)             # the one seam to execution
  state, record = apply_round(state, results, rnd, strategy)   # fedfm.server.round
  evaluate (every eval.every rounds); checkpoint(state); callbacks(record)
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from fedfm.algorithms.aggregators import make_aggregator
from fedfm.algorithms.clusters import stack_clusters
from fedfm.algorithms.lora import LORA_AGGREGATION, aggregation_rule, truncate_rank
from fedfm.algorithms.personal import personalizes
from fedfm.algorithms.sampling import cohort_size, poisson_cohort, sample_cohort
from fedfm.algorithms.server_optimizers import make_server_optimizer
from fedfm.client.program import ClientProgram, check_optimizer_device, round_lr
from fedfm.config import RunConfig
from fedfm.data.sources import DataNote, DataWarning
from fedfm.data.synthetic import synthetic_mode
from fedfm.engines import ENGINES, EngineSetup, EngineTraits
from fedfm.models.merge import fold_stacked, merge_into_base
from fedfm.models.state import get_trainable_state, set_trainable_state
from fedfm.privacy.guarantees import dp_mode
from fedfm.reporting import outputs
from fedfm.reporting.console import ConsoleReporter
from fedfm.reporting.logs import attach, detach
from fedfm.reporting.metrics import MetricsLog, remove_stale_temporaries
from fedfm.reporting.problems import name_sites, problems
from fedfm.seeding import noise_key
from fedfm.server.checkpoint import (
    CheckpointError,
    ClientStore,
    ServerState,
    load_checkpoint,
    save_checkpoint,
)
from fedfm.server.export import export_adapter
from fedfm.server.parts import RunParts
from fedfm.server.personalization import active as personal_active
from fedfm.server.personalization import clustered, server_params
from fedfm.server.round import ServerRound, Strategy, apply_round, round_context, traffic
from fedfm.sharing import SHARING_MODES
from fedfm.tasks import task_kind
from fedfm.tasks.setup import (
    BundleBuilder,
    FederatedData,
    build_task,
    client_jobs,
    prepare_data,
    server_only_data,
)
from fedfm.transforms.compression import serialized_nbytes
from fedfm.transforms.validation import UNBOUNDED_WARNING, influence_bound
from fedfm.types import Params


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
        """``engine_factory`` replaces the configured engine (``fedfm server``'s gRPC engine); a
        factory whose ``remote`` is true has clients that hold their own data, so the server loads
        only its test split. ``resume``: the folder must hold a checkpoint (a missing or damaged
        one is an error, never a silent restart)."""
        self.started, self.resume, self.cfg, self.run_dir = time.perf_counter(), resume, cfg, run_dir
        # every note, warning and round row also as JSON lines in RUN/log.jsonl (the dashboard's)
        self.log = attach(run_dir / "log.jsonl", "run" if engine_factory is None else "server", key="run")
        self.callbacks = list(callbacks)
        self.console = ConsoleReporter(enabled=progress)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.console.note(f"run folder: {run_dir}")
        make_engine = engine_factory or ENGINES.get(cfg.run.engine)
        traits = EngineTraits.of(make_engine, cfg)
        self.remote = traits.remote
        kind = task_kind(cfg)
        sharing = SHARING_MODES.get(cfg.sharing.mode)
        with self.console.status("loading data and model"), warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always", DataWarning)
            self.data: FederatedData = server_only_data(cfg) if self.remote else prepare_data(cfg)
            client_cfg = sharing.client_view(cfg)  # the model clients hold (an emulator, say)
            self.bundle, self.task = build_task(client_cfg, self.data)
            # the model the server evaluates and exports, when it is not the clients' (the FM)
            self.server_model = sharing.server_model(cfg, self.data.train.label_names)
        for w in said:  # what the data sources noticed (rows dropped, duplicates), once each
            if issubclass(w.category, DataWarning):
                (self.console.note if issubclass(w.category, DataNote) else self.console.warn)(str(w.message))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        check_optimizer_device(cfg.training, self.bundle.device)  # before any round, not in each client
        self.initial_params = get_trainable_state(self.bundle.trainable)  # the baselines start here
        outputs.write_partition(run_dir, self.data.partition_summary(cfg.partition.method))
        outputs.note_model_files(run_dir, cfg.model.name, getattr(self.bundle, "source", None))
        outputs.write_client_samples(run_dir, self.data)
        program = ClientProgram.from_config(cfg)
        self.objective, self.pipeline, self.training = program.objective, program.pipeline, program.training
        self.server_optimizer = make_server_optimizer(cfg.strategy)
        self.jobs = client_jobs(self.data, cfg.peft)
        builder = BundleBuilder.of(client_cfg, self.data.train.label_names)
        options = getattr(cfg, traits.section) if traits.section else cfg.run  # [run]: a plug-in's options
        setup = EngineSetup(self.bundle, self.task, self.jobs, program, builder, options, cfg.batched)
        self.engine = make_engine(setup)
        if getattr(self.engine, "summary", None):
            self.console.note(f"{cfg.run.engine} engine: {self.engine.summary}")
        self.cohort = cohort_size(
            self.data.num_clients, cfg.sampling.clients_per_round, cfg.sampling.fraction
        )
        remote_limit = 2**31 - 1  # remote clients' data sizes are theirs to know
        self.max_examples = cfg.validation.max_num_examples or (
            remote_limit if self.remote else len(self.data.train)
        )
        # a deployment nothing bounds (validation.unbounded): said every round, flagged in the record
        self.unbounded = self.remote and influence_bound(cfg) is None
        self.lora_mode = LORA_AGGREGATION.get(cfg.strategy.lora_aggregation)
        self.strategy = self._strategy()
        self.privacy = None  # fedfm.privacy.server.RunPrivacy in DP runs
        if dp_mode(cfg).active:
            from fedfm.algorithms.personal import PERSONAL_PARTS
            from fedfm.privacy.server import SEEDED_WARNING, RunPrivacy

            stays = PERSONAL_PARTS.get(cfg.personalization.method)  # personal tensors never travel
            dim = sum(v.numel() for k, v in self.initial_params.items() if not stays(k))
            n, folder, note = self.data.num_clients, run_dir / "checkpoint", self.console.note
            key = noise_key(run_dir, create=self.remote) if cfg.privacy.noise_seed is not None else None
            self.privacy = RunPrivacy(cfg, n, self.cohort, dim, folder, note=note, key=key)
            if self.privacy.noise.reproducible:
                self.console.warn(SEEDED_WARNING)
        self.metrics = MetricsLog(run_dir / "metrics.jsonl")
        # sites by name (natural partitioning: the column's values; a deployment: its roster)
        self.names: dict[int, str] = dict(enumerate(self.data.client_names))
        self.cluster_sizes: list[int] | None = None  # IFCA: clients per cluster in the last round
        self.elapsed_offset = 0.0
        self.fresh = False  # set by _initial_state: no checkpoint to resume from
        self.state = self._initial_state()
        self.clock, self.fedbuff = None, None  # the virtual clock (fedfm.systems); FedBuff's driver
        if cfg.systems.enabled or cfg.run.mode == "async":
            from fedfm.server.systems import SystemsClock

            self.clock = SystemsClock(cfg, self.data.num_clients, self.state.clock)
        self.trackers = None  # fedfm.reporting.trackers: TensorBoard, MLflow, W&B
        if cfg.run.trackers:
            from fedfm.reporting.trackers import Trackers

            self.trackers = Trackers(cfg, run_dir, None if self.fresh else self.state.round)
        if cfg.run.mode == "async":
            from fedfm.server.asynchronous import AsyncParts, FedBuff, RemoteFedBuff, SecureFedBuff

            driver = RemoteFedBuff if self.remote else SecureFedBuff if cfg.secagg.enabled else FedBuff
            parts = AsyncParts(cfg, self.clock, self.cohort, self.engine, self.strategy, self.server_round)
            self.fedbuff = driver(parts, self.state)
        if sharing.prepare_run is not None:  # offsite: distil the emulator (again, when resuming)
            held_out = self.data.test.texts
            record = sharing.prepare_run(cfg, self.bundle, self.server_model, held_out, self.console)
            if record is not None and self.fresh:
                self.metrics.write(record)
        if self.fresh:
            if sharing.describe is not None:
                self._describe_sharing(sharing.describe(cfg))
            if synthetic_mode(cfg).warmup:
                self._warmup()
            # round 0 is checkpointed too: a kill after round 1's record is written but before its
            # checkpoint resumes from here, and a checkpoint that is missing later was deleted
            self._checkpoint()
        self.evaluator = kind.evaluator(cfg, self.data)
        truncated = getattr(self.task, "truncated", None)
        columns = kind.columns
        if personal_active(cfg):  # each client on its own test split: the mean and the worst 10%
            metric = kind.own_metric[0]
            short = {"accuracy": "acc", "perplexity": "ppl", "reward_accuracy": "reward acc"}.get(
                metric, metric
            )
            own = [
                (f"own {short}", f"personal_local_{metric}_mean", "{:.4f}"),
                (f"worst10 {short}", f"personal_local_{metric}_worst10", "{:.4f}"),
            ]
            columns = [*columns[:-2], *own, *columns[-2:]]
        if cfg.systems.enabled or cfg.run.mode == "async":  # the virtual clock next to wall time
            columns = [*columns[:-1], ("virtual h", "virtual_time_h", "{:.2f}"), columns[-1]]
        self.console.describe(cfg, self.data, self.bundle, self.cohort, truncated, columns)

    def _strategy(self) -> Strategy:
        cfg = self.cfg
        rule = aggregation_rule(cfg.strategy, cfg.peft.rank_tiers, cfg.peft.r, make_aggregator(cfg.strategy))
        fold = self._fold if self.lora_mode.merges_into_base else None
        ranks = [job.rank for job in self.jobs]
        sent = None
        held = SHARING_MODES.get(cfg.sharing.mode).held
        if held is not None:  # a split client holds, and is sent, only its bottom part
            sent = held(cfg)
        count = functools.partial(traffic, ranks=ranks, num_total=self.bundle.num_total(), sent=sent)
        return Strategy(
            self.pipeline, rule, cfg.strategy.weighting == "uniform", self.server_optimizer, self.objective,
            cfg.sampling.min_clients, self.data.num_clients, count, fold, self.remote,
        )  # fmt: skip

    def _fold(self, aggregate: Params, state: ServerState, t: int, senders: int):
        return fold_stacked(
            self.bundle, state.params, state.merged, aggregate, self.cfg.peft.r, self.cfg.run.seed, t, senders
        )

    def _describe_sharing(self, record: dict) -> None:
        total = self.bundle.num_total()
        record = {**record, "client_params": total}
        if self.server_model is not None:  # offsite: the clients' emulator, the server's FM
            record["server_params"] = self.server_model.bundle.num_total()
            whole = record["server_params"]
        if self.bundle.parts is not None:  # split: one model, its top part the server's
            theirs = self.bundle.parts.server_parameters()
            record["server_params"] = sum(
                p.numel() for p in self.bundle.model.parameters() if id(p) in theirs
            )
            record["client_params"] = total - record["server_params"]
            whole = total
        if "server_params" in record:
            self.console.note(
                f"{record['mode']}: clients hold {record['client_params'] / 1e6:.1f}M parameters "
                f"({record['client_params'] / whole:.0%} of the FM's {whole / 1e6:.1f}M)"
            )
        self.metrics.write({"event": "sharing", **record})

    def _warmup(self) -> None:
        from fedfm.server.warmup import server_warmup

        cfg, rows = self.cfg, self.data.synthetic_rows
        with self.console.status(f"warm-up: {cfg.synthetic.warmup_steps} server steps on synthetic data"):
            params, loss = server_warmup(cfg, self.bundle, self.task, rows, self.state.params)
        self.state = replace(self.state, params=params)
        steps = cfg.synthetic.warmup_steps
        self.metrics.write(
            {"event": "warmup", "steps": steps, "train_loss": loss, "num_synthetic": len(rows)}
        )
        self.console.note(f"warm-up on {len(rows)} synthetic examples: {steps} steps, mean loss {loss:.3f}")

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
        repeatable = not self.remote  # remote clients' updates differ on a rerun
        if saved is None:  # a new run, or one killed before its round-0 checkpoint
            self.fresh = True
            self.metrics.reset()
            params = get_trainable_state(self.bundle.trainable)
            if clustered(self.cfg):  # IFCA: k cluster models side by side
                params = stack_clusters(params, clustered(self.cfg))
            state = ServerState(
                round=0,
                params=params,
                optimizer_state=self.server_optimizer.init(params),
                server_control=self.objective.server_init(params),
                objective_state=self.objective.server_part_init(params),
                privacy=self.privacy.initial_state() if self.privacy else {},
            )
            if (
                self.privacy is not None and self.resume
            ):  # a release before the first checkpoint stays charged
                self.privacy.resume(state.privacy, 0, repeatable)
            return state
        self.metrics.truncate_after(saved.round)
        sizes = [r["cluster_sizes"] for r in self.metrics.rounds() if sum(r.get("cluster_sizes") or [])]
        self.cluster_sizes = sizes[-1] if sizes else None
        if self.privacy is not None:
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

    def name_sites(self, names: dict[int, str]) -> None:
        """The sites' names by client index (``fedfm server``: the roster's), said beside the
        index in the console, metrics.jsonl, the report, the dashboard and the trackers."""
        self.names = {int(k): str(v) for k, v in names.items()}

    def execute(self) -> RunResult:
        try:
            return self._execute()
        finally:
            detach(self.log)  # the run folder's log ends with the run

    def _execute(self) -> RunResult:
        cfg = self.cfg
        if self.names:  # read by the dashboard, the report and `fedfm status`
            self.metrics.write(
                {"event": "sites", "names": {str(k): v for k, v in sorted(self.names.items())}}
            )
        if self.state.round == 0 and cfg.eval.at_start and not self.metrics.has_round(0):
            record = {"round": 0, "num_clients": 0, "train_loss": None}
            if self.clock is not None:
                record["virtual_time_s"] = self.clock.time
            self._finish_round(
                {**record, **self.timed_evaluation(self.state.params), **self.privacy_record()}
            )
        stopped = None
        with self.console.rounds(cfg.run.rounds, self.state.round) as bar:
            for t in range(self.state.round + 1, cfg.run.rounds + 1):
                stopped = self.privacy.budget_problem(self.state.privacy, t) if self.privacy else None
                if stopped:
                    self.console.warn(stopped)
                    self.metrics.write({"event": "stopped", "round": t - 1, "reason": stopped})
                    break
                self._finish_round(self.fedbuff_step(t, bar) if self.fedbuff else self.run_round(t, bar))
                self._checkpoint()
        return self._finish(stopped)

    def _checkpoint(self) -> None:
        self.state = replace(self.state, engine_state=self.engine.state_dict(), elapsed_s=self.elapsed())
        if self.clock is not None:  # the virtual clock; FedBuff's buffer and updates in flight
            clock = self.fedbuff.state() if self.fedbuff is not None else self.clock.state()
            self.state = replace(self.state, clock=clock)
        states = getattr(self.engine, "states", None)  # per-client state: only what changed
        save_checkpoint(self.run_dir / "checkpoint", self.state, states.take_changed() if states else {})
        if states is not None:
            states.committed()
        if self.privacy is not None:
            self.privacy.checkpointed()

    def parts(self) -> RunParts:
        """What scoring, baselines and exports read of this run (``fedfm.server.parts``)."""
        states = getattr(self.engine, "states", None)
        return RunParts(
            self.cfg, self.data, self.bundle, self.task, self.initial_params, self.sample,
            remote=self.remote,
            client_state=states.get if states is not None else (lambda k: None),
            cluster_sizes=self.cluster_sizes,
        )  # fmt: skip

    def sample(self, t: int) -> list[int]:
        n, seed = self.data.num_clients, self.cfg.run.seed
        rng = self.privacy.cohort_rng(t) if self.privacy is not None else None  # DP: unpredictable
        if self.clock is not None and self.clock.shapes_cohort:  # the online clients; over-selection
            return self.clock.select(t, self.cohort, seed, rng)
        if self.cfg.sampling.method == "poisson":
            return poisson_cohort(n, self.cohort / n, seed, t, rng)
        return sample_cohort(n, self.cohort, seed, t, rng)

    def server_round(self, s: ServerState, t: int, cohort: list[int], on_client=lambda: None) -> ServerRound:
        """The inputs of round (or FedBuff task) ``t`` of ``cohort`` on server state ``s``."""
        return ServerRound(
            t, cohort, self.cfg.run.seed, s.params, s.server_control, self.reference, self.max_examples,
            self.privacy, s.privacy, self.engine, on_client,
        )  # fmt: skip

    def run_round(self, t: int, bar) -> dict:
        start = time.perf_counter()
        clock = self.clock
        cohort = self.sample(t)
        rnd = self.server_round(self.state, t, cohort, bar.start_round(t, len(cohort)))
        ctx = round_context(rnd, self.pipeline)
        results = self.engine.run_cohort(self.state.params, cohort, ctx)
        timing = {}
        if clock is not None:  # who delivers when on the virtual clock; the first m are kept
            down = functools.cache(lambda c: serialized_nbytes(rnd.sent(c)))
            results, timing = clock.settle(list(results), self.cohort, down)
        reduce_start = time.perf_counter()
        self.state, record = apply_round(self.state, results, rnd, self.strategy)
        # streamed: the reduce runs as updates arrive, so this includes receiving them
        record["aggregate_s"] = time.perf_counter() - reduce_start
        record.update(timing)
        if clustered(self.cfg):
            picked = [int(rec["cluster"]) for rec in rnd.tally.client_records if "cluster" in rec]
            record["cluster_sizes"] = [picked.count(j) for j in range(clustered(self.cfg))]
            if picked:  # a round nobody delivered in leaves the largest cluster as it was
                self.cluster_sizes = record["cluster_sizes"]
        record.update({"round_s": time.perf_counter() - start, **self.privacy_record()})
        if self.training.scheduled:
            record["lr"] = round_lr(self.training, t)  # the clients' local learning rate this round
        if rnd.secure is not None:
            record["secagg"] = rnd.secure.report()
        if rnd.attack is not None:
            record["malicious"] = sorted(rnd.attack.malicious)
        return self._round_done(t, "round", record, rnd.tally.client_records)

    def fedbuff_step(self, t: int, bar) -> dict:
        """Server step ``t`` of an asynchronous run (``fedfm.server.asynchronous``)."""
        start = time.perf_counter()
        self.state, record = self.fedbuff.step(self.state, t, bar)
        record["round_s"] = time.perf_counter() - start
        return self._round_done(t, "step", record, self.fedbuff.client_records)

    def _round_done(self, t: int, word: str, record: dict, clients: list[dict]) -> dict:
        """After round (or FedBuff step) ``t``: its clients' records written and tracked, what went
        wrong said, the model evaluated on the cadence; → the record."""
        name_sites(self.names, record, clients)
        for rec in clients:
            self.metrics.write({**rec, "event": "client", "round": t})
        if self.trackers is not None:
            self.trackers.clients(t, clients)
        if self.unbounded:  # said even with --quiet
            record["unbounded"] = True
            ConsoleReporter(enabled=True).warn(f"{word} {t}: {UNBOUNDED_WARNING}")
        for line in problems(record):  # the report says the same (fedfm.reporting.problems)
            self.console.warn(f"{word} {t}: {line}")
        if t % self.cfg.eval.every == 0 or t == self.cfg.run.rounds:
            record.update(self.timed_evaluation(self.state.params))
        return record

    def timed_evaluation(self, params: Params) -> dict:
        start = time.perf_counter()
        metrics = self.evaluate(params)
        return {**metrics, "eval_s": time.perf_counter() - start}

    def privacy_record(self) -> dict:
        return self.privacy.record(self.state.privacy) if self.privacy is not None else {}

    def reference(self, client_id: int) -> Params:
        """The global state as this client holds it (its own LoRA rank, when ranks differ)."""
        rank = self.jobs[client_id].rank
        return self.state.params if rank is None else truncate_rank(self.state.params, rank)

    def evaluate(self, params: Params) -> dict:
        from fedfm.server.personalization import client_scores, scores_clients

        by_cluster = self._cluster_scores(params) if clustered(self.cfg) else {}
        set_trainable_state(self.bundle.trainable, server_params(self.cfg, params, self.cluster_sizes))
        with self.console.status(self.evaluator.status):
            metrics = {**self.evaluator(self.bundle, self.task), **by_cluster}
        server = self.server_model
        if server is None:
            if not scores_clients(self.parts()):  # nothing to score: nothing said
                return metrics
            with self.console.status("scoring every client on its own test split"):
                return {**metrics, **client_scores(self.parts(), params)}
        set_trainable_state(server.bundle.trainable, server.params(params))  # plugged into the FM
        with self.console.status(f"{self.evaluator.status} (the FM with the clients' adapter)"):
            plugged = self.evaluator(server.bundle, self.task)
        return {**plugged, **{f"emulator_{k}": v for k, v in metrics.items() if k.startswith("test_")}}

    def _cluster_scores(self, params: Params) -> dict:
        """IFCA: every cluster model's score on the server's test split."""
        from fedfm.algorithms.clusters import cluster_view

        metric = task_kind(self.cfg).own_metric[0]
        scores = []
        for j in range(clustered(self.cfg)):
            set_trainable_state(self.bundle.trainable, cluster_view(params, j))
            m = self.task.evaluate(self.bundle.model, self.task.test, None, self.cfg.eval.batch_size,
                                   self.bundle.device)  # fmt: skip
            scores.append(m[metric])
        return {f"test_{metric}_by_cluster": scores}

    def _finish_round(self, record: dict) -> None:
        record = {"event": "round", **record, "elapsed_s": self.elapsed()}
        if "virtual_time_s" in record:
            record["virtual_time_h"] = record["virtual_time_s"] / 3600
        self.metrics.write(record)
        if self.trackers is not None:
            self.trackers.round(record)
        self.console.round_row(record)
        for callback in self.callbacks:
            callback(record)

    def _finish(self, stopped: str | None = None) -> RunResult:
        history = self.metrics.rounds()
        if self.cfg.task.baselines:
            from fedfm.server.baselines import run_baselines, write_baselines

            with self.console.status("training the local-only and centralized baselines"):
                baselines = run_baselines(self.parts(), self.state.params, self.console.note)
            write_baselines(self.run_dir, baselines)
        self._personal_finish()
        with self.console.status("writing adapter, plots and report"):
            merged = self.lora_mode.merges_into_base
            labels = task_kind(self.cfg).labels_in_export and self.cfg.model.init == "pretrained"
            bundle, params = self.bundle, server_params(self.cfg, self.state.params, self.cluster_sizes)
            if self.server_model is not None:  # the adapter plugged into the FM
                bundle, params = self.server_model.bundle, self.server_model.params(params)
            export_adapter(bundle, params, self.run_dir / "adapter", merged=merged, labels=labels)
            outputs.write_outputs(self.run_dir)
        if self.trackers is not None:
            with self.console.status("sending the plots and the adapter to the trackers"):
                self.trackers.finish(self.run_dir, history[-1] if history else {})
        self.engine.close()
        final = next((r for r in reversed(history) if "test_accuracy" in r), history[-1] if history else {})
        self.console.summary(history, self.run_dir)
        n = self.bundle.num_trainable()
        result = RunResult(self.run_dir, history, final, self.cfg, stopped, num_trainable=n)
        trained = [r for r in history if r.get("round", 0) > 0]
        if trained and not any(r.get("num_clients") for r in trained):
            raise RunFailedError(
                f"no client delivered a usable update in any of {len(trained)} rounds (see 'failed' and "
                f"'rejected' in {self.run_dir / 'metrics.jsonl'}); the model is the initial one",
                result,
            )
        return result

    def _personal_finish(self) -> None:
        """Personalization: every client's personal adapter exported (``personal/client-K``), and
        local fine-tuning after FL scored (``{"event": "personalization"}``)."""
        from fedfm.server.personalization import finetuned_scores, own_params

        cfg, params = self.cfg, self.state.params
        if self.remote or not (personalizes(cfg.personalization) or cfg.personalization.finetune_steps):
            return
        labels = task_kind(cfg).labels_in_export and cfg.model.init == "pretrained"
        if clustered(cfg):
            self._export_clusters(labels)
        elif personalizes(cfg.personalization):
            parts = self.parts()
            for k in range(self.data.num_clients):
                if (parts.client_state(k) or {}).get("personal"):
                    folder = self.run_dir / "personal" / f"client-{k}"
                    export_adapter(self.bundle, own_params(parts, params, k), folder, labels=labels)
        if cfg.personalization.finetune_steps:
            with self.console.status(
                f"local fine-tuning: {cfg.personalization.finetune_steps} steps per client"
            ):
                record = finetuned_scores(self.parts(), params)
            steps = cfg.personalization.finetune_steps
            self.metrics.write({"event": "personalization", "finetune_steps": steps, **record})
            summary = {k: round(v, 4) for k, v in record.items() if k.endswith(("_mean", "_worst10"))}
            self.console.note(f"after local fine-tuning: {summary}")
        set_trainable_state(self.bundle.trainable, server_params(cfg, params, self.cluster_sizes))

    def _export_clusters(self, labels: bool) -> None:
        """IFCA: every cluster model (``clusters/cluster-J``) and the cluster each client picks
        now (``clusters/assignment.json``)."""
        import json

        from fedfm.algorithms.clusters import cluster_view
        from fedfm.server.personalization import client_cluster

        params, folder = self.state.params, self.run_dir / "clusters"
        for j in range(clustered(self.cfg)):
            export_adapter(self.bundle, cluster_view(params, j), folder / f"cluster-{j}", labels=labels)
        parts = self.parts()
        picks = {str(k): client_cluster(parts, params, k) for k in range(self.data.num_clients)}
        (folder / "assignment.json").write_text(json.dumps(picks, indent=1) + "\n")


class RunFailedError(RuntimeError):
    """Every client failed in every round: the run produced nothing. ``result`` has its records."""

    def __init__(self, message: str, result: RunResult) -> None:
        super().__init__(message)
        self.result = result
