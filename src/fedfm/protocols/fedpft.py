"""One-shot FL from FM features: FedPFT (Beitollahi et al., 2024) as a run protocol.

    every client k, once:  features = frozen FM(x) for its rows
                           send per-class Gaussian mixtures of its features   (fedfm.algorithms.fedpft)
    server:                draw features from every mixture; train the head on them; evaluate

The FM stays frozen and the head is the only trained part (``peft.method = "head"``), so the
final model is the pretrained backbone with the server's head. One message per client, no
rounds: the bytes sent are the mixtures' parameters. The run folder looks like any other:
``metrics.jsonl`` (round 0: the untrained head; round 1: the one-shot model), ``partition.json``,
the exported model, plots and ``report.html``.

The mixtures are not differentially private: their means and counts describe the client's
data. ``fedfm.config`` refuses DP, secure aggregation and attacks with this protocol.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedfm.algorithms.fedpft import fit_class_mixtures, message_nbytes, sample_features
from fedfm.models.state import get_trainable_state
from fedfm.reporting import outputs
from fedfm.reporting.console import ConsoleReporter
from fedfm.reporting.metrics import MetricsLog
from fedfm.seeding import derive_seed, torch_generator
from fedfm.server.checkpoint import ServerState, load_checkpoint, save_checkpoint
from fedfm.server.driver import RunResult
from fedfm.server.export import export_adapter
from fedfm.tasks import task_kind
from fedfm.tasks.features import head_module
from fedfm.tasks.setup import build_task, prepare_data


def train_head(head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg, generator) -> float:
    """AdamW on (features, labels) for ``fedpft.head_epochs``; returns the last epoch's mean loss."""
    head.train()
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.head_lr, weight_decay=cfg.head_weight_decay)
    device = params[0].device
    last = float("nan")
    for _ in range(cfg.head_epochs):
        order = torch.randperm(len(x), generator=generator)
        losses = []
        for start in range(0, len(x), cfg.head_batch_size):
            idx = order[start : start + cfg.head_batch_size]
            loss = F.cross_entropy(head(x[idx].to(device)), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        last = float(np.mean(losses))
    return last


def run_fedpft(cfg, run_dir: Path, *, progress: bool = True, callbacks=(), resume: bool = False) -> RunResult:
    """The one-shot run; its checkpoint (round 1, the head) lets ``fedfm export`` read the folder,
    and a resumed folder whose checkpoint holds round 1 is finished: its records are returned."""
    started = time.perf_counter()
    console = ConsoleReporter(enabled=progress)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    console.note(f"run folder: {run_dir} (one-shot FedPFT)")
    finished = load_checkpoint(run_dir / "checkpoint") if resume else None
    if finished is not None and finished.round >= 1:
        history = MetricsLog(run_dir / "metrics.jsonl").rounds()
        console.note("finished earlier: nothing to resume")
        return RunResult(run_dir, history, history[-1] if history else {}, cfg, None)
    with console.status("loading data and model"):
        data = prepare_data(cfg)
        bundle, task = build_task(cfg, data)
    outputs.write_partition(run_dir, data.partition_summary(cfg.partition.method))
    outputs.write_client_samples(run_dir, data)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    metrics.reset()
    evaluate = task_kind(cfg).evaluator(cfg, data)
    p, bs, device = cfg.fedpft, cfg.eval.batch_size, bundle.device

    def record(rec: dict) -> None:
        rec = {"event": "round", **rec, **evaluate(bundle, task), "elapsed_s": time.perf_counter() - started}
        metrics.write(rec)
        console.round_row(rec)
        for callback in callbacks:
            callback(rec)

    record({"round": 0})
    messages, senders, up = [], [], 0
    with console.status("clients fit mixtures of their features"):
        for k, rows in enumerate(data.client_train):
            if not len(rows):
                continue
            feats = task.features(bundle.model, task.train, rows, bs, device).numpy()
            labels = data.train.labels[rows]
            seed = derive_seed(cfg.run.seed, "fedpft", k)
            mixtures = fit_class_mixtures(feats, labels, p.components, p.covariance, p.reg_covar, seed)
            nbytes = message_nbytes(mixtures)
            messages.append(mixtures)
            senders.append(k)
            up += nbytes
            metrics.write({"event": "client", "round": 1, "client": k, "num_examples": int(len(rows)),
                           "classes": len(mixtures), "bytes_up": nbytes})  # fmt: skip
    with console.status("server trains the head on sampled features"):
        generator = torch_generator(cfg.run.seed, "fedpft-server")
        x, y = sample_features(messages, p.samples_per_example, generator)
        loss = train_head(head_module(bundle.model), x, y, p, generator)
    # what one round of full fine-tuning with these clients would move (the report's yardstick)
    full = 2 * 4 * bundle.num_total() * len(senders)
    record({
        "round": 1, "num_clients": len(senders), "cohort": senders, "train_loss": loss,
        "num_sampled": int(len(x)), "bytes_up": up, "bytes_down": 0, "bytes_up_total": up,
        "bytes_down_total": 0, "full_finetune_bytes": full,
    })  # fmt: skip
    params = get_trainable_state(bundle.trainable)
    comm = {"bytes_up": up, "bytes_down": 0}
    save_checkpoint(
        run_dir / "checkpoint", ServerState(1, params, {}, comm=comm, elapsed_s=time.perf_counter() - started)
    )
    with console.status("writing the model, plots and report"):
        labels = task_kind(cfg).labels_in_export and cfg.model.init == "pretrained"
        export_adapter(bundle, params, run_dir / "adapter", labels=labels)
        outputs.write_outputs(run_dir)
    history = metrics.rounds()
    console.summary(history, run_dir)
    return RunResult(run_dir, history, history[-1], cfg, None, num_trainable=bundle.num_trainable())
