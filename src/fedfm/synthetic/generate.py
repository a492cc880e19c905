"""Labelled synthetic text from a generative FM, made from label names — never from client data.

For each class the generator is prompted (through its chat template) to write one example of a
``kind`` of text about the label, optionally with a description of the class and a few public
seed examples. Samples are drawn in batches with temperature / top-p sampling, each batch from its
own seed derived from (seed, label, batch), then cleaned, length-filtered, de-duplicated and
optionally quality-filtered: the encoder FM must place a sample nearer its own class than any
other (cosine similarity of mean-pooled embeddings to per-class anchors built from the label
name, description and seeds).

The output JSONL is its own cache. Each accepted sample is a line with ``text``, ``label`` and its
provenance (generator, prompt, seed, batch, sampling settings). A sidecar ``<output>.progress.json``
records the settings and how many batches of each class are done, so an interrupted run resumes
where it stopped, and a rerun with other settings is refused instead of mixing two recipes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedfm.seeding import derive_seed

DEFAULT_PROMPT = "Write a {kind} about {label}.{description} Write only the text itself, with no title."
GROWABLE = ("per_class", "max_batches")  # may change between resumes without changing any sample
KINDS = {"bbc-news": "short news article"}  # what the texts of a registered dataset are


class SynthError(ValueError):
    """A synthesis request that cannot be carried out; the message says why."""


@dataclass(frozen=True)
class SynthSettings:
    """Everything that determines the samples; stored with the output and checked on resume."""

    generator: str = "smollm2-135m"
    labels: tuple[str, ...] = ()
    per_class: int = 20
    kind: str = "text"
    descriptions: dict[str, str] = field(default_factory=dict)
    seed_examples: dict[str, list[str]] = field(default_factory=dict)
    prompt: str = DEFAULT_PROMPT
    batch_size: int = 8
    temperature: float = 0.9
    top_p: float = 0.95
    max_new_tokens: int = 96
    min_words: int = 12
    max_words: int = 400
    max_batches: int | None = None  # per class; default 4 × the batches per_class needs
    quality_filter: bool = False
    encoder: str = "minilm"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.labels:
            raise SynthError("no labels to generate for")
        for name in ("per_class", "batch_size", "max_new_tokens", "min_words"):
            if getattr(self, name) < 1:
                raise SynthError(f"{name} must be at least 1")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise SynthError("temperature must be > 0 and top_p in (0, 1]")
        if self.max_words < self.min_words:
            raise SynthError("max_words must be at least min_words")
        for name in ("descriptions", "seed_examples"):
            unknown = sorted(set(getattr(self, name)) - set(self.labels))
            if unknown:
                raise SynthError(f"{name} name labels {unknown} that are not among {list(self.labels)}")
        if "{label}" not in self.prompt:
            raise SynthError("the prompt template must contain {label}")

    @property
    def batch_budget(self) -> int:
        return self.max_batches or 4 * math.ceil(self.per_class / self.batch_size)

    def sampling(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens}


def render_prompt(settings: SynthSettings, label: str) -> str:
    """The user message for one class; seed examples (public ones only) are quoted after it."""
    desc = settings.descriptions.get(label)
    text = settings.prompt.format(label=label, kind=settings.kind, description=f" {desc}" if desc else "")
    seeds = settings.seed_examples.get(label, [])[:3]
    if seeds:
        text += "\n\nExamples of such texts:\n" + "\n".join(f"- {s[:400]}" for s in seeds)
    return text


def clean(text: str) -> str:
    """Strip whitespace and markdown headers, collapse spaces, drop a trailing unfinished sentence."""
    lines = [ln.strip() for ln in text.strip().splitlines()]
    lines = [
        ln for ln in lines if ln and not ln.startswith("#") and not re.match(r"^(title|headline):", ln, re.I)
    ]
    text = re.sub(r"\s+", " ", " ".join(lines)).strip().strip('"')
    end = max(text.rfind(p) for p in ".!?")
    if end > 0 and end < len(text) - 1:
        text = text[: end + 1]
    return text


def normalized(text: str) -> str:
    """The de-duplication key: lower case, letters and digits only, single spaces."""
    return re.sub(r"\s+", " ", re.sub(r"[^a-z0-9 ]", " ", text.lower())).strip()


def length_ok(text: str, settings: SynthSettings) -> bool:
    return settings.min_words <= len(text.split()) <= settings.max_words


@dataclass
class Progress:
    settings: dict
    batches: dict[str, int]
    rejected: dict[str, int]
    generated: int = 0

    @classmethod
    def start(cls, settings: SynthSettings) -> Progress:
        labels = settings.labels
        return cls(_jsonable(settings), dict.fromkeys(labels, 0), {"duplicate": 0, "length": 0, "quality": 0})


def _jsonable(settings: SynthSettings) -> dict:
    return json.loads(json.dumps(asdict(settings)))


def _sidecar(output: Path) -> Path:
    return output.with_name(output.name + ".progress.json")


def _load_progress(output: Path, settings: SynthSettings) -> tuple[Progress, list[dict]]:
    side = _sidecar(output)
    rows = []
    if output.is_file():
        rows = [json.loads(line) for line in output.read_text().splitlines() if line.strip()]
    if not side.is_file():
        if rows:
            raise SynthError(f"{output} exists but has no {side.name}: pick a new --output")
        return Progress.start(settings), rows
    saved = json.loads(side.read_text())
    now = _jsonable(settings)
    changed = sorted(k for k in now if k not in GROWABLE and saved["settings"].get(k) != now[k])
    if changed:
        raise SynthError(
            f"{output} was generated with other settings ({', '.join(changed)} differ): pick a new --output "
            "or repeat the original settings to resume"
        )
    saved["settings"] = now  # per_class / max_batches may grow: batches keep their seeds
    return Progress(**saved), rows


def _save_progress(output: Path, progress: Progress) -> None:
    side = _sidecar(output)
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(json.dumps(asdict(progress), indent=1))
    tmp.replace(side)


def load_generator(name: str, device: torch.device):
    """Any HF causal LM (registered name, local folder or hub id) and its tokenizer, for sampling."""
    from transformers import AutoModelForCausalLM

    from fedfm.models.build import FALLBACK_CHAT_TEMPLATE, _quiet_transformers, load_tokenizer
    from fedfm.models.resolve import load_error, resolve_model

    _quiet_transformers()
    source = resolve_model(name)
    tokenizer = load_tokenizer(source, name)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    except Exception as err:
        raise load_error(name, err) from None
    return model.to(device).eval(), tokenizer


@torch.no_grad()
def sample_batch(model, tokenizer, prompt: str, settings: SynthSettings, seed: int, device) -> list[str]:
    """``batch_size`` sampled continuations of one chat prompt (seeded, so a batch can be redone)."""
    from fedfm.tasks.instruction import _render

    ids = _render(tokenizer, [{"role": "user", "content": prompt}], True)
    batch = torch.tensor([ids] * settings.batch_size, dtype=torch.long, device=device)
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=batch,
        attention_mask=torch.ones_like(batch),
        do_sample=True,
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_new_tokens=settings.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
    )
    return [tokenizer.decode(o[batch.shape[1] :], skip_special_tokens=True) for o in out]


class QualityFilter:
    """Keeps a sample when the encoder FM places it nearer its own class anchor than any other."""

    def __init__(self, settings: SynthSettings, device) -> None:
        from transformers import AutoModel

        from fedfm.models.build import load_tokenizer
        from fedfm.models.resolve import resolve_model

        source = resolve_model(settings.encoder)
        self.tokenizer = load_tokenizer(source, settings.encoder)
        self.model = AutoModel.from_pretrained(source, dtype=torch.float32).to(device).eval()
        self.device = device
        self.labels = list(settings.labels)
        anchors = []
        for label in self.labels:
            texts = [f"A {settings.kind} about {label}. {settings.descriptions.get(label, '')}".strip()]
            texts += settings.seed_examples.get(label, [])
            anchors.append(self.embed(texts).mean(0))
        self.anchors = torch.nn.functional.normalize(torch.stack(anchors), dim=-1)

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled, dim=-1).cpu()

    def scores(self, texts: list[str]) -> np.ndarray:
        """Cosine similarity of each text to each class anchor, shape (texts, classes)."""
        return (self.embed(texts) @ self.anchors.T).numpy()

    def keep(self, texts: list[str], label: str) -> list[tuple[bool, float]]:
        sims = self.scores(texts)
        own = self.labels.index(label)
        return [(int(np.argmax(row)) == own, float(row[own])) for row in sims]


def synthesize(
    settings: SynthSettings,
    output: str | Path,
    *,
    device: str = "auto",
    note: Callable[[str], None] = print,
) -> dict:
    """Generate until every class has ``per_class`` accepted samples or its batch budget is spent.

    Resumable: rerunning with the same settings continues. Returns the summary (also in the
    sidecar): accepted per class, batches, rejections by reason.
    """
    from fedfm.models.build import pick_device

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    progress, rows = _load_progress(output, settings)
    accepted = {label: sum(r["label"] == label for r in rows) for label in settings.labels}
    seen = {normalized(r["text"]) for r in rows}

    def unfinished(label: str) -> bool:
        return accepted[label] < settings.per_class and progress.batches[label] < settings.batch_budget

    todo = [lab for lab in settings.labels if unfinished(lab)]
    if todo:
        dev = pick_device(device)
        note(f"loading generator {settings.generator!r} on {dev}")
        model, tokenizer = load_generator(settings.generator, dev)
        quality = QualityFilter(settings, dev) if settings.quality_filter else None
        from fedfm.reporting.console import Eta

        eta = Eta(settings.per_class * len(settings.labels), sum(accepted.values()))  # from accepted samples
        with output.open("a") as fh:
            for label in todo:
                prompt = render_prompt(settings, label)
                while unfinished(label):
                    b = progress.batches[label]
                    seed = derive_seed(settings.seed, "synth", label, b)
                    texts = [clean(t) for t in sample_batch(model, tokenizer, prompt, settings, seed, dev)]
                    progress.generated += len(texts)
                    kept = _filter(texts, label, settings, seen, quality, progress.rejected)
                    for text, score in kept[: settings.per_class - accepted[label]]:
                        fh.write(json.dumps(_row(settings, text, label, prompt, seed, b, score)) + "\n")
                        accepted[label] += 1
                    fh.flush()
                    progress.batches[label] = b + 1
                    _save_progress(output, progress)
                    eta.step(sum(accepted.values()))
                    note(
                        f"{label}: batch {b + 1}, {accepted[label]}/{settings.per_class} accepted "
                        f"({sum(accepted.values())}/{eta.total} in all, ETA {eta.left()})"
                    )
    summary = {"accepted": accepted, **asdict(progress)}
    short = [lab for lab in settings.labels if accepted[lab] < settings.per_class]
    if short:
        note(f"batch budget spent before {settings.per_class} samples for: {', '.join(short)}")
    return summary


def _row(settings: SynthSettings, text: str, label: str, prompt: str, seed: int, batch: int, score) -> dict:
    """One output line: the sample and where it came from."""
    provenance = {
        "generator": settings.generator,
        "prompt": prompt,
        "seed": seed,
        "batch": batch,
        "settings": settings.sampling(),
        **({"quality": round(score, 4)} if score is not None else {}),
    }
    return {"text": text, "label": label, "synthetic": True, "provenance": provenance}


def _filter(texts, label, settings, seen: set, quality, rejected: dict) -> list[tuple[str, float | None]]:
    """Length, then de-duplication (within the batch and against the file), then quality."""
    fresh = []
    for text in texts:
        key = normalized(text)
        if not length_ok(text, settings):
            rejected["length"] += 1
        elif key in seen:
            rejected["duplicate"] += 1
        else:
            seen.add(key)
            fresh.append(text)
    if quality is None or not fresh:
        return [(t, None) for t in fresh]
    kept = []
    for text, (ok, score) in zip(fresh, quality.keep(fresh, label), strict=True):
        if ok:
            kept.append((text, score))
        else:
            rejected["quality"] += 1
    return kept


def dataset_labels(name: str) -> list[str]:
    """The label names of a registered dataset (or csv/jsonl needs --labels)."""
    from fedfm.config import DataSection
    from fedfm.data.sources import load_source

    train, _ = load_source(DataSection(name=name))
    return list(train.label_names)
