"""The batched engine: a cohort trained in groups of k clients, each group in one pass per step over
the one shared base model (``ClientProgram.group``; per-row adapters, stacked optimizer state).

Memory: one base model; per group, k clients' adapters, gradients and optimizer state and one
combined batch's activations. A group's results are yielded as soon as the group ends, so peak
memory depends on the group size, not on the number of clients. The group size is
``batched.clients_per_group``, or as many clients as ``batched.memory_gb`` holds by the estimate
in ``client_bytes`` (at most ``batched.max_clients_per_group``); on a CPU the default budget is
at most ``batched.cpu_memory_gb``, about where a bigger combined batch starts to run slower there
(its element-wise work is bound by memory bandwidth: ``docs/performance.md``). The size is
measured from the memory free at start, so pin ``clients_per_group`` where runs must repeat
exactly on another machine or after a resume: with dropout inside the base model, the groups
decide its masks.

Clients are grouped by step count (most steps first, ties in cohort order) so that a group's
batches stay full; every client's result is the one it computes alone, whatever its group
(``fedfm.client.groups``), as long as the base model has no dropout of its own (its dropout
masks are drawn over each group's combined batch: ``docs/performance.md``). Per-client state
lives here as in the in-process engine.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from pydantic import Field

from fedfm.config.sections import Section
from fedfm.engines.base import EngineSetup, engine
from fedfm.engines.state import ClientStates
from fedfm.types import ClientResult, Params, RoundContext


def client_bytes(
    model_config, trainable: int, batch_size: int, max_length: int, optimizer: str, vocab: int = 0
) -> int:
    """Estimated bytes one more client adds to a group: its trainable tensors, their gradients and
    optimizer state (AdamW: two moments; SGD: a momentum buffer) in fp32, plus its batch's
    activations kept for the backward pass — per layer and token (34·h + 5·a·s)·4 bytes, twice
    the fp32 figure of Korthikanti et al. (2022, "Reducing Activation Recomputation in Large
    Transformer Models"; their s·b·h·(34 + 5as/h) is bytes in 16-bit), which matches the peak RSS
    measured for MiniLM (178 MiB estimated, ~160 MiB measured per client at batch 16) — plus, for a
    language-model head over ``vocab`` tokens, its logits, their fp32 copy and their gradient
    (3 · 4 bytes per token and vocabulary entry)."""
    copies = 4 if optimizer == "adamw" else 3
    h = getattr(model_config, "hidden_size", None) or getattr(model_config, "n_embd", 768)
    layers = getattr(model_config, "num_hidden_layers", None) or getattr(model_config, "n_layer", 12)
    heads = getattr(model_config, "num_attention_heads", None) or getattr(model_config, "n_head", 12)
    per_token = layers * (34 * h + 5 * heads * max_length) * 4 + 12 * vocab
    return copies * 4 * trainable + batch_size * max_length * per_token


def lm_vocab(model) -> int:
    """The output vocabulary of a language-model head (0 for a classifier)."""
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return 0
    return int(head.weight.shape[0]) if head is not None else 0


def available_bytes(device) -> int:
    """Free memory for groups: 80% of the GPU's free memory, or half of the host's available."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.8 * free)
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


def group_size(options, bundle, training, max_length: int, gpu_share: float = 1.0) -> tuple[int, str]:
    """Clients per group and how it was chosen (for the run's log). ``gpu_share``: the fraction
    of the GPU this process may use (Ray workers that share one GPU)."""
    if options.clients_per_group:
        return options.clients_per_group, f"{options.clients_per_group} clients per group (set)"
    if options.memory_gb:
        budget, source = int(options.memory_gb * 2**30), "batched.memory_gb"
    elif bundle.device.type == "cpu":  # beyond a few GiB per pass a CPU gets slower, not faster
        budget = min(available_bytes(bundle.device), int(options.cpu_memory_gb * 2**30))
        source = "on a CPU: batched.cpu_memory_gb or half the available memory"
    else:
        budget = int(available_bytes(bundle.device) * min(1.0, gpu_share))
        source = "80% of the free GPU memory" + (
            f" × {gpu_share:g} (this worker's share)" if gpu_share < 1 else ""
        )
    per = client_bytes(
        bundle.model.config, bundle.num_trainable(), training.batch_size, max_length, training.optimizer,
        lm_vocab(bundle.model),
    )  # fmt: skip
    k = max(1, min(options.max_clients_per_group, budget // per))
    return k, (
        f"{k} clients per group: about {per / 2**20:.0f} MiB each within {budget / 2**30:.1f} GiB "
        f"({source}), at most {options.max_clients_per_group}"
    )


def check_stackable(bundle, who: str) -> None:
    """Refuse at set-up, not in every round, a model whose trainable tensors do not stack
    (LoRA on an embedding, a head with trainable non-linear parts)."""
    from fedfm.models.multilora import stack_plan

    try:
        stack_plan(bundle.model, bundle.trainable)
    except ValueError as err:
        raise ValueError(f"{who}: {err} (use run.engine = 'inprocess')") from None


def groups(cohort: Sequence[int], size: int, steps) -> list[list[int]]:
    """The cohort in groups of at most ``size``, most local steps first (stable in cohort order)."""
    ordered = sorted(cohort, key=lambda c: -steps(c))
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


class BatchedSection(Section):
    """Training clients in groups: run.engine = "batched", and Ray workers with ray.batched."""

    clients_per_group: int | None = Field(
        None,
        ge=1,
        description="Clients trained together in one pass over the base model (the batched engine, and "
        "Ray workers with ray.batched); default: as many as batched.memory_gb holds.",
    )
    memory_gb: float | None = Field(
        None,
        gt=0,
        description="Memory for one group's adapters, optimizer state and activations (GiB); default: "
        "80% of the free GPU memory, or on a CPU half of the available memory up to cpu_memory_gb.",
    )
    max_clients_per_group: int = Field(
        32, ge=1, description="Upper limit of the group size chosen from the memory budget."
    )
    cpu_memory_gb: float = Field(
        2.0,
        gt=0,
        description="On a CPU, the default budget is at most this (GiB): a bigger combined batch runs "
        "slower there (docs/performance.md).",
    )


@engine("batched", options=BatchedSection, section="batched")
class BatchedEngine:
    """Trains each group of the cohort in one pass per step over one shared model."""

    remote = False
    section = "batched"

    @staticmethod
    def trains_in_groups(cfg) -> str | None:
        """The setting that makes this engine train clients in groups (config validation then
        refuses what groups cannot run: ``fedfm.config.check_batchable``)."""
        return "run.engine = 'batched'"

    def __init__(self, setup: EngineSetup) -> None:
        self.bundle, self.task, self.program = setup.bundle, setup.task, setup.program
        self.clients = list(setup.jobs)
        self.states = ClientStates()
        check_stackable(setup.bundle, "run.engine = 'batched'")
        self.size, self.summary = group_size(
            setup.group, setup.bundle, setup.program.training, _max_length(setup.task)
        )

    def run_cohort(
        self, global_params: Params, cohort: Sequence[int], ctx: RoundContext
    ) -> Iterator[ClientResult]:
        steps = lambda c: self.program.local_steps(self.clients[c])  # noqa: E731
        for group in groups(cohort, self.size, steps):
            jobs = [self.clients[c] for c in group]
            try:
                outcomes = self.program.group(
                    self.bundle, self.task, jobs, global_params, ctx, [self.states.get(c) for c in group]
                )
            except Exception as err:  # the group cannot even start: its clients fail, the round goes on
                reason = f"{type(err).__name__}: {err}"
                yield from (ClientResult.failed(c, "train", reason) for c in group)
                continue
            yield from self.states.delivered(outcomes)

    def state_dict(self) -> dict:
        return self.states.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.states.load_state_dict(state)

    def close(self) -> None:
        pass


def _max_length(task) -> int:
    data = getattr(task, "train", None)
    ids = getattr(data, "input_ids", None)
    if hasattr(ids, "shape"):
        return int(ids.shape[1]) if ids.dim() == 2 and ids.shape[1] else 32
    return max((len(r) for r in ids), default=32) if ids else 32
