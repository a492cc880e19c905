"""Preference pairs from the chatterbot corpus (``fedfm synth --preference``).

For each sampled (prompt, reply) pair of the corpus, the corpus reply is *chosen* and a greedy
reply of the untuned generator (by default SmolLM2-135M-Instruct, the FM that DPO then tunes)
to the same prompt is *rejected*. This is a **self-generated negative**: the pairs say "the
human-written reply is better than what the starting model says". DPO on them measures how far
federated alignment moves a model from its own habits towards a target style; it does not
measure alignment to human judgements of two model replies (docs/preference.md).

Pairs where the generator's reply is empty or the same as the corpus reply are dropped (and
counted). Each category contributes up to ``per_category`` pairs, drawn with a seeded shuffle.
The output JSONL is its own cache: a rerun with the same settings skips the pairs already
written; a sidecar ``<output>.settings.json`` refuses a rerun with other settings.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from fedfm.synthetic.generate import SynthError


@dataclass(frozen=True)
class PreferenceSettings:
    generator: str = "smollm2-135m"
    per_category: int = 24
    max_new_tokens: int = 48
    batch_size: int = 16
    seed: int = 0


def corpus_pairs(settings: PreferenceSettings) -> list[tuple[str, str, str]]:
    """(category, prompt, reply): up to ``per_category`` distinct prompts per category, seeded."""
    from fedfm.data.instruction import chatterbot, messages_of
    from fedfm.seeding import numpy_rng

    data, _ = chatterbot(None)
    by_category: dict[str, dict[str, str]] = {}
    for text, group in zip(data.texts, data.columns["category"], strict=True):
        user, reply = messages_of(text)
        by_category.setdefault(group, {}).setdefault(user["content"], reply["content"])
    out = []
    for category in sorted(by_category):
        items = sorted(by_category[category].items())
        rng = numpy_rng(settings.seed, "preference-pairs", category)
        for i in rng.permutation(len(items))[: settings.per_category]:
            out.append((category, *items[int(i)]))
    return out


def _same(a: str, b: str) -> bool:
    return " ".join(a.lower().split()).strip(" .!?") == " ".join(b.lower().split()).strip(" .!?")


def _check_settings(output: Path, settings: PreferenceSettings) -> None:
    side = output.with_name(output.name + ".settings.json")
    if side.is_file():
        saved = json.loads(side.read_text())
        if saved != asdict(settings):
            raise SynthError(
                f"{output} was made with other settings ({side}: {saved}); write to another file"
            )
    else:
        side.write_text(json.dumps(asdict(settings), indent=1))


def preference_pairs(
    settings: PreferenceSettings,
    output: str | Path,
    *,
    device: str = "auto",
    note: Callable[[str], None] = print,
) -> dict:
    """Write the pairs to ``output`` (resumable); returns written and dropped counts."""
    from fedfm.models.build import pick_device
    from fedfm.synthetic.generate import load_generator
    from fedfm.tasks.instruction import greedy_answers

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    _check_settings(output, settings)
    done = set()
    if output.is_file():
        for line in output.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                done.add((row["category"], row["prompt"]))
    todo = [p for p in corpus_pairs(settings) if (p[0], p[1]) not in done]
    dropped: Counter = Counter()
    written = len(done)
    if todo:
        dev = pick_device(device)
        model, tokenizer = load_generator(settings.generator, dev)
        provenance = {
            "chosen": "chatterbot-corpus 1.3.3 reply",
            "rejected": f"greedy reply of the untuned {settings.generator}",
            "max_new_tokens": settings.max_new_tokens,
            "seed": settings.seed,
        }
        with output.open("a", encoding="utf-8") as f:
            from fedfm.reporting.console import Eta

            eta = Eta(len(todo))
            for start in range(0, len(todo), settings.batch_size):
                chunk = todo[start : start + settings.batch_size]
                prompts = [[{"role": "user", "content": prompt}] for _, prompt, _ in chunk]
                answers = greedy_answers(model, tokenizer, prompts, settings.max_new_tokens, dev)
                for (category, prompt, reply), answer in zip(chunk, answers, strict=True):
                    if not answer.strip():
                        dropped["empty"] += 1
                    elif _same(answer, reply):
                        dropped["same as the corpus reply"] += 1
                    else:
                        row = {"prompt": prompt, "chosen": reply, "rejected": answer, "category": category}
                        f.write(json.dumps({**row, "provenance": provenance}, ensure_ascii=False) + "\n")
                        written += 1
                f.flush()
                done = min(start + settings.batch_size, len(todo))
                eta.step(done)
                note(f"{done}/{len(todo)} prompts answered, {written} pairs written (ETA {eta.left()})")
    return {"written": written, "dropped": dict(dropped)}
