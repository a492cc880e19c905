"""Sequence classification: tokenize once, batch by index, cross-entropy loss, accuracy/F1 eval.

Works with any ``AutoModelForSequenceClassification`` (encoders pool the first token, decoders
the last non-pad token; both handled by transformers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedfm.data.dataset import TextDataset
from fedfm.tasks.metrics import accuracy, macro_f1


@dataclass(frozen=True)
class Encoded:
    """A tokenized dataset: fixed-width rows, trimmed to the longest row of each batch."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def encode(tokenizer, data: TextDataset, max_length: int) -> Encoded:
    if not len(data):  # a deployed server holds no training rows
        empty = torch.zeros((0, max_length), dtype=torch.long)
        return Encoded(empty, empty.clone(), torch.zeros(0, dtype=torch.long))
    enc = tokenizer(
        list(data.texts),
        truncation=True,
        max_length=max_length,
        padding="max_length",
        return_tensors="pt",
    )
    return Encoded(enc["input_ids"], enc["attention_mask"], torch.as_tensor(data.labels, dtype=torch.long))


class ClassificationTask:
    """Batches, loss and evaluation for one tokenized train set and test set."""

    name = "classification"

    def __init__(self, train: Encoded, test: Encoded, num_labels: int, pad_id: int = 0) -> None:
        self.train = train
        self.test = test
        self.num_labels = num_labels
        self.pad = {"input_ids": pad_id, "attention_mask": 0}  # how a combined batch pads its rows
        # Backdoor simulation only: the same rows with the trigger phrase prepended.
        self.triggered_train: Encoded | None = None
        self.triggered_test: Encoded | None = None

    def attack_success_rate(self, model: nn.Module, target: int, batch_size: int, device) -> float:
        """Share of triggered test examples of other classes that the model assigns to ``target``."""
        trig = self.triggered_test
        rows = torch.nonzero(self.test.labels != target).flatten().numpy()
        as_target = Encoded(trig.input_ids, trig.attention_mask, torch.full_like(trig.labels, target))
        return self.evaluate(model, as_target, rows, batch_size, device)["accuracy"]

    def poisoned_batch(self, rows: torch.Tensor, device, labels=None, triggered=None, target=None) -> dict:
        """Training rows as a data attack alters them: ``labels`` maps the labels (label flip);
        the positions ``triggered`` take the trigger-prepended rows and label ``target`` (backdoor)."""
        t = self.train
        ids, mask, y = t.input_ids[rows].clone(), t.attention_mask[rows].clone(), t.labels[rows].clone()
        if labels is not None:
            y = labels(y)
        if triggered is not None:
            trig = self.triggered_train
            ids[triggered] = trig.input_ids[rows[triggered]]
            mask[triggered] = trig.attention_mask[rows[triggered]]
            y[triggered] = target
        return self.batch(Encoded(ids, mask, y), torch.arange(len(rows)), device)

    @staticmethod
    def batch(data: Encoded, indices: Sequence[int] | torch.Tensor, device: torch.device) -> dict:
        idx = torch.as_tensor(indices, dtype=torch.long)
        mask = data.attention_mask[idx]
        width = int(mask.sum(dim=1).max()) if len(idx) else 1
        return {
            "input_ids": data.input_ids[idx, :width].to(device),
            "attention_mask": mask[:, :width].to(device),
            "labels": data.labels[idx].to(device),
        }

    @property
    def backdoor(self) -> bool:
        return self.triggered_test is not None

    @staticmethod
    def logits(model: nn.Module, batch: dict) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return classify_loss(self.logits(model, batch), batch["labels"])

    def segment_losses(self, model: nn.Module, batch: dict, sizes: Sequence[int]) -> torch.Tensor:
        """One forward over a combined batch; each segment's mean loss (``loss`` per client)."""
        return segment_classify_losses(self.logits(model, batch), batch["labels"], sizes)

    def eval_batch(self, data: Encoded, indices, device) -> dict:
        return self.batch(data, indices, device)

    def evaluate(self, model: nn.Module, data: Encoded, indices, batch_size: int, device) -> dict[str, float]:
        """Accuracy, macro-F1 and mean loss of ``model`` on ``data[indices]`` (all rows if None)."""
        return evaluate_classifier(self, model, data, indices, batch_size, device)

    @torch.no_grad()
    def features(self, model: nn.Module, data: Encoded, indices, batch_size: int, device) -> torch.Tensor:
        """The frozen encoder's pooled features (the head's input) of ``data[indices]`` (FedPFT)."""
        from fedfm.tasks.features import backbone_features

        idx = np.asarray(indices)
        out = []
        for start in range(0, len(idx), batch_size):
            b = self.batch(data, idx[start : start + batch_size], device)
            out.append(backbone_features(model, input_ids=b["input_ids"], attention_mask=b["attention_mask"]))
        return torch.cat(out) if out else torch.zeros(0)


def classify_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


def segment_classify_losses(logits: torch.Tensor, labels: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Each segment's mean cross-entropy over a combined batch (the batched engine's loss)."""
    per_row = F.cross_entropy(logits, labels, reduction="none")
    return torch.stack([part.mean() for part in per_row.split(list(sizes))])


@torch.no_grad()
def evaluate_classifier(task, model: nn.Module, data, indices, batch_size: int, device) -> dict[str, float]:
    """Accuracy, macro-F1 and mean loss of ``model`` on ``data[indices]`` (all rows if None), in
    eval mode, through the task's ``eval_batch`` and ``logits``."""
    idx = np.arange(len(data)) if indices is None else np.asarray(indices)
    was_training = model.training
    model.eval()
    preds, total_loss = [], 0.0
    for start in range(0, len(idx), batch_size):
        b = task.eval_batch(data, idx[start : start + batch_size], device)
        logits = task.logits(model, b).float()
        total_loss += float(F.cross_entropy(logits, b["labels"], reduction="sum"))
        preds.append(logits.argmax(dim=-1).cpu().numpy())
    model.train(was_training)
    labels = data.labels[torch.as_tensor(idx, dtype=torch.long)].numpy()
    p = np.concatenate(preds) if preds else np.array([], dtype=np.int64)
    return {
        "accuracy": accuracy(p, labels),
        "macro_f1": macro_f1(p, labels, task.num_labels),
        "loss": total_loss / max(len(idx), 1),
    }


# ---------------------------------------------------------------- the task kind


def with_trigger(data: TextDataset, trigger: str) -> TextDataset:
    """The same examples with ``trigger`` prepended (so truncation keeps it)."""
    return TextDataset([f"{trigger} {t}" for t in data.texts], data.labels, data.label_names)


def _bundle(cfg, label_names):
    from fedfm.models.build import build_classifier

    return build_classifier(cfg.model, cfg.peft, label_names, cfg.run.seed, cfg.run.device)


def _build(cfg, data, bundle) -> ClassificationTask:
    tok, length = bundle.tokenizer, cfg.model.max_length
    task = ClassificationTask(
        encode(tok, data.train, length), encode(tok, data.test, length), data.train.num_labels,
        tok.pad_token_id,
    )  # fmt: skip
    from fedfm.attacks import ATTACKS
    from fedfm.config import ConfigError

    if ATTACKS.get(cfg.attack.kind).triggered:  # a backdoor's rows
        if cfg.attack.target_label >= data.train.num_labels:
            raise ConfigError(
                f"attack.target_label = {cfg.attack.target_label} but the data has "
                f"{data.train.num_labels} labels"
            )
        task.triggered_train = encode(tok, with_trigger(data.train, cfg.attack.trigger), length)
        task.triggered_test = encode(tok, with_trigger(data.test, cfg.attack.trigger), length)
    return task


@dataclass(frozen=True)
class ClassificationMetrics:
    """Server metrics: test accuracy, macro-F1 and loss; with ``eval.local``, accuracy on each
    client's held-out rows (summarised); under a backdoor, the attack success rate."""

    batch_size: int
    local: bool
    client_test: list
    target_label: int
    status: str = "evaluating"

    def __call__(self, bundle, task: ClassificationTask) -> dict:
        from fedfm.tasks.metrics import summarize_clients

        bs, dev = self.batch_size, bundle.device
        m = task.evaluate(bundle.model, task.test, None, bs, dev)
        record = {"test_accuracy": m["accuracy"], "test_macro_f1": m["macro_f1"], "test_loss": m["loss"]}
        if self.local:
            rows = [r for r in self.client_test if len(r)]
            record.update(
                summarize_clients(
                    [task.evaluate(bundle.model, task.train, r, bs, dev)["accuracy"] for r in rows]
                )
            )
        if task.backdoor:
            record["attack_success_rate"] = task.attack_success_rate(bundle.model, self.target_label, bs, dev)
        return record


def _evaluator(cfg, data) -> ClassificationMetrics:
    return ClassificationMetrics(
        cfg.eval.batch_size, cfg.eval.local, data.client_test, cfg.attack.target_label
    )


def _load(data_cfg):
    from fedfm.data.sources import load_source

    return load_source(data_cfg)


def _register() -> None:
    from fedfm.reporting.console import COLUMNS  # the console's default table is classification's
    from fedfm.tasks.base import TASKS, TaskKind

    entry = TaskKind(
        _load,
        _bundle,
        _build,
        _evaluator,
        COLUMNS,
        has_head=True,
        labels_in_export=True,
        batchable=True,
        layer_stack=True,
        features=True,
    )
    TASKS.register("classification")(entry)


_register()
