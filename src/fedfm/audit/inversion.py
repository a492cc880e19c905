"""Update inversion by a curious server: what one client's update gives away, measured four ways.

The victim's update is made by fedfm's own client training (``client_update``: the run's task,
model, PEFT method, optimizer and batches), then attacked as the server would see it:

- **your configuration**: the run's training settings as they are (optimizer, steps, batch
  size, dropout, gradient clipping), on the victim's training rows;
- **best case**: what the attacks need — plain SGD, one local step, ``batch`` rows, no gradient
  clipping, dropout off, and a start where LoRA's B ≠ 0 (a round ≥ 2). With AdamW (fedfm's
  default, fresh every round) a one-step update is close to sign(gradient), which has no row
  space worth the name; with LoRA in round 1, B = 0 makes A's update exactly zero;
- **secure aggregation of m clients**: the server sees only the sum of m best-case updates (the
  victim's and m − 1 others'); scored against the victim's data;
- **client-level DP at ε**: the victim's best-case update clipped to C and noised as
  ``PrivacyPlan`` noises a round's sum, with z calibrated for ε over the run's rounds and
  sampling (the attacker's best case: no other client in the sum).

Attacks: label counts from the head's bias update (``fedfm.audit.labels``), and token recovery
from the first linear layer's update by the span test (``fedfm.audit.dager``), ordered where
positions are learned (BERT-style) or through the next layer (causal models). Scores: token
precision and recall (special tokens left out), ROUGE-L of the recovered text against each of the
victim's texts (mean of the best match), and the label-count error.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedfm.algorithms.objectives import Objective
from fedfm.audit import dager
from fedfm.audit.labels import label_counts
from fedfm.audit.scores import best_rouge_l, label_count_error, set_precision_recall
from fedfm.client.program import client_update, round_lr
from fedfm.client.steps import ClientJob, batch_order
from fedfm.privacy import dp
from fedfm.seeding import torch_generator
from fedfm.types import Params, RoundContext

ROUND = 2  # the attacked round: after one round, LoRA's B is no longer zero


@dataclass(frozen=True)
class Setting:
    """One column of the inversion table."""

    name: str
    best: bool  # SGD, one step, few rows, no clipping, dropout off
    clients: int = 1  # updates summed before the attacker sees them (secure aggregation)
    epsilon: float | None = None  # client-level DP noise on the (one-client) aggregate
    start: str = "global"  # "global": the round-2 state; "round 1": B = 0; "crafted": B chosen by the server


def default_settings(clients: int = 5, epsilon: float = 8.0, lora: bool = False) -> list[Setting]:
    """The four columns; with LoRA also round 1 from an honest server (B = 0) and from a malicious
    one that sends a crafted B ≠ 0 (the active, fishing-style server: it chooses θ)."""
    rows = [
        Setting("your configuration", best=False),
        Setting("best case", best=True),
        Setting(f"secure aggregation, {clients} clients", best=True, clients=clients),
        Setting(f"client DP, ε = {epsilon:g}", best=True, epsilon=epsilon),
    ]
    if lora:
        rows += [
            Setting("round 1, honest server (B = 0)", best=True, start="round 1"),
            Setting("round 1, crafted B (malicious server)", best=True, start="crafted"),
        ]
    return rows


CRAFTED_STD = 0.02  # the malicious server's B: N(0, 0.02²) entries, about 8× a trained B's spread


def round_one(state: Params) -> Params:
    """The state a fresh LoRA run sends in round 1: every B factor zero."""
    return {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in state.items()}


def crafted(state: Params, seed: int) -> Params:
    """A malicious server's round-1 model: every B factor random (B ≠ 0 makes A's gradient
    Σ (Bᵀδ) xᵀ carry the inputs' span, which B = 0 would have zeroed; larger B lifts it further
    above float32 rounding)."""
    g = torch_generator(seed, "crafted-lora-b")
    return {
        k: (torch.randn(v.shape, generator=g, dtype=torch.float64) * CRAFTED_STD).to(v.dtype)
        if "lora_B" in k
        else v
        for k, v in state.items()
    }


@contextlib.contextmanager
def dropout_off(model: nn.Module):
    """Every dropout module at p = 0 for a while (the attacker's best case)."""
    held = [(m, m.p) for m in model.modules() if isinstance(m, nn.Dropout)]
    for m, _ in held:
        m.p = 0.0
    try:
        yield
    finally:
        for m, p in held:
            m.p = p


def best_training(training, batch: int):
    return training.model_copy(
        update={
            "optimizer": "sgd",
            "local_steps": 1,
            "batch_size": batch,
            "grad_accumulation": 1,
            "max_grad_norm": None,
            "lr_schedule": "constant",
            "lr_warmup_rounds": 0,
        }
    )


def train_client(bundle, task, client: int, rows, start: Params, training, seed: int, best: bool):
    """(delta, the rows of each local batch in order) of one client's local training from ``start``."""
    rows = np.asarray(rows, dtype=np.int64)
    ctx = RoundContext(round=ROUND, seed=seed)
    with dropout_off(bundle.model) if best else contextlib.nullcontext():
        update, _ = client_update(
            bundle, task, ClientJob(client, rows), start, ctx, training, Objective("plain")
        )
    steps = int(update.metrics.get("steps", 1))
    order = batch_order(
        len(rows),
        training.batch_size,
        steps * training.grad_accumulation,
        torch_generator(seed, ROUND, client, "shuffle"),
    )
    used = [rows[np.asarray(p)] for p in order]
    return update.delta, used, steps


def token_rows(task, rows, special: set[int]) -> list[list[int]]:
    """Each row's tokens as the model reads them, special tokens left out."""
    batch = task.batch(task.train, rows, torch.device("cpu"))
    out = []
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
        out.append([int(t) for t, m in zip(ids, mask, strict=True) if m and int(t) not in special])
    return out


def mean_prediction(bundle, task, rows) -> np.ndarray:
    """The mean softmax of the model as sent, on the server's own rows (its estimate of p̄)."""
    model = bundle.model
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            batch = task.eval_batch(task.test, rows, bundle.device)
            probs = torch.softmax(task.logits(model, batch).float(), dim=-1)
    finally:
        model.train(was)
    return probs.mean(0).cpu().numpy()


def head_bias_key(bundle, num_labels: int) -> str | None:
    """The payload key of the classification head's bias (a linear's bias of num_labels outputs)."""
    for key, parameter in bundle.trainable.items():
        if parameter.ndim != 1 or parameter.numel() != num_labels:
            continue
        for module in bundle.model.modules():
            if isinstance(module, nn.Linear) and module.bias is parameter:
                return key
    return None


class InversionAudit:
    """The four settings against one victim client of a built run (bundle, task, data, cfg)."""

    def __init__(
        self, cfg, bundle, task, data, start: Params, victim: int = 0, batch: int = 1, tau: float = 0.05
    ):
        self.cfg, self.bundle, self.task, self.data = cfg, bundle, task, data
        self.start, self.victim, self.batch, self.tau = start, victim, batch, tau
        self.special = set(getattr(bundle.tokenizer, "all_special_ids", []) or [])
        self.classify = hasattr(task, "logits") and getattr(task, "num_labels", None)
        probe_rows = np.asarray(data.client_train[victim][:1])
        probe = task.batch(task.train, probe_rows, bundle.device)
        inputs = {k: v for k, v in probe.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        self.linears = dager.linears_in_call_order(bundle.model, bundle.trainable, inputs)
        self.encoder = "token_type_ids" in getattr(bundle.tokenizer, "model_input_names", [])
        self.first_layer, self.next_layer = self._layers(inputs)

    def _layers(self, inputs) -> tuple[list, tuple[str, nn.Module] | None]:
        """The trainable linears that read the first input (layer 0's query, key, value, or their
        LoRA A factors), and the first one of the same width that reads another (the next layer's;
        a LoRA B factor reads r-wide vectors and is passed over)."""
        if not self.linears:
            return [], None
        first = dager.inputs_at(self.bundle.model, self.linears[0][1], inputs)
        group, following = [self.linears[0]], None
        for key, module in self.linears[1:]:
            x = dager.inputs_at(self.bundle.model, module, inputs)
            if x.shape != first.shape:
                continue
            if torch.allclose(x, first):
                group.append((key, module))
            elif following is None:
                following = (key, module)
        return group, following

    def victim_rows(self, best: bool) -> np.ndarray:
        rows = np.asarray(self.data.client_train[self.victim])
        return rows[: self.batch] if best else rows

    def run(self, settings: list[Setting], seed: int = 0, progress=None) -> list[dict]:
        results = []
        for setting in settings:
            if progress:
                progress(f"inversion: {setting.name}")
            results.append(self.one(setting, seed))
        return results

    def one(self, setting: Setting, seed: int) -> dict:
        training = self.cfg.training
        trained = best_training(training, self.batch) if setting.best else training
        start = self._start(setting.start, seed)
        delta, used, steps = train_client(
            self.bundle,
            self.task,
            self.victim,
            self.victim_rows(setting.best),
            start,
            trained,
            seed,
            setting.best,
        )
        seen = dict(delta)
        for other in range(1, setting.clients):  # the secure-aggregation sum: others' best-case updates
            k = (self.victim + other) % self.data.num_clients
            rows = np.asarray(self.data.client_train[k])[: self.batch]
            theirs, _, _ = train_client(self.bundle, self.task, k, rows, start, trained, seed, True)
            seen = {key: seen[key] + theirs[key] for key in seen}
        if setting.epsilon is not None:
            seen = self._dp_view(seen, setting.epsilon, seed)
        used_rows = np.concatenate(used)
        result = {"setting": setting.name, "steps": steps, "rows": int(len(used_rows))}
        result.update(self._tokens(seen, used_rows, steps * trained.batch_size * setting.clients))
        if self.classify:
            lr = round_lr(trained, ROUND)
            result.update(self._labels(seen, used_rows, lr, trained.batch_size, steps))
        return result

    def _start(self, which: str, seed: int) -> Params:
        """The model the victim starts from: the round-2 global state, round 1's (B = 0), or a
        malicious server's crafted one."""
        if which == "global":
            return self.start
        if which == "round 1":
            return round_one(self.start)
        if which == "crafted":
            return crafted(self.start, seed)
        raise ValueError(f"unknown inversion start {which!r} (global, round 1, crafted)")

    def _dp_view(self, delta: Params, epsilon: float, seed: int) -> Params:
        from fedfm.audit.canaries import central_plan

        dim = sum(v.numel() for v in delta.values())
        plan = central_plan(self.cfg, self.data.num_clients, dim, epsilon)
        c = plan.cfg.clip_norm
        clipped, _ = dp.clip(delta, c)
        noise = dp.gaussian_like(clipped, plan.z_delta * c, torch_generator(seed, "audit-dp"))
        return {k: (clipped[k] + noise[k]) / plan.cohort for k in clipped}

    def _tokens(self, seen: Params, used_rows, max_inputs: int) -> dict:
        if not self.linears:
            return {"token_attack": "no trainable linear layer in the update"}
        # of the first layer's linears, the one whose update is strongest (a random-init query's
        # gradient is second-order small and drowns in float32 rounding; the value's is not)
        key, module = max(self.first_layer, key=lambda e: float(seen[e[0]].double().norm()))
        tokenizer, model = self.bundle.tokenizer, self.bundle.model
        length = self.cfg.model.max_length
        truth = token_rows(self.task, np.unique(used_rows), self.special)
        pad = {tokenizer.pad_token_id} if tokenizer.pad_token_id is not None else set()
        found = dager.recover_tokens(
            model, module, seen[key].float(), len(tokenizer), length, max_rank=max_inputs * length,
            tau=self.tau, skip=frozenset(pad), encoder=self.encoder,
        )  # fmt: skip
        full = found.rank >= found.width  # the span is the whole input space: the test tells nothing
        recovered = set() if full else found.tokens - self.special
        if full:
            text = []
        elif found.positional:
            text = [t for t in found.ordered if t not in self.special]
        elif self.next_layer is not None and not self.encoder:
            nkey, nmodule = self.next_layer
            start = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
            grown = dager.extend_causal(
                model, nmodule, seen[nkey].float(), found.tokens, length, max_inputs * length, self.tau, start
            )
            text = [t for t in grown if t not in self.special]
        else:
            text = []
        precision, recall = set_precision_recall({t for row in truth for t in row}, recovered)
        return {
            "attacked_key": key,
            "span_rank": found.rank,
            "input_width": found.width,
            "span_full": full,
            "token_precision": precision,
            "token_recall": recall,
            "tokens_recovered": len(recovered),
            "rouge_l": best_rouge_l(truth, [text]) if text else 0.0,
            "recovered_text": tokenizer.decode(text)[:200] if text else "",
        }

    def _labels(self, seen: Params, used_rows, lr: float, batch_size: int, steps: int) -> dict:
        key = head_bias_key(self.bundle, self.task.num_labels)
        if key is None:
            return {"label_attack": "the head's bias is not in the update"}
        server_rows = np.arange(min(256, len(self.task.test)))
        p_bar = mean_prediction(self.bundle, self.task, server_rows)
        estimate = label_counts(seen[key].double().cpu().numpy(), lr, batch_size, p_bar, steps)
        labels = np.asarray(self.task.train.labels)[used_rows]
        true = np.bincount(labels, minlength=self.task.num_labels).astype(float)
        total = estimate.sum()
        scaled = estimate * (true.sum() / total) if total > 0 else estimate
        return {
            "label_count_error": label_count_error(true, scaled),
            "label_counts_true": true.astype(int).tolist(),
            "label_counts_estimated": np.round(scaled, 2).tolist(),
        }


def warm_start(bundle, task, data, cfg, seed: int = 0) -> Params:
    """A round-2 global state from a round-1 one whose LoRA B factors are zero: the global state
    after one client (the last) trained round 1 with the run's settings."""
    from fedfm.models.state import get_trainable_state

    start = copy.deepcopy(get_trainable_state(bundle.trainable))
    if not any("lora_B" in k and not torch.count_nonzero(v) for k, v in start.items()):
        return start
    k = data.num_clients - 1
    delta, _, _ = train_client(bundle, task, k, data.client_train[k], start, cfg.training, seed, best=False)
    return {key: start[key] + delta[key] for key in start}
