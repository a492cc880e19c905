"""The sections of a run's configuration: one pydantic model per TOML table.

Fields that name a component are ``Registered(kind)``: validated against that kind's registry
(the error names the field and lists the registered choices), and listed in the configuration
reference. ``fedfm.config`` assembles them into ``RunConfig`` and re-exports them.
"""

from __future__ import annotations

import functools
import math
import types
import typing
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

NULL = "null"  # TOML has no null: a field that may be unset reads the string "null" as None


class _Section(BaseModel):
    # NaN and ±inf are refused in every float field (an lr of inf would train to NaN silently)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any) -> Any:
        """``"null"`` (TOML, ``--set field=null``) is None in every field that may be None."""
        if not isinstance(data, dict):
            return data
        return {k: None if v == NULL and _nullable(cls, k) else v for k, v in data.items()}


def _nullable(model: type[BaseModel], name: str) -> bool:
    field = model.model_fields.get(name)
    if field is None:
        return False
    annotation = field.annotation
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return union and type(None) in typing.get_args(annotation)


def plain(model: BaseModel) -> dict[str, Any]:
    """A section as TOML can hold it, so that it reads back to the same values: None is left out
    where it is the default and written ``"null"`` where it is not (``training.max_grad_norm``)."""
    dumped = model.model_dump(mode="json")
    out: dict[str, Any] = {}
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out[name] = plain(value)
        elif isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
            out[name] = [plain(v) for v in value]
        elif value is None:
            if field.get_default(call_default_factory=True) is not None:
                out[name] = NULL
        else:
            out[name] = dumped[name]
    return out


def Registered(kind: str):  # noqa: N802  (a type, read as one: `engine: Registered("engine")`)
    """A name that must be registered in ``kind``'s registry; the error lists the registered ones,
    and the configuration reference lists them too (``json_schema_extra``)."""
    return Annotated[
        str, AfterValidator(functools.partial(_registered, kind)), WithJsonSchema({"registry": kind})
    ]


def _registered(kind: str, name: str) -> str:
    from fedfm.registry import registry_for

    registry = registry_for(kind)
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; allowed: {', '.join(registry.names())}")
    return name


class RunSection(_Section):
    name: str = Field("fedfm", description="A label for this experiment; part of the run folder name.")
    rounds: int = Field(7, ge=1, description="Number of federated rounds.")
    seed: int = Field(0, description="Root seed; every random draw is derived from it.")
    engine: Registered("engine") = Field("inprocess", description="Execution engine (registered name).")
    protocol: Registered("protocol") = Field(
        "rounds", description="rounds (federated training), or fedpft (one-shot FL from FM features)."
    )
    device: str = Field("auto", description="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:N'.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; default: torch's choice.")
    output_root: str = Field("runs", description="Parent folder of run folders when --output is not given.")
    trackers: list[Registered("tracker")] = Field(
        default_factory=list,
        description="Experiment trackers that get every round's metrics (docs/trackers.md; the "
        "'trackers' extra).",
    )
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; default: a SQLite store mlflow.db in the run (or sweep) folder.",
    )
    tracker_group: str | None = Field(
        None, description="Tracker runs grouped under this name (a sweep sets its own name)."
    )
    wandb_project: str = Field("fedfm", description="The W&B project of wandb runs.")
    mode: Literal["sync", "async"] = Field(
        "sync",
        description="sync: rounds (the server waits for its cohort); async: FedBuff (clients train on the "
        "version they pulled, the server steps after every [fedbuff] buffer_size updates; run.rounds "
        "counts server steps).",
    )


class ModelSection(_Section):
    name: str = Field("minilm", description="Registered name, local folder, or Hugging Face id.")
    init: Literal["pretrained", "random"] = Field(
        "pretrained", description="Pretrained weights, or the same architecture freshly initialised."
    )
    max_length: int = Field(32, ge=4, le=32768, description="Tokens per example (truncation).")
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="Quantized frozen base weights (QLoRA; bitsandbytes on a CUDA GPU)."
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="The base weights as loaded and kept: bfloat16 halves a model's memory (a 1B model: "
        "2.2 GB, not 4.4); LoRA factors stay float32 (PEFT), and what travels is float32.",
    )
    image_size: int | None = Field(
        None, ge=8, description="image_classification: input side in pixels; default: the backbone's own."
    )
    batch_norm: Literal["frozen", "aggregated", "local"] = Field(
        "frozen",
        description="image_classification: BatchNorm statistics stay as loaded, are averaged with the "
        "payload, or stay with each client (FedBN).",
    )
    batch_norm_momentum: float | None = Field(
        None,
        gt=0,
        le=1,
        description="image_classification: BatchNorm's running-average momentum (PyTorch's convention); "
        "default: the model's own (EfficientNet-Lite's is 0.01).",
    )
    layers: list[int] | None = Field(
        None,
        description="Keep only these layers of the transformer's stack (FM indices, increasing); "
        "the rest are dropped. Default: all.",
    )


class PeftSection(_Section):
    method: Literal["lora", "ia3", "prompt_tuning", "head", "full"] = Field(
        "lora", description="What trains and travels: an adapter (+ head), the head only, or every weight."
    )
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    dora: bool = Field(
        False,
        description="LoRA as DoRA (Liu et al. 2024; PEFT's use_dora): W' = m · (W + s·B·A) / ‖W + s·B·A‖ per "
        "column; the magnitude vectors m train and travel with A and B and are averaged like them.",
    )
    target_modules: list[str] | None = Field(
        None, description="Modules to adapt; default: PEFT's per-architecture choice."
    )
    num_virtual_tokens: int = Field(8, ge=1, description="Prompt tuning: soft prompt length.")
    layers: list[int] | None = Field(
        None,
        description="Adapt (lora, ia3) or, with method = 'full', train only these layers (FM indices) "
        "besides the head. Default: every layer.",
    )
    rank_tiers: list[int] | None = Field(
        None, description="Heterogeneous LoRA ranks, e.g. [4, 8, 16]; the largest must equal peft.r."
    )
    rank_assignment: Literal["round_robin", "by_size", "per_client"] = Field(
        "round_robin",
        description="Tier per client: id mod tiers; more data → larger rank; or rank_tiers[k] for client k.",
    )


def _known_encoding(name: str) -> str:
    import codecs

    try:
        codecs.lookup(name)
    except LookupError:
        raise ValueError(f"unknown text encoding {name!r} (e.g. 'utf-8', 'latin-1', 'cp1252')") from None
    return name


class DataSection(_Section):
    name: str = Field("bbc-news", description="Registered dataset, 'csv', 'jsonl', or a HF dataset id.")
    path: str | None = Field(None, description="File for 'csv'/'jsonl' sources.")
    encoding: Annotated[str, AfterValidator(_known_encoding)] = Field(
        "utf-8", description="Text encoding of 'csv'/'jsonl' files (e.g. 'latin-1', 'cp1252', 'utf-16')."
    )
    test_path: str | None = Field(None, description="Optional test file for 'csv'/'jsonl'.")
    text_column: str = Field("text", description="Column holding the input text.")
    label_column: str = Field("label", description="Column holding the class label.")
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="Held-out server test share when the source has no test split."
    )
    client_test_fraction: float = Field(
        0.0, ge=0, lt=1, description="Share of each client's data kept as its local test split."
    )
    deduplicate: bool = Field(
        True,
        description="Drop exact duplicate texts (and test texts seen in training) before splitting.",
    )
    max_examples: int | None = Field(
        None, ge=2, description="Stratified subsample of the training set (quick experiments)."
    )
    max_test_examples: int | None = Field(None, ge=1, description="Stratified subsample of the test set.")
    image_column: str = Field(
        "image", description="Hugging Face image datasets: the column holding the image."
    )
    image_size: int | None = Field(
        None, ge=1, description="Image folders / HF image datasets: resize to this side when loading."
    )
    augment: bool = Field(False, description="image_classification: random crop and flip of training images.")
    hf_config: str | None = Field(None, description="Hugging Face dataset configuration name.")
    hf_train_split: str = Field("train", description="Hugging Face split used for training.")
    hf_test_split: str | None = Field("test", description="Hugging Face split used as the server test set.")


class PartitionSection(_Section):
    method: Registered("partitioner") = Field("dirichlet", description="Partitioner (registered name).")
    num_clients: int = Field(10, ge=1, description="Number of clients the training data is split among.")


class SamplingSection(_Section):
    method: Literal["fixed", "poisson"] = Field(
        "fixed",
        description="fixed: a cohort of exactly m clients; poisson: each client joins with probability q.",
    )
    clients_per_round: int | None = Field(None, ge=1, description="Cohort size; overrides fraction.")
    fraction: float = Field(0.5, gt=0, le=1, description="Share of clients sampled each round.")
    min_clients: int = Field(1, ge=1, description="Fewer successful clients than this skips the round.")


class TrainingSection(_Section):
    local_epochs: float = Field(1.0, gt=0, description="Passes over local data per round.")
    local_steps: int | None = Field(None, ge=1, description="Fixed local steps; overrides epochs.")
    batch_size: int = Field(16, ge=1, description="Local mini-batch size.")
    optimizer: Literal["adamw", "sgd", "adamw8bit"] = Field(
        "adamw",
        description="Local optimizer (fresh every round); adamw8bit: bitsandbytes' 8-bit AdamW (its two "
        "moments in 8 bits), on a CUDA GPU only.",
    )
    lr: float = Field(5e-3, gt=0, le=100, description="Local learning rate (the schedule's peak).")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant",
        description="The local learning rate across rounds: constant, or decaying to lr_min by the last "
        "round linearly or by cosine annealing (FlowerTune's recipes; fedfm.algorithms.schedules).",
    )
    lr_warmup_rounds: int = Field(0, ge=0, description="Rounds of linear warm-up to lr before the decay.")
    lr_min: float = Field(0.0, ge=0, description="The learning rate the schedule decays to.")
    lr_rounds: int | None = Field(
        None, ge=1, description="Rounds the schedule spans; default run.rounds (rounds after it keep lr_min)."
    )
    weight_decay: float = Field(0.0, ge=0, description="Local weight decay.")
    count_costs: bool = Field(
        False,
        description="Count each client's training FLOPs and peak memory (torch's FLOP counter, live "
        "tensors) into its record; a few percent slower.",
    )
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null disables.")
    grad_accumulation: int = Field(1, ge=1, description="Micro-batches of batch_size per local step.")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: autocast forward passes where the device supports bfloat16."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations (less memory).")

    @property
    def scheduled(self) -> bool:
        """Whether the local learning rate changes across rounds (a schedule or a warm-up)."""
        return self.lr_schedule != "constant" or self.lr_warmup_rounds > 0

    def steps_for(self, num_examples: int) -> int:
        """Optimizer steps of one client's local training on ``num_examples`` rows: ``local_steps``
        if set, else ceil(local_epochs · n / (batch_size · grad_accumulation)), at least 1."""
        if self.local_steps:
            return self.local_steps
        per_step = self.batch_size * self.grad_accumulation
        return max(1, math.ceil(self.local_epochs * num_examples / per_step))


class StrategySection(_Section):
    aggregator: Registered("aggregator") = Field("mean", description="Aggregator (registered name).")
    weighting: Literal["examples", "uniform"] = Field(
        "examples", description="Aggregation weight per client: its example count, or 1."
    )
    server_optimizer: Registered("server optimizer") = Field(
        "sgd", description="sgd (FedAvg/FedAvgM), adam, yogi, adagrad."
    )
    objective: Registered("objective") = Field(
        "plain", description="Client objective: plain, fedprox, scaffold."
    )
    lora_aggregation: Registered("LoRA aggregation mode") = Field(
        "naive",
        description="LoRA pairs: average A and B; average B·A, SVD to rank r; or merge B·A into the base.",
    )


class PipelineSection(_Section):
    extra: list[Registered("transform")] = Field(
        default_factory=list,
        description="Update transforms to add by registered name (plug-ins registered with named=True; "
        "each sits at its registered position). Built-in transforms are switched on by their own sections.",
    )


class ValidationSection(_Section):
    max_update_norm: float | None = Field(
        None,
        gt=0,
        description="Reject updates whose L2 norm exceeds this; null: no bound. Under secure aggregation "
        "clients clip to it and the server checks the norm of the sum.",
    )
    max_num_examples: int | None = Field(
        None, ge=1, description="Reject reported example counts above this; default: the training set size."
    )
    unbounded: bool = Field(
        False,
        description="Deployments: accept updates whose influence nothing bounds (no max_update_norm, robust "
        "aggregator, client-level DP or secure aggregation); said every round and flagged in the report.",
    )


class AttackSection(_Section):
    kind: Registered("attack") = Field("none", description="Simulated attack (see fedfm.attacks).")
    fraction: float = Field(0.2, ge=0, le=1, description="Share of each cohort that is malicious.")


class CompressionSection(_Section):
    method: Registered("compression method") = Field(
        "none",
        description="Upload compression (registered name): none, fp16, bf16, q8, q4, topk, randk "
        "(see fedfm.transforms.compression).",
    )


class TaskSection(_Section):
    kind: Registered("task") = Field(
        "classification",
        description="classification (encoder or decoder + head), image_classification, instruction "
        "tuning of a causal LM, or preference (DPO/IPO alignment of a causal LM).",
    )
    baselines: bool = Field(
        False, description="Also train local-only and centralized baselines after the run (or --baselines)."
    )


class PrivacySection(_Section):
    dp: Registered("DP mode") = Field(
        "none",
        description="Differential privacy: client-level DP-FedAvg, or example-level DP-SGD (Opacus).",
    )
    noise: Literal["central", "distributed"] = Field(
        "central",
        description="client DP: the server adds Gaussian noise, or each client adds a Skellam share "
        "(integer noise that survives secure aggregation; needs secagg).",
    )
    clip_norm: float = Field(1.0, gt=0, description="L2 clip norm C (initial C when adaptive).")
    adaptive_clipping: bool = Field(False, description="client DP: track a quantile of update norms.")
    target_quantile: float = Field(0.5, gt=0, lt=1, description="Adaptive clipping: target quantile γ.")
    clip_lr: float = Field(0.2, gt=0, le=10, description="Adaptive clipping: geometric learning rate η_C.")
    clipped_count_stddev: float | None = Field(
        None, gt=0, description="Adaptive clipping: σ_b of the clipped-count sum; default max(m / 20, z)."
    )
    noise_multiplier: float | None = Field(
        None, ge=0, description="z: noise std / C. Default: calibrated from target_epsilon."
    )
    target_epsilon: float | None = Field(
        None, gt=0, description="Budget ε: calibrates z when unset; the run stops before exceeding it."
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the (ε, δ) guarantee.")
    accountant: Literal["rdp", "pld"] = Field("rdp", description="dp-accounting accountant (pld: poisson).")
    noise_seed: int | None = Field(
        None,
        description="Reproducible privacy noise and DP cohorts from this seed. Default (unset): the OS "
        "CSPRNG. With a seed the guarantee does not hold against anyone who knows it.",
    )
    distributed_bits: int = Field(
        32, ge=16, le=48, description="Distributed noise: modulus bits of the secure sum (Skellam)."
    )
    wrap_stddevs: float = Field(
        8.0,
        ge=2,
        le=64,
        description="Distributed noise: standard deviations of a summed entry the field holds.",
    )


class SecAggSection(_Section):
    enabled: bool = Field(False, description="Secure aggregation: the server learns only the sum.")
    neighbors: int | None = Field(
        None, ge=2, description="SecAgg+ graph degree k; default: every pair (SecAgg)."
    )
    threshold: float = Field(
        0.67, gt=0.5, le=1, description="Share of a client's share holders needed to unmask it."
    )
    clip_range: float = Field(1.0, gt=0, description="Each entry is clipped to [−c, c] before encoding.")
    quantization_bits: int = Field(24, ge=4, le=40, description="Fixed-point bits per entry (signed).")
    signatures: bool = Field(
        False,
        description="Signed key adverts and the consistency check (Bonawitz et al. 2017) against a server "
        "that lies about who dropped; deployments need provisioned client certificates.",
    )
    exclude_offenders: bool = Field(
        True,
        description="A deployed client that secure aggregation names as an offender (a malformed or "
        "inconsistent protocol message, wrong shares, a masked input of the wrong shape) takes no part in "
        "later rounds; false gives it another chance each round.",
    )


class SyntheticSection(_Section):
    mode: Registered("synthetic mode") = Field(
        "none",
        description="FM-generated data (`fedfm synth`): server warm-up before round 1, client augmentation, "
        "both, or only synthetic data (the synthetic-only baseline).",
    )
    path: str | None = Field(None, description="JSONL written by `fedfm synth` (text, label, provenance).")
    warmup_steps: int = Field(
        30, ge=1, description="Server optimizer steps on synthetic data before round 1."
    )
    warmup_lr: float | None = Field(None, gt=0, description="Warm-up learning rate; default training.lr.")
    augment_per_client: int = Field(20, ge=1, description="Synthetic examples added to each client.")
    augment_classes: Literal["all", "missing"] = Field(
        "all", description="Augment with every class, or only the classes a client has no example of."
    )
    max_examples: int | None = Field(None, ge=1, description="Use at most this many synthetic examples.")


class SharingSection(_Section):
    """Computation sharing: clients too small for the FM still take part (docs/computation-sharing.md)."""

    mode: Registered("sharing mode") = Field(
        "none",
        description="none (every client runs the whole FM), offsite (clients tune an emulator), or split "
        "(clients run the bottom layers, the server the rest).",
    )


class PersonalizationSection(_Section):
    """Personalized federated fine-tuning (docs/personalization.md): personal tensors that stay
    on each client, and per-client evaluation of the personal models."""

    method: Registered("personalization method") = Field(
        "none",
        description="none; fedsa (FedSA-LoRA: LoRA A shared, B personal); fedper (the head personal); "
        "fedrep (the head personal, trained alone before the body); ditto (a personal adapter "
        "regularised towards the global one); ifca (clustered FL: k global adapters, each client trains "
        "the one with its lowest loss); local (local-only: every tensor personal, nothing travels).",
    )
    finetune_steps: int = Field(
        0, ge=0, description="After the last round, each client fine-tunes this many steps from its model "
        "and is scored again (local fine-tuning after FL); 0: off.",
    )  # fmt: skip
    finetune_lr: float | None = Field(
        None, gt=0, description="Local fine-tuning's learning rate; default training.lr."
    )


class EvalSection(_Section):
    every: int = Field(1, ge=1, description="Evaluate the global model every N rounds (and last).")
    at_start: bool = Field(True, description="Evaluate the initial global model as round 0.")
    batch_size: int = Field(64, ge=1, description="Evaluation batch size.")
    local: bool = Field(False, description="Also evaluate on every client's local test split.")


class SystemsSection(_Section):
    """Client systems on a virtual clock (docs/systems.md): compute speed, bandwidth and
    availability per client, drawn from the seed or read from FedScale-style traces."""

    enabled: bool = Field(False, description="Simulate client systems; rounds report virtual time.")
    step_s: float = Field(1.0, gt=0, description="Median virtual seconds one local step takes.")
    step_sigma: float = Field(
        0.0, ge=0, le=4, description="Log-normal σ of clients' step times (0: all alike; 1: heavy-tailed)."
    )
    down_mbps: float = Field(20.0, gt=0, description="Median download bandwidth, Mbit/s.")
    up_mbps: float = Field(5.0, gt=0, description="Median upload bandwidth, Mbit/s.")
    bandwidth_sigma: float = Field(0.0, ge=0, le=4, description="Log-normal σ of clients' bandwidths.")
    availability: Literal["always", "diurnal", "random", "trace"] = Field(
        "always",
        description="always; diurnal (online online_fraction of every period_s, each client from its own "
        "phase); random (exponential on/off spells, mean online mean_online_s, online_fraction of the "
        "time); trace (systems.behavior_trace).",
    )
    online_fraction: float = Field(0.3, gt=0, le=1, description="diurnal/random: share of time online.")
    period_s: float = Field(86400.0, gt=0, description="diurnal: the period (a day).")
    mean_online_s: float = Field(3600.0, gt=0, description="random: mean length of an online spell.")
    device_trace: str | None = Field(
        None,
        description="FedScale client_device_capacity (.json or .pkl): step time and bandwidth per client.",
    )
    behavior_trace: str | None = Field(
        None, description="FedScale client_behave_trace (.json or .pkl): when each client is online."
    )
    over_selection: float = Field(
        1.0, ge=1, le=10, description="sync: sample ceil(m × this) clients, keep the first m to deliver."
    )
    deadline_s: float | None = Field(
        None, gt=0, description="sync: updates delivered later than this many virtual seconds are dropped."
    )


class FedBuffSection(_Section):
    """Asynchronous aggregation (run.mode = "async"; docs/systems.md): FedBuff."""

    buffer_size: int = Field(10, ge=1, description="K: updates buffered before each server step.")
    concurrency: int | None = Field(
        None, ge=1, description="Clients training at once; default: the cohort size of [sampling]."
    )
    staleness: Literal["constant", "polynomial", "hinge"] = Field(
        "polynomial",
        description="Weight s(τ) of an update τ server steps stale (fedfm.algorithms.staleness).",
    )
    staleness_a: float = Field(0.5, gt=0, description="polynomial: (1+τ)^−a; hinge: the slope a.")
    staleness_b: int = Field(4, ge=0, description="hinge: staleness up to b counts fully.")
    max_staleness: int | None = Field(
        None, ge=0, description="Updates staler than this many server steps are rejected; default: none."
    )
    max_per_client: int = Field(
        1, ge=1, description="Updates one client may have in a buffer (in flight or delivered)."
    )


Section = _Section  # the base of every section, a component's own section too
