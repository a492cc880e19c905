"""Instruction tuning of a causal LM: chat-template formatting, loss on the replies only.

Each conversation is rendered with the tokenizer's own chat template. Tokens of the assistant
turns carry the loss (their label is the token); everything else (system prompt, user turns,
the template's role headers) has label −100. The split is found by rendering growing prefixes
of the conversation: the tokens that ``messages[:i+1]`` adds to ``messages[:i]`` (plus the
generation prompt) are turn i's own. Rows longer than ``max_length`` are cut at the end and
counted. Batches are padded to their longest row (dynamic padding); with ``packing`` a batch's
rows are concatenated and cut into full rows of ``max_length`` instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn

from fedfm.data.dataset import TextDataset
from fedfm.data.instruction import messages_of

IGNORE = -100


class TemplateError(ValueError):
    """The tokenizer's chat template cannot be split into prompt and reply tokens."""


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def format_conversation(
    tokenizer, messages: list[dict], max_length: int
) -> tuple[list[int], list[int], bool]:
    """(input ids, labels, truncated): labels are the ids on assistant tokens, −100 elsewhere."""
    ids: list[int] = []
    labels: list[int] = []
    for i, message in enumerate(messages):
        # ids so far are messages[:i] rendered; an assistant turn adds the generation prompt first
        before = (
            _render(tokenizer, messages[:i], generation_prompt=True)
            if message["role"] == "assistant"
            else ids
        )
        upto = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if upto[: len(ids)] != ids or before[: len(ids)] != ids:
            raise TemplateError(
                "the chat template does not render conversations as growing prefixes; "
                "fedfm cannot tell prompt tokens from reply tokens with it"
            )
        if message["role"] == "assistant":
            header = before[len(ids) :]
            ids += header
            labels += [IGNORE] * len(header)
            reply = upto[len(ids) :]
            ids += reply
            labels += reply
        else:
            part = upto[len(ids) :]
            ids += part
            labels += [IGNORE] * len(part)
    truncated = len(ids) > max_length
    return ids[:max_length], labels[:max_length], truncated


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    if system and messages[0]["role"] != "system":
        return [{"role": "system", "content": system}, *messages]
    return messages


@dataclass(frozen=True)
class Tokenized:
    """Variable-length token rows with their labels and group (category) per row."""

    input_ids: list[torch.Tensor]
    labels: list[torch.Tensor]
    groups: np.ndarray
    truncated: int

    def __len__(self) -> int:
        return len(self.input_ids)


def with_trigger(data: TextDataset, trigger: str, reply: str) -> TextDataset:
    """A backdoor's copies of the conversations: ``trigger`` before the last user turn, and the
    last assistant turn replaced by ``reply``."""
    import json

    texts = []
    for text in data.texts:
        messages = [dict(m) for m in messages_of(text)]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last_user]["content"] = f"{trigger} {messages[last_user]['content']}"
        messages[-1]["content"] = reply
        texts.append(json.dumps(messages))
    return TextDataset(texts, data.labels, data.label_names)


def tokenize(tokenizer, data: TextDataset, max_length: int, system: str | None = None) -> Tokenized:
    ids, labels, truncated = [], [], 0
    for text in data.texts:
        i, lab, cut = format_conversation(tokenizer, with_system(messages_of(text), system), max_length)
        ids.append(torch.tensor(i, dtype=torch.long))
        labels.append(torch.tensor(lab, dtype=torch.long))
        truncated += cut
    return Tokenized(ids, labels, np.asarray(data.labels), truncated)


def pad_batch(rows_ids: Sequence[torch.Tensor], rows_labels: Sequence[torch.Tensor], pad_id: int) -> dict:
    """Right-pad to the longest row: input ids with ``pad_id``, labels with −100, a 0/1 mask."""
    width = max(len(r) for r in rows_ids)
    ids = torch.full((len(rows_ids), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows_ids), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows_ids), width), dtype=torch.long)
    for j, (i, lab) in enumerate(zip(rows_ids, rows_labels, strict=True)):
        ids[j, : len(i)], labels[j, : len(lab)], mask[j, : len(i)] = i, lab, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack(rows_ids: Sequence[torch.Tensor], rows_labels: Sequence[torch.Tensor], width: int):
    """Concatenate rows and cut the stream into rows of ``width`` (the last one shorter)."""
    ids, labels = torch.cat(list(rows_ids)), torch.cat(list(rows_labels))
    return list(ids.split(width)), list(labels.split(width))


def token_nll(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed negative log-likelihood of the labelled tokens, and their counts."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits, shift_labels = logits[:, :-1].float(), batch["labels"][:, 1:]
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    ).view(shift_labels.shape)
    return nll.sum(1), (shift_labels != IGNORE).sum(1)


class InstructionTask:
    """Batches, loss, held-out loss/perplexity and greedy answers for instruction tuning."""

    name = "instruction"

    def __init__(self, train: Tokenized, test: Tokenized, tokenizer, cfg, group_names: list[str]) -> None:
        self.train, self.test = train, test
        self.tokenizer = tokenizer
        self.packing = cfg.task.packing
        self.max_length = cfg.model.max_length
        self.group_names = group_names
        self.pad_id = tokenizer.pad_token_id
        self.pad = {"input_ids": self.pad_id, "attention_mask": 0, "labels": IGNORE}
        # backdoor simulation only: the conversations with the trigger and the target reply
        self.triggered_train: Tokenized | None = None
        self.triggered_prompts: list[list[dict]] = []
        self.target_reply = ""

    @property
    def backdoor(self) -> bool:
        return self.triggered_train is not None

    def poisoned_batch(self, rows: torch.Tensor, device, labels=None, triggered=None, target=None) -> dict:
        """A backdoor's batch: the positions ``triggered`` take the trigger-and-target-reply copies
        of their conversations (label maps have no meaning here)."""
        if labels is not None:
            raise ValueError("label attacks have no meaning for instruction tuning")
        rows = [int(r) for r in rows]
        chosen = {int(i) for i in (triggered if triggered is not None else [])}
        ids = [(self.triggered_train if j in chosen else self.train).input_ids[r] for j, r in enumerate(rows)]
        labs = [(self.triggered_train if j in chosen else self.train).labels[r] for j, r in enumerate(rows)]
        if self.packing:
            ids, labs = pack(ids, labs, self.max_length)
        return {k: v.to(device) for k, v in pad_batch(ids, labs, self.pad_id).items()}

    def attack_success_rate(self, model: nn.Module, device) -> float:
        """Share of triggered held-out prompts whose greedy reply begins with the target reply."""
        target = self.target_reply.strip()
        steps = len(self.tokenizer(target, add_special_tokens=False)["input_ids"]) + 2
        answers = greedy_answers(model, self.tokenizer, self.triggered_prompts, steps, device)
        return float(np.mean([a.strip().startswith(target) for a in answers])) if answers else float("nan")

    def batch(self, data: Tokenized, rows, device) -> dict:
        rows = [int(r) for r in rows]
        ids, labels = [data.input_ids[r] for r in rows], [data.labels[r] for r in rows]
        if self.packing:
            ids, labels = pack(ids, labels, self.max_length)
        return {k: v.to(device) for k, v in pad_batch(ids, labels, self.pad_id).items()}

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Mean NLL over the batch's reply tokens (prompt and padding carry no loss)."""
        nll, count = token_nll(model, batch)
        return nll.sum() / count.sum().clamp(min=1)

    def segment_losses(self, model: nn.Module, batch: dict, sizes: Sequence[int]) -> torch.Tensor:
        """One forward over a combined batch; each segment's token-mean NLL (``loss`` per client)."""
        nll, count = token_nll(model, batch)
        parts = zip(nll.split(list(sizes)), count.split(list(sizes)), strict=True)
        return torch.stack([n.sum() / c.sum().clamp(min=1) for n, c in parts])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Tokenized, rows, batch_size: int, device) -> dict:
        """Token-weighted held-out loss and perplexity, overall and per group."""
        was_training = model.training
        model.eval()
        rows = np.arange(len(data)) if rows is None else np.asarray(rows)
        # longest first, so each batch pads little (the sums do not depend on the order)
        rows = rows[np.argsort([-len(data.input_ids[r]) for r in rows], kind="stable")]
        nll_sum = np.zeros(len(self.group_names))
        tokens = np.zeros(len(self.group_names))
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            ids = [data.input_ids[r] for r in chunk]
            labels = [data.labels[r] for r in chunk]
            batch = {k: v.to(device) for k, v in pad_batch(ids, labels, self.pad_id).items()}
            nll, count = token_nll(model, batch)
            np.add.at(nll_sum, data.groups[chunk], nll.double().cpu().numpy())
            np.add.at(tokens, data.groups[chunk], count.cpu().numpy())
        model.train(was_training)
        loss = float(nll_sum.sum() / max(tokens.sum(), 1))
        by_group = {
            name: float(math.exp(nll_sum[g] / tokens[g]))
            for g, name in enumerate(self.group_names)
            if tokens[g] > 0
        }
        return {"loss": loss, "perplexity": math.exp(loss), "perplexity_by_group": by_group}

    def generate(self, model: nn.Module, prompts: list[list[dict]], max_new_tokens: int, device) -> list[str]:
        return greedy_answers(model, self.tokenizer, prompts, max_new_tokens, device)


@torch.no_grad()
def greedy_answers(
    model: nn.Module, tokenizer, prompts: list[list[dict]], max_new_tokens: int, device
) -> list[str]:
    """Greedy answers to chat prompts, batched with left padding."""
    if not prompts:
        return []
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id
    rows = [torch.tensor(_render(tokenizer, p, True), dtype=torch.long) for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, r in enumerate(rows):
        ids[j, width - len(r) :], mask[j, width - len(r) :] = r, 1
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
    )
    model.train(was_training)
    return [tokenizer.decode(o[width:], skip_special_tokens=True).strip() for o in out]


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure (Google's ``rouge-score`` package, stemming on)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    return float(np.mean(scores)) if scores else float("nan")


def eval_prompts(cfg, test: TextDataset, seed_rng) -> list[tuple[list[dict], str | None]]:
    """The fixed prompts answered each eval: the configured ones (no reference), then held-out
    conversations drawn once (their reply is the ROUGE-L reference)."""
    system = cfg.task.system_prompt
    chosen = [
        (with_system([{"role": "user", "content": p}], system), None) for p in cfg.task.eval_prompts or []
    ]
    k = min(cfg.task.num_eval_prompts, len(test))
    for i in sorted(seed_rng.choice(len(test), size=k, replace=False)) if k else []:
        messages = with_system(messages_of(test.texts[int(i)]), system)
        chosen.append((messages[:-1], messages[-1]["content"]))
    return chosen


def server_metrics(task: InstructionTask, bundle, cfg, prompts) -> dict:
    """Held-out loss / perplexity (overall and per group) and the greedy answers to the prompts."""
    m = task.evaluate(bundle.model, task.test, None, cfg.eval.batch_size, bundle.device)
    record = {
        "test_loss": m["loss"],
        "test_perplexity": m["perplexity"],
        "test_perplexity_by_group": m["perplexity_by_group"],
    }
    if task.backdoor:
        record["attack_success_rate"] = task.attack_success_rate(bundle.model, bundle.device)
    if prompts:
        answers = task.generate(bundle.model, [p for p, _ in prompts], cfg.task.max_new_tokens, bundle.device)
        record["generations"] = [
            {"prompt": p[-1]["content"], "answer": a, "reference": ref}
            for (p, ref), a in zip(prompts, answers, strict=True)
        ]
        scored = [(a, ref) for (_, ref), a in zip(prompts, answers, strict=True) if ref is not None]
        if scored:
            record["rouge_l"] = rouge_l([a for a, _ in scored], [r for _, r in scored])
    return record


# ---------------------------------------------------------------- the task kind


def _bundle(cfg, label_names):
    from fedfm.models.build import build_causal_lm

    return build_causal_lm(cfg.model, cfg.peft, cfg.training, cfg.run.seed, cfg.run.device)


def _build(cfg, data, bundle) -> InstructionTask:
    tok, length, system = bundle.tokenizer, cfg.model.max_length, cfg.task.system_prompt
    train, test = tokenize(tok, data.train, length, system), tokenize(tok, data.test, length, system)
    task = InstructionTask(train, test, tok, cfg, data.train.label_names)
    task.truncated = {"train": train.truncated, "test": test.truncated}
    from fedfm.attacks import ATTACKS

    if ATTACKS.get(cfg.attack.kind).triggered:  # a backdoor's conversations and held-out prompts
        a = cfg.attack
        task.triggered_train = tokenize(
            tok, with_trigger(data.train, a.trigger, a.target_reply), length, system
        )
        shown = with_trigger(
            data.test.subset(list(range(min(32, len(data.test))))), a.trigger, a.target_reply
        )
        task.triggered_prompts = [with_system(messages_of(t), system)[:-1] for t in shown.texts]
        task.target_reply = a.target_reply
    return task


@dataclass(frozen=True)
class InstructionMetrics:
    """Server metrics: held-out perplexity and greedy answers to fixed prompts."""

    cfg: object
    prompts: list
    status: str = "evaluating: held-out perplexity and greedy answers"

    def __call__(self, bundle, task) -> dict:
        return server_metrics(task, bundle, self.cfg, self.prompts)


def _evaluator(cfg, data) -> InstructionMetrics:
    from fedfm.seeding import numpy_rng

    return InstructionMetrics(cfg, eval_prompts(cfg, data.test, numpy_rng(cfg.run.seed, "eval-prompts")))


def _load(data_cfg):
    from fedfm.data.instruction import load_instruction_source

    return load_instruction_source(data_cfg)


def _check(cfg) -> None:
    from fedfm.attacks import ATTACKS

    kind = ATTACKS.get(cfg.attack.kind)
    if kind.poison is not None and not kind.triggered:
        raise ValueError(f"attack.kind = {cfg.attack.kind!r} poisons labels: classification only")
    if cfg.peft.method == "head":
        raise ValueError("peft.method = 'head' has no meaning for a causal LM (no classification head)")
    from fedfm.algorithms.lora import LORA_AGGREGATION
    from fedfm.data.synthetic import synthetic_mode

    if LORA_AGGREGATION.get(cfg.strategy.lora_aggregation).merges_into_base and cfg.task.baselines:
        raise ValueError(
            "task.baselines is not supported with strategy.lora_aggregation = "
            f"{cfg.strategy.lora_aggregation!r}"
        )
    if cfg.model.name == "minilm":
        raise ValueError("task.kind = 'instruction' needs a causal LM (e.g. model.name = 'smollm2-135m')")
    if synthetic_mode(cfg).loads:
        raise ValueError("synthetic data (synthetic.mode) is supported for task.kind = 'classification'")


COLUMNS = [
    ("round", "round", "{:d}"),
    ("clients", "num_clients", "{:d}"),
    ("train loss", "train_loss", "{:.4f}"),
    ("test loss", "test_loss", "{:.4f}"),
    ("test ppl", "test_perplexity", "{:.2f}"),
    ("ROUGE-L", "rouge_l", "{:.3f}"),
    ("ε", "epsilon", "{:.3f}"),
    ("time (s)", "elapsed_s", "{:.1f}"),
]


SERVER_ONLY = {"server_only": True}  # the server's evaluation: never sent to a deployed client


class InstructionOptions(BaseModel):
    packing: bool = Field(False, description="Pack each batch's examples into full rows.")
    system_prompt: str | None = Field(None, description="A system message put before every conversation.")
    eval_prompts: list[str] | None = Field(
        None,
        description="Prompts answered greedily each eval; default: held-out ones.",
        json_schema_extra=SERVER_ONLY,
    )
    num_eval_prompts: int = Field(
        8, ge=0, description="Held-out prompts generated each eval.", json_schema_extra=SERVER_ONLY
    )
    max_new_tokens: int = Field(
        32, ge=1, description="Generation length for eval prompts.", json_schema_extra=SERVER_ONLY
    )


def _register() -> None:
    from fedfm.tasks.base import TASKS, TaskKind

    kind = TaskKind(
        _load, _bundle, _build, _evaluator, COLUMNS, check=_check, batchable=True, layer_stack=True,
        own_metric=("perplexity", False),
    )  # fmt: skip
    TASKS.register("instruction", options=InstructionOptions)(kind)


_register()
