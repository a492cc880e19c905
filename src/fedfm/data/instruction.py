"""Instruction data: conversations as chat messages, with a group (category) per example.

An instruction dataset is a ``TextDataset`` whose ``texts[i]`` is the conversation as canonical
JSON (``[{"role": ..., "content": ...}, ...]``) and whose labels are groups (a category, a
source...). That keeps every piece of the data pipeline unchanged: exact de-duplication of
whole conversations, the seeded held-out split stratified by group (so every category keeps a
held-out part), and the partitioners (``natural`` on the ``category`` column gives one client
per category).

Sources (``data.name`` with ``task.kind = "instruction"``):

* ``chatterbot``: the packaged chatterbot corpus (English): 21 categories of hand-written
  conversations; each turn is paired with the next as (user, assistant).
* ``jsonl``: one conversation per line, either Alpaca form (``instruction``, optional
  ``input``, ``output``) or chat form (``messages: [{role, content}, ...]``); the group is the
  ``data.label_column`` field when rows have it, else one group ``all``.
* anything else: a Hugging Face dataset id in either form (needs network access).
"""

from __future__ import annotations

import json
from pathlib import Path

from fedfm.data.dataset import TextDataset, encode_labels
from fedfm.data.sources import DataError, _read_rows, package_folder

ROLES = ("system", "user", "assistant")


def conversation_text(messages: list[dict]) -> str:
    return json.dumps([{"role": m["role"], "content": m["content"]} for m in messages], ensure_ascii=False)


def messages_of(text: str) -> list[dict]:
    return json.loads(text)


def row_messages(row: dict, where: str) -> list[dict]:
    """A row in Alpaca or chat form as a message list ending with an assistant turn."""
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: each message needs a role in {ROLES} and a string content")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's (it is what is learnt)")
        return messages
    if "instruction" in row and "output" in row:
        prompt = str(row["instruction"])
        if row.get("input"):
            prompt = f"{prompt}\n\n{row['input']}"
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(row["output"])}]
    raise DataError(
        f"{where}: rows need 'messages' (chat form) or 'instruction' and 'output' (Alpaca form); "
        f"found keys: {', '.join(row)}"
    )


def rows_to_conversations(rows: list[dict], group_column: str, where: str) -> TextDataset:
    if not rows:
        raise DataError(f"{where}: no rows")
    texts = [conversation_text(row_messages(r, f"{where} row {i + 1}")) for i, r in enumerate(rows)]
    groups = [str(r.get(group_column, "all")) for r in rows]
    labels, names = encode_labels(groups)
    return TextDataset(texts, labels, names, {"category": groups})


def chatterbot(cfg) -> tuple[TextDataset, None]:
    """The chatterbot corpus, English: every turn paired with the next, category = file name."""
    root = package_folder("chatterbot_corpus", extra="llm") / "data" / "english"
    import yaml

    texts, groups = [], []
    for path in sorted(root.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conversation if t is not None]
            for prompt, reply in zip(turns, turns[1:], strict=False):
                if prompt and reply:
                    texts.append(
                        conversation_text(
                            [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
                        )
                    )
                    groups.append(path.stem)
    labels, names = encode_labels(groups)
    return TextDataset(texts, labels, names, {"category": groups}), None


def jsonl(cfg, to_dataset=None) -> tuple[TextDataset, TextDataset | None]:
    """``data.path`` (and ``data.test_path``) as JSONL rows, made a dataset by ``to_dataset``
    (rows, group column, where) → TextDataset (default: conversations)."""
    to_dataset = to_dataset or rows_to_conversations
    if not cfg.path:
        raise DataError("data.path is required for data.name = 'jsonl'")
    train = to_dataset(_read_rows(Path(cfg.path), "jsonl"), cfg.label_column, cfg.path)
    test = None
    if cfg.test_path:
        test = to_dataset(_read_rows(Path(cfg.test_path), "jsonl"), cfg.label_column, cfg.test_path)
        test = _relabel(test, train.label_names, cfg.test_path)
    return train, test


def _relabel(test: TextDataset, names: list[str], where: str) -> TextDataset:
    index = {n: i for i, n in enumerate(names)}
    groups = test.columns["category"]
    unknown = sorted(set(groups) - set(index))
    if unknown:
        raise DataError(f"{where}: groups {unknown} do not occur in the training data")
    import numpy as np

    return TextDataset(test.texts, np.array([index[g] for g in groups]), names, test.columns)


def huggingface(
    cfg, to_dataset=None, offline="'chatterbot' or 'jsonl'"
) -> tuple[TextDataset, TextDataset | None]:
    from fedfm.data.sources import load_hf

    to_dataset = to_dataset or rows_to_conversations
    try:
        ds = load_hf(cfg)
    except DataError as err:
        raise DataError(f"{err}. Offline, use data.name = {offline}") from None
    train = to_dataset(list(ds[cfg.hf_train_split]), cfg.label_column, cfg.name)
    test = None
    if cfg.hf_test_split and cfg.hf_test_split in ds:
        test = to_dataset(list(ds[cfg.hf_test_split]), cfg.label_column, cfg.name)
        test = _relabel(test, train.label_names, cfg.name)
    return train, test


SOURCES = {"chatterbot": chatterbot, "jsonl": jsonl}


def load_instruction_source(cfg) -> tuple[TextDataset, TextDataset | None]:
    if cfg.name in SOURCES:
        return SOURCES[cfg.name](cfg)
    if cfg.name in ("csv", "bbc-news"):
        raise DataError(
            f"data.name = {cfg.name!r} is a classification source; instruction data comes from "
            f"{', '.join(SOURCES)} or a Hugging Face dataset id"
        )
    return huggingface(cfg)
