"""Knowledge transfer between the FM and small client models (``sharing.mode = "transfer"``).

    round t:  teacher  = FM(transfer set)                              server → every sampled client
              client k: train its own small model on its data + τ²·KL(teacher ‖ student) on
                        transfer batches; send its logits on the transfer set         client → server
              server:   ensemble = Σ n_k z_k / Σ n_k; train the FM's adapter for
                        transfer.server_steps on τ²·KL(ensemble ‖ FM) over the transfer set
              evaluate the FM (test_*) and the client models (client_test_accuracy_mean)

Client models may differ in architecture and tokenizer (``transfer.client_models``, assigned
round-robin); only logits on the shared transfer texts cross the wire, so nothing needs a common
parameter space. The transfer set is public or FM-synthetic (``fedfm synth``), never client data;
texts equal to a server test text are dropped. Each client's model (its trainable state) is
client state, checkpointed with the FM's after every round; a resumed run continues from there.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedfm.algorithms.distill import distillation_loss, ensemble_logits
from fedfm.algorithms.sampling import cohort_size, sample_cohort
from fedfm.client.costs import CostMeter, round_costs
from fedfm.client.program import batch_order, make_optimizer, num_local_steps
from fedfm.data.dataset import TextDataset
from fedfm.data.sources import read_texts
from fedfm.data.synthetic import synthetic_mode
from fedfm.models.state import get_trainable_state, set_trainable_state
from fedfm.reporting import outputs
from fedfm.reporting.console import ConsoleReporter
from fedfm.reporting.metrics import MetricsLog
from fedfm.seeding import seed_torch, torch_generator
from fedfm.server.checkpoint import ClientStore, ServerState, load_checkpoint, save_checkpoint
from fedfm.server.driver import RunResult
from fedfm.server.export import export_adapter
from fedfm.server.tally import payload_nbytes
from fedfm.tasks import task_kind
from fedfm.tasks.classification import encode
from fedfm.tasks.setup import build_task, prepare_data
from fedfm.types import Logits


def transfer_texts(cfg, test_texts) -> list[str]:
    """The transfer set: de-duplicated, without any server test text, at most ``max_examples``
    (a seeded subsample)."""
    texts = read_texts(cfg.transfer.path or cfg.synthetic.path)
    held = set(test_texts)
    texts = list(dict.fromkeys(t for t in texts if t not in held))
    limit = cfg.transfer.max_examples
    if limit and len(texts) > limit:
        rng = np.random.default_rng(np.random.SeedSequence([cfg.run.seed, 7]))
        texts = [texts[i] for i in sorted(rng.choice(len(texts), limit, replace=False))]
    return texts


@dataclass
class Party:
    """A model that takes part: its bundle, its task (its tokenizer's encoding of the data), and
    the transfer set in the same encoding."""

    bundle: object
    task: object
    transfer: object  # Encoded
    initial: dict

    def logits(self, batch_size: int) -> torch.Tensor:
        """Its logits on every transfer text (eval mode, no gradient)."""
        model, out = self.bundle.model, []
        model.eval()
        with torch.no_grad():
            for start in range(0, len(self.transfer), batch_size):
                rows = torch.arange(start, min(start + batch_size, len(self.transfer)))
                b = self.task.batch(self.transfer, rows, self.bundle.device)
                out.append(self.task.logits(model, b).float().cpu())
        return torch.cat(out)


def make_party(cfg, data, texts, bundle=None, task=None) -> Party:
    if bundle is None:
        bundle, task = build_task(cfg, data)
    dummy = TextDataset(list(texts), np.zeros(len(texts), dtype=np.int64), data.train.label_names)
    transfer = encode(bundle.tokenizer, dummy, cfg.model.max_length)
    return Party(bundle, task, transfer, get_trainable_state(bundle.trainable))


def client_config(cfg, spec):
    """The config a client model is built from: the run's, with this architecture's model."""
    model = cfg.model.model_copy(update={"name": spec.name, "layers": spec.layers, "init": spec.init})
    return cfg.model_copy(update={"model": model, "sharing": cfg.sharing.model_copy(update={"mode": "none"})})


def train_client(party: Party, rows: np.ndarray, teacher: torch.Tensor, cfg, t: int, k: int, meter=None):
    """Local training of client k's own model: cross-entropy on its rows plus the FM's teaching
    on transfer batches → (mean local loss, the optimizer)."""
    tr, bundle, task = cfg.training, party.bundle, party.task
    model, device = bundle.model, bundle.device
    steps = num_local_steps(len(rows), tr)
    seed_torch(cfg.run.seed, t, k, "dropout")
    local = batch_order(len(rows), tr.batch_size, steps, torch_generator(cfg.run.seed, t, k, "shuffle"))
    taught = batch_order(
        len(party.transfer), tr.batch_size, steps, torch_generator(cfg.run.seed, t, k, "transfer")
    )
    optimizer = make_optimizer(list(bundle.trainable.values()), tr)
    rows_t = torch.as_tensor(rows, dtype=torch.long)
    losses = []
    model.train()
    for positions, transfer_rows in zip(local, taught, strict=True):
        loss = task.loss(model, task.batch(task.train, rows_t[positions], device))
        if cfg.transfer.client_weight > 0:
            b = task.batch(party.transfer, transfer_rows, device)
            kd = distillation_loss(
                task.logits(model, b), teacher[transfer_rows].to(device), cfg.transfer.temperature
            )
            loss = loss + cfg.transfer.client_weight * kd
        if not torch.isfinite(loss):
            raise FloatingPointError("non-finite loss in a client's local training")
        loss.backward()
        if tr.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(bundle.trainable.values(), tr.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if meter is not None:
            meter.step()
    return float(np.mean(losses)), optimizer


def distill_server(party: Party, ensemble: torch.Tensor, cfg, t: int) -> float | None:
    """``transfer.server_steps`` steps of the FM's adapter towards the clients' ensemble."""
    steps = cfg.transfer.server_steps
    if steps == 0:
        return None
    bundle, task = party.bundle, party.task
    lr = cfg.transfer.server_lr or cfg.training.lr
    optimizer = make_optimizer(list(bundle.trainable.values()), cfg.training.model_copy(update={"lr": lr}))
    order = batch_order(
        len(party.transfer), cfg.training.batch_size, steps, torch_generator(cfg.run.seed, t, "server")
    )
    seed_torch(cfg.run.seed, t, "server-dropout")
    bundle.model.train()
    losses = []
    for rows in order:
        b = task.batch(party.transfer, rows, bundle.device)
        loss = distillation_loss(
            task.logits(bundle.model, b), ensemble[rows].to(bundle.device), cfg.transfer.temperature
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return float(np.mean(losses))


def warm_up(cfg, fm: Party, data, state: ServerState, metrics, console) -> ServerState:
    """``synthetic.mode = "warmup"``: ``synthetic.warmup_steps`` steps of the FM on the labelled
    synthetic rows (never client data) before round 1, so that its first teaching is not a random
    head's; seeded, so a run restarted before its first checkpoint warms up the same."""
    from fedfm.server.warmup import server_warmup

    rows = data.synthetic_rows
    with console.status(f"warm-up: {cfg.synthetic.warmup_steps} FM steps on {len(rows)} synthetic examples"):
        params, loss = server_warmup(cfg, fm.bundle, fm.task, rows, state.params)
    metrics.write({"event": "warmup", "steps": cfg.synthetic.warmup_steps, "train_loss": loss,
                   "num_synthetic": len(rows)})  # fmt: skip
    console.note(f"FM warm-up on {len(rows)} synthetic examples: mean loss {loss:.3f}")
    return ServerState(0, params, {})


def run_transfer(
    cfg, run_dir: Path, *, progress: bool = True, callbacks=(), resume: bool = False
) -> RunResult:
    started = time.perf_counter()
    console = ConsoleReporter(enabled=progress)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    console.note(f"run folder: {run_dir} (knowledge transfer between the FM and client models)")
    folder = run_dir / "checkpoint"
    with console.status("loading data, the FM and the client models"):
        data = prepare_data(cfg)
        texts = transfer_texts(cfg, data.test.texts)
        fm = make_party(cfg, data, texts)
        specs = cfg.transfer.client_models
        parties = [make_party(client_config(cfg, s), data, texts) for s in specs]
    outputs.write_partition(run_dir, data.partition_summary(cfg.partition.method))
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    evaluate = task_kind(cfg).evaluator(cfg, data)
    n = data.num_clients
    arch = [k % len(parties) for k in range(n)]
    saved = load_checkpoint(folder) if resume else None
    store = ClientStore(folder)
    if saved is None:
        metrics.reset()
        state = ServerState(0, get_trainable_state(fm.bundle.trainable), {})
        metrics.write({
            "event": "sharing", "mode": "transfer", "transfer_examples": len(texts),
            "server_params": fm.bundle.num_total(),
            "client_models": [{"name": s.name, "layers": s.layers, "params": p.bundle.num_total()}
                              for s, p in zip(specs, parties, strict=True)],
        })  # fmt: skip
        console.note(
            f"transfer: {len(texts)} texts; client models "
            + ", ".join(f"{p.bundle.num_total() / 1e6:.1f}M" for p in parties)
            + f" (FM {fm.bundle.num_total() / 1e6:.1f}M)"
        )
        if synthetic_mode(cfg).warmup:  # the FM learns the labels on FM-synthetic data before it teaches
            state = warm_up(cfg, fm, data, state, metrics, console)
    else:
        metrics.truncate_after(saved.round)
        state = saved
        console.note(f"resuming after round {saved.round}")
    set_trainable_state(fm.bundle.trainable, state.params)
    budget = cohort_size(n, cfg.sampling.clients_per_round, cfg.sampling.fraction)
    bs = cfg.eval.batch_size
    elapsed0 = state.elapsed_s

    def scores(t: int) -> dict:
        record = evaluate(fm.bundle, fm.task)
        clients = []
        for k in range(n):
            own = store.get(k)
            if own is None:
                continue
            party = parties[arch[k]]
            set_trainable_state(party.bundle.trainable, own["model"])
            m = party.task.evaluate(party.bundle.model, party.task.test, None, bs, party.bundle.device)
            clients.append(m["accuracy"])
        if clients:
            record["client_test_accuracy_mean"] = float(np.mean(clients))
            record["client_test_accuracy_min"] = float(np.min(clients))
        return record

    def finish(record: dict) -> None:
        record = {"event": "round", **record, "elapsed_s": elapsed0 + time.perf_counter() - started}
        metrics.write(record)
        console.round_row(record)
        for callback in callbacks:
            callback(record)

    if state.round == 0 and cfg.eval.at_start and not metrics.has_round(0):
        finish({"round": 0, "num_clients": 0, "train_loss": None, **evaluate(fm.bundle, fm.task)})
    with console.rounds(cfg.run.rounds, state.round) as bar:
        for t in range(state.round + 1, cfg.run.rounds + 1):
            t0 = time.perf_counter()
            cohort = sample_cohort(n, budget, cfg.run.seed, t)
            tick = bar.start_round(t, len(cohort))
            teacher = fm.logits(bs)
            sent, changed, client_records, failed = [], {}, [], []
            for k in cohort:
                tick()
                rows = data.client_train[k]
                party = parties[arch[k]]
                own = store.get(k)
                set_trainable_state(party.bundle.trainable, own["model"] if own else party.initial)
                meter = (
                    CostMeter(party.bundle.model, party.bundle.trainable)
                    if cfg.training.count_costs
                    else None
                )
                try:
                    with meter.counting() if meter else contextlib.nullcontext():
                        loss, optimizer = train_client(party, rows, teacher, cfg, t, k, meter)
                        z = party.logits(bs)
                except Exception as err:  # one broken client must not stop the round
                    failed.append({"client": k, "stage": "train", "reason": f"{type(err).__name__}: {err}"})
                    continue
                rec = {"train_loss": loss, "model": float(arch[k])}
                if meter is not None:
                    rec.update(meter.record(optimizer))
                sent.append(Logits(z, int(len(rows)), rec))
                client_records.append({**rec, "client": k, "num_examples": int(len(rows))})
                metrics.write({**client_records[-1], "event": "client", "round": t})
                changed[k] = {"model": get_trainable_state(party.bundle.trainable)}
            record = {
                "round": t,
                "num_clients": len(sent),
                "cohort": cohort,
                "failed": failed,
                "rejected": [],
            }
            if sent:
                weights = [p.num_examples for p in sent]
                ensemble = ensemble_logits([p.values for p in sent], weights)
                record["server_distill_loss"] = distill_server(fm, ensemble, cfg, t)
                losses = [p.metrics["train_loss"] for p in sent]
                record["train_loss"] = float(np.average(losses, weights=weights))
            else:
                record["skipped"] = "no client delivered logits; the FM is unchanged"
            up = sum(payload_nbytes(p) for p in sent)  # the logits as they travel, each way
            down = payload_nbytes(Logits(teacher, 0)) * len(cohort)
            comm = {
                "bytes_up_total": state.comm.get("bytes_up_total", 0) + up,
                "bytes_down_total": state.comm.get("bytes_down_total", 0) + down,
            }
            full = 2 * len(cohort) * 4 * fm.bundle.num_total()
            record.update(
                bytes_up=up, bytes_down=down, **comm, full_finetune_bytes=full, **round_costs(client_records)
            )
            state = ServerState(t, get_trainable_state(fm.bundle.trainable), {}, comm=comm,
                                elapsed_s=elapsed0 + time.perf_counter() - started)  # fmt: skip
            save_checkpoint(folder, state, changed)
            record["round_s"] = time.perf_counter() - t0
            if t % cfg.eval.every == 0 or t == cfg.run.rounds:
                record.update(scores(t))
            finish(record)
    with console.status("writing the FM's adapter, plots and report"):
        export_adapter(fm.bundle, state.params, run_dir / "adapter", labels=cfg.model.init == "pretrained")
        outputs.write_outputs(run_dir)
    history = metrics.rounds()
    console.summary(history, run_dir)
    final = next((r for r in reversed(history) if "test_accuracy" in r), history[-1] if history else {})
    return RunResult(run_dir, history, final, cfg, None, num_trainable=fm.bundle.num_trainable())
