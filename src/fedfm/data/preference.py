"""Preference data: a prompt with a chosen and a rejected reply, with a group (category) per pair.

A preference dataset is a ``TextDataset`` whose ``texts[i]`` is the pair as canonical JSON
(``{"prompt": [messages], "chosen": str, "rejected": str}``) and whose labels are groups, so the
de-duplication, the seeded held-out split stratified by group and the partitioners apply
unchanged (``natural`` on ``category``: one client per category).

Sources (``data.name`` with ``task.kind = "preference"``):

* ``chatterbot-preference``: pairs shipped with fedfm (``fedfm/data/assets``), built once by
  ``fedfm synth --preference`` from the chatterbot corpus: the corpus reply is *chosen*, a greedy
  reply of the untuned SmolLM2-135M-Instruct is *rejected* (a self-generated negative: DPO then
  learns to prefer the human reply over what the starting model says; docs/preference.md).
* ``jsonl``: one pair per line, ``prompt`` (a string or a list of ``{role, content}`` messages),
  ``chosen`` and ``rejected`` (strings, or message lists ending with the assistant's reply: TRL's
  conversational form); the group is the ``data.label_column`` field when rows have it.
* anything else: a Hugging Face dataset id with those columns (needs network access).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from fedfm.data.dataset import TextDataset, encode_labels
from fedfm.data.instruction import ROLES
from fedfm.data.sources import DataError, _read_rows

SHIPPED = "chatterbot-preference.jsonl"


def pair_text(prompt: list[dict], chosen: str, rejected: str) -> str:
    return json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}, ensure_ascii=False)


def pair_of(text: str) -> dict:
    return json.loads(text)


def _reply(value, field: str, where: str) -> str:
    if isinstance(value, str):
        return value
    if (
        isinstance(value, list)
        and value
        and isinstance(value[-1], dict)
        and value[-1].get("role") == "assistant"
    ):
        return str(value[-1].get("content", ""))
    raise DataError(
        f"{where}: '{field}' must be a string or a message list ending with the assistant's reply"
    )


def _prompt(value, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value:
        for m in value:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: each prompt message needs a role in {ROLES} and a string content")
        if value[-1]["role"] == "assistant":
            raise DataError(f"{where}: the prompt must end with a user turn (the replies answer it)")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(f"{where}: 'prompt' must be a string or a non-empty list of messages")


def row_pair(row: dict, where: str) -> str:
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
    if missing:
        raise DataError(
            f"{where}: preference rows need 'prompt', 'chosen' and 'rejected'; missing {', '.join(missing)} "
            f"(found keys: {', '.join(row)})"
        )
    chosen, rejected = _reply(row["chosen"], "chosen", where), _reply(row["rejected"], "rejected", where)
    if not chosen.strip() or not rejected.strip():
        raise DataError(f"{where}: 'chosen' and 'rejected' must be non-empty")
    if chosen.strip() == rejected.strip():
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same reply (no preference to learn)")
    return pair_text(_prompt(row["prompt"], where), chosen, rejected)


def rows_to_pairs(rows: list[dict], group_column: str, where: str) -> TextDataset:
    if not rows:
        raise DataError(f"{where}: no rows")
    texts = [row_pair(r, f"{where} row {i + 1}") for i, r in enumerate(rows)]
    groups = [str(r.get(group_column, "all")) for r in rows]
    labels, names = encode_labels(groups)
    return TextDataset(texts, labels, names, {"category": groups})


def shipped_path() -> Path:
    return Path(str(resources.files("fedfm.data") / "assets" / SHIPPED))


def chatterbot_preference(cfg) -> tuple[TextDataset, None]:
    path = shipped_path()
    if not path.is_file():
        raise DataError(f"the shipped preference pairs are missing ({path}); reinstall fedfm")
    return rows_to_pairs(_read_rows(path, "jsonl"), "category", SHIPPED), None


def jsonl(cfg) -> tuple[TextDataset, TextDataset | None]:
    from fedfm.data import instruction

    return instruction.jsonl(cfg, rows_to_pairs)


def huggingface(cfg) -> tuple[TextDataset, TextDataset | None]:
    from fedfm.data import instruction

    return instruction.huggingface(cfg, rows_to_pairs, "'chatterbot-preference' or 'jsonl'")


SOURCES = {"chatterbot-preference": chatterbot_preference, "jsonl": jsonl}


def load_preference_source(cfg) -> tuple[TextDataset, TextDataset | None]:
    if cfg.name in SOURCES:
        return SOURCES[cfg.name](cfg)
    if cfg.name in ("csv", "bbc-news", "chatterbot"):
        raise DataError(
            f"data.name = {cfg.name!r} holds no preference pairs; preference data comes from "
            f"{', '.join(SOURCES)} or a Hugging Face dataset id (make pairs with `fedfm synth --preference`)"
        )
    return huggingface(cfg)
