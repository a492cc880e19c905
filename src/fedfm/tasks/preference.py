"""Preference alignment of a causal LM (``task.kind = "preference"``): DPO or IPO on pairs.

Each pair is a prompt with a chosen and a rejected reply. Both replies are rendered with the
tokenizer's chat template after the prompt (``format_conversation``): only the reply's tokens
carry labels, so log π(y|x) sums over the reply tokens alone. A training batch holds the chosen
rows then the rejected rows of its pairs in one padded forward.

The **reference** π_ref is the starting policy: the model with its adapter switched off (PEFT's
``disable_adapter()``, no second copy of the FM). That is the base FM, or, with
``task.reference_adapter``, the SFT model: the adapter of an earlier run (federated instruction
tuning, say) merged into the base weights before the new adapter is added, so it is both where
the policy starts and what it is measured against. π_ref never changes during a run, so its
log-probs are computed once, when the task is built, for every pair (train and test).

The loss (``algorithms.preference``): DPO −log σ(β·h) or IPO (h − 1/(2β))², plus optionally
``task.sft_weight`` × the chosen replies' token-mean NLL. Held-out metrics: the preference loss,
reward accuracy (share of pairs with r_w > r_l) and reward margin, overall and per group, and
greedy answers to a few held-out prompts each evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from fedfm.algorithms.preference import IGNORE, PREFERENCE_LOSSES, reward_metrics, sequence_logprobs
from fedfm.data.dataset import TextDataset
from fedfm.data.preference import pair_of
from fedfm.tasks.instruction import (
    InstructionOptions,
    format_conversation,
    greedy_answers,
    pad_batch,
    with_system,
)


@dataclass(frozen=True)
class Pairs:
    """Tokenized pairs: chosen and rejected rows, each pair's group, the prompts, and π_ref's
    log-probs of (chosen, rejected) per pair (filled when the task is built)."""

    chosen_ids: list[torch.Tensor]
    chosen_labels: list[torch.Tensor]
    rejected_ids: list[torch.Tensor]
    rejected_labels: list[torch.Tensor]
    groups: np.ndarray
    prompts: list[list[dict]]
    references: list[tuple[str, str]]  # (chosen, rejected) texts
    truncated: int
    reference_logps: torch.Tensor | None = None  # (n, 2)

    def __len__(self) -> int:
        return len(self.chosen_ids)


def tokenize_pairs(tokenizer, data: TextDataset, max_length: int, system: str | None = None) -> Pairs:
    rows = {"chosen_ids": [], "chosen_labels": [], "rejected_ids": [], "rejected_labels": []}
    prompts, texts, truncated = [], [], 0
    for text in data.texts:
        pair = pair_of(text)
        prompt = with_system(pair["prompt"], system)
        for side in ("chosen", "rejected"):
            messages = [*prompt, {"role": "assistant", "content": pair[side]}]
            ids, labels, cut = format_conversation(tokenizer, messages, max_length)
            rows[f"{side}_ids"].append(torch.tensor(ids, dtype=torch.long))
            rows[f"{side}_labels"].append(torch.tensor(labels, dtype=torch.long))
            truncated += cut
        prompts.append(prompt)
        texts.append((pair["chosen"], pair["rejected"]))
    return Pairs(
        **rows, groups=np.asarray(data.labels), prompts=prompts, references=texts, truncated=truncated
    )


def pair_batch(data: Pairs, rows: Sequence[int], pad_id: int) -> dict:
    """The chosen rows then the rejected rows of ``rows`` in one padded batch, with π_ref's
    log-probs (``ref``: (len(rows), 2))."""
    rows = [int(r) for r in rows]
    ids = [data.chosen_ids[r] for r in rows] + [data.rejected_ids[r] for r in rows]
    labels = [data.chosen_labels[r] for r in rows] + [data.rejected_labels[r] for r in rows]
    batch = pad_batch(ids, labels, pad_id)
    if data.reference_logps is not None:
        batch["ref"] = data.reference_logps[rows]
    return batch


def policy_logps(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(chosen|x), log π(rejected|x) per pair: sums over the reply tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = sequence_logprobs(logits, batch["labels"])
    n = logps.shape[0] // 2
    return logps[:n], logps[n:]


def reference_off(model: nn.Module):
    """π_ref: the model with its adapter switched off (the base FM, or the merged SFT model)."""
    if hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    raise ValueError("task.kind = 'preference' needs a PEFT adapter (peft.method), whose base is π_ref")


@torch.no_grad()
def reference_logps(model: nn.Module, data: Pairs, pad_id: int, batch_size: int, device) -> torch.Tensor:
    """π_ref's (chosen, rejected) log-probs of every pair, in eval mode."""
    was_training = model.training
    model.eval()
    out = torch.zeros(len(data), 2, dtype=torch.float32)
    with reference_off(model):
        for start in range(0, len(data), batch_size):
            rows = list(range(start, min(start + batch_size, len(data))))
            batch = {k: v.to(device) for k, v in pair_batch(data, rows, pad_id).items()}
            chosen, rejected = policy_logps(model, batch)
            out[rows, 0], out[rows, 1] = chosen.float().cpu(), rejected.float().cpu()
    model.train(was_training)
    return out


class PreferenceTask:
    """Batches, the DPO/IPO loss, held-out preference metrics and greedy answers."""

    name = "preference"

    def __init__(self, train: Pairs, test: Pairs, tokenizer, cfg, group_names: list[str]) -> None:
        self.train, self.test, self.tokenizer = train, test, tokenizer
        self.group_names = group_names
        self.pad_id = tokenizer.pad_token_id
        self.beta, self.sft_weight = cfg.task.beta, cfg.task.sft_weight
        self.objective = PREFERENCE_LOSSES[cfg.task.preference_loss]

    def batch(self, data: Pairs, rows, device) -> dict:
        return {k: v.to(device) for k, v in pair_batch(data, rows, self.pad_id).items()}

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        chosen, rejected = policy_logps(model, batch)
        ref = batch["ref"]
        loss = self.objective(chosen, rejected, ref[:, 0], ref[:, 1], self.beta)
        if self.sft_weight:
            n = chosen.shape[0]
            tokens = (batch["labels"][:n, 1:] != IGNORE).sum().clamp(min=1)
            loss = loss + self.sft_weight * (-chosen.sum() / tokens)
        return loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Pairs, rows, batch_size: int, device) -> dict:
        """Held-out preference loss, reward accuracy and margin: overall and per group."""
        was_training = model.training
        model.eval()
        rows = np.arange(len(data)) if rows is None else np.asarray(rows)
        chosen, rejected = torch.zeros(len(rows)), torch.zeros(len(rows))
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            c, r = policy_logps(model, self.batch(data, chunk, device))
            chosen[start : start + len(chunk)], rejected[start : start + len(chunk)] = c.cpu(), r.cpu()
        model.train(was_training)
        ref = data.reference_logps[rows]
        if not len(rows):
            return {"loss": float("nan"), "reward_accuracy": float("nan"), "reward_margin": float("nan")}
        out = {"loss": float(self.objective(chosen, rejected, ref[:, 0], ref[:, 1], self.beta))}
        out.update(reward_metrics(chosen, rejected, ref[:, 0], ref[:, 1], self.beta))
        groups = data.groups[rows]
        by_group = {"loss": {}, "reward_accuracy": {}, "reward_margin": {}}
        for g, name in enumerate(self.group_names):
            mine = torch.from_numpy(groups == g)
            if mine.any():
                c, r, rc, rr = chosen[mine], rejected[mine], ref[mine, 0], ref[mine, 1]
                m = {
                    "loss": float(self.objective(c, r, rc, rr, self.beta)),
                    **reward_metrics(c, r, rc, rr, self.beta),
                }
                for key in by_group:
                    by_group[key][name] = m[key]
        out.update({f"{key}_by_group": values for key, values in by_group.items()})
        return out

    def generate(self, model: nn.Module, prompts: list[list[dict]], max_new_tokens: int, device) -> list[str]:
        return greedy_answers(model, self.tokenizer, prompts, max_new_tokens, device)


# ---------------------------------------------------------------- the task kind


def merge_reference_adapter(model: nn.Module, folder: str) -> nn.Module:
    """The SFT model as π_ref: an exported adapter merged into the base weights."""
    from pathlib import Path

    from peft import PeftModel

    if not (Path(folder) / "adapter_config.json").is_file():
        raise ValueError(
            f"task.reference_adapter = {folder!r} is not an adapter folder (no adapter_config.json); "
            "give the 'adapter' folder of an earlier run"
        )
    return PeftModel.from_pretrained(model, folder).merge_and_unload()


def _bundle(cfg, label_names):
    from fedfm.models.build import build_causal_lm

    base = None
    if cfg.task.reference_adapter:
        base = lambda model: merge_reference_adapter(model, cfg.task.reference_adapter)  # noqa: E731
    return build_causal_lm(cfg.model, cfg.peft, cfg.training, cfg.run.seed, cfg.run.device, before_peft=base)


def _build(cfg, data, bundle) -> PreferenceTask:
    from dataclasses import replace

    tok, length, system = bundle.tokenizer, cfg.model.max_length, cfg.task.system_prompt
    pad, bs, dev = tok.pad_token_id, cfg.eval.batch_size, bundle.device
    train, test = (
        tokenize_pairs(tok, data.train, length, system),
        tokenize_pairs(tok, data.test, length, system),
    )
    train = replace(train, reference_logps=reference_logps(bundle.model, train, pad, bs, dev))
    test = replace(test, reference_logps=reference_logps(bundle.model, test, pad, bs, dev))
    task = PreferenceTask(train, test, tok, cfg, data.train.label_names)
    task.truncated = {"train": train.truncated, "test": test.truncated}
    return task


def server_metrics(task: PreferenceTask, bundle, cfg, prompts: list[int]) -> dict:
    m = task.evaluate(bundle.model, task.test, None, cfg.eval.batch_size, bundle.device)
    record = {
        "test_loss": m["loss"],
        "test_reward_accuracy": m["reward_accuracy"],
        "test_reward_margin": m["reward_margin"],
        "test_reward_accuracy_by_group": m["reward_accuracy_by_group"],
        "test_reward_margin_by_group": m["reward_margin_by_group"],
        "test_loss_by_group": m["loss_by_group"],
    }
    if prompts:
        asked = [task.test.prompts[i] for i in prompts]
        answers = task.generate(bundle.model, asked, cfg.task.max_new_tokens, bundle.device)
        record["generations"] = [
            {"prompt": p[-1]["content"], "answer": a, "reference": task.test.references[i][0]}
            for i, p, a in zip(prompts, asked, answers, strict=True)
        ]
    return record


@dataclass(frozen=True)
class PreferenceMetrics:
    cfg: object
    prompts: list
    status: str = "evaluating: held-out DPO loss, reward accuracy and greedy answers"

    def __call__(self, bundle, task) -> dict:
        return server_metrics(task, bundle, self.cfg, self.prompts)


def _evaluator(cfg, data) -> PreferenceMetrics:
    from fedfm.seeding import numpy_rng

    k = min(cfg.task.num_eval_prompts, len(data.test))
    rng = numpy_rng(cfg.run.seed, "eval-prompts")
    return PreferenceMetrics(cfg, sorted(int(i) for i in rng.choice(len(data.test), size=k, replace=False)))


def _load(data_cfg):
    from fedfm.data.preference import load_preference_source

    return load_preference_source(data_cfg)


def _check(cfg) -> None:
    from fedfm.algorithms.lora import LORA_AGGREGATION
    from fedfm.attacks import ATTACKS
    from fedfm.data.synthetic import synthetic_mode
    from fedfm.privacy.guarantees import dp_mode
    from fedfm.registry import registry_for

    who = "task.kind = 'preference'"
    if cfg.peft.method in ("head", "full"):
        raise ValueError(f"{who} needs a PEFT adapter (peft.method = 'lora', ...): π_ref is its base")
    if ATTACKS.get(cfg.attack.kind).poison is not None:
        raise ValueError(f"attack.kind = {cfg.attack.kind!r} poisons labels: classification only")
    if cfg.task.packing:
        raise ValueError(f"{who}: task.packing would mix the chosen and rejected replies of pairs")
    if LORA_AGGREGATION.get(cfg.strategy.lora_aggregation).merges_into_base:
        raise ValueError(
            f"{who}: strategy.lora_aggregation = {cfg.strategy.lora_aggregation!r} merges into the base "
            "weights, which would move π_ref; use 'naive' or 'zero_padding'"
        )
    if cfg.model.name == "minilm":
        raise ValueError(f"{who} needs a causal LM (e.g. model.name = 'smollm2-135m')")
    if synthetic_mode(cfg).loads or registry_for("sharing mode").get(cfg.sharing.mode).changes_model:
        raise ValueError(f"{who}: synthetic.mode and sharing.mode are not built for preference pairs")
    if dp_mode(cfg).example_level:
        raise ValueError(
            f"{who} with privacy.dp = 'example': a pair is two rows of a batch, and per-row clipping "
            "would not bound a pair's influence; use privacy.dp = 'client'"
        )


COLUMNS = [
    ("round", "round", "{:d}"),
    ("clients", "num_clients", "{:d}"),
    ("train loss", "train_loss", "{:.4f}"),
    ("test loss", "test_loss", "{:.4f}"),
    ("reward acc", "test_reward_accuracy", "{:.3f}"),
    ("margin", "test_reward_margin", "{:.3f}"),
    ("ε", "epsilon", "{:.3f}"),
    ("time (s)", "elapsed_s", "{:.1f}"),
]


class PreferenceOptions(InstructionOptions):
    preference_loss: Literal["dpo", "ipo"] = Field(
        "dpo", description="DPO (−log σ(β·h)) or IPO ((h − 1/(2β))²) on the pairs."
    )
    beta: float = Field(0.1, gt=0, description="β, the strength of the pull towards π_ref.")
    sft_weight: float = Field(
        0.0, ge=0, description="Weight of an SFT term (the chosen replies' token-mean NLL)."
    )
    reference_adapter: str | None = Field(
        None,
        description="An exported adapter folder (an SFT run's 'adapter') merged into the base before "
        "training; π_ref and the start. Default: the base FM.",
    )


def _register() -> None:
    from fedfm.tasks.base import TASKS, TaskKind

    kind = TaskKind(
        _load, _bundle, _build, _evaluator, COLUMNS, check=_check, own_metric=("reward_accuracy", True),
        defaults=[{"model.name": "smollm2-135m"}, {"data.name": "chatterbot-preference"}],
    )  # fmt: skip
    TASKS.register("preference", options=PreferenceOptions)(kind)


_register()
