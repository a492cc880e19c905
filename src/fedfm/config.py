"""Run configuration: pydantic models per component, TOML loading, dotted overrides, resolved dump.

Every field has a default, so an empty config is the embedded default experiment (BBC News,
pretrained MiniLM + LoRA, 10 Dirichlet(0.5) clients, FedAvg). Unknown keys and bad values are
rejected before any work starts, with the dotted field name and the allowed values.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration that cannot run; the message names each bad field."""


class _Section(BaseModel):
    # NaN and ±inf are refused in every float field (an lr of inf would train to NaN silently)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _registered(kind: str, name: str) -> str:
    from fedfm import components

    registry = components.registry_for(kind)
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; allowed: {', '.join(registry.names())}")
    return name


class RunSection(_Section):
    name: str = Field("fedfm", description="A label for this experiment; part of the run folder name.")
    rounds: int = Field(7, ge=1, description="Number of federated rounds.")
    seed: int = Field(0, description="Root seed; every random draw is derived from it.")
    engine: str = Field("inprocess", description="Execution engine (registered name).")
    device: str = Field("auto", description="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:N'.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; default: torch's choice.")
    output_root: str = Field("runs", description="Parent folder of run folders when --output is not given.")

    @field_validator("engine")
    @classmethod
    def _engine(cls, v: str) -> str:
        return _registered("engine", v)


class ModelSection(_Section):
    name: str = Field("minilm", description="Registered name, local folder, or Hugging Face id.")
    init: Literal["pretrained", "random"] = Field(
        "pretrained", description="Pretrained weights, or the same architecture freshly initialised."
    )
    max_length: int = Field(32, ge=4, le=32768, description="Tokens per example (truncation).")
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="Quantized frozen base weights (QLoRA; bitsandbytes on a CUDA GPU)."
    )


class PeftSection(_Section):
    method: Literal["lora", "ia3", "prompt_tuning", "head", "full"] = Field(
        "lora", description="What trains and travels: an adapter (+ head), the head only, or every weight."
    )
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] | None = Field(
        None, description="Modules to adapt; default: PEFT's per-architecture choice."
    )
    num_virtual_tokens: int = Field(8, ge=1, description="Prompt tuning: soft prompt length.")
    rank_tiers: list[int] | None = Field(
        None, description="Heterogeneous LoRA ranks, e.g. [4, 8, 16]; the largest must equal peft.r."
    )
    rank_assignment: Literal["round_robin", "by_size", "per_client"] = Field(
        "round_robin",
        description="Tier per client: id mod tiers; more data → larger rank; or rank_tiers[k] for client k.",
    )


class DataSection(_Section):
    name: str = Field("bbc-news", description="Registered dataset, 'csv', 'jsonl', or a HF dataset id.")
    path: str | None = Field(None, description="File for 'csv'/'jsonl' sources.")
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
    hf_config: str | None = Field(None, description="Hugging Face dataset configuration name.")
    hf_train_split: str = Field("train", description="Hugging Face split used for training.")
    hf_test_split: str | None = Field("test", description="Hugging Face split used as the server test set.")


class PartitionSection(_Section):
    method: str = Field("dirichlet", description="Partitioner (registered name).")
    num_clients: int = Field(10, ge=1, description="Number of clients the training data is split among.")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (smaller = more non-IID).")
    min_size: int = Field(10, ge=0, description="Dirichlet: minimum examples per client.")
    classes_per_client: int = Field(2, ge=1, description="Shards: label shards per client.")
    column: str | None = Field(None, description="Natural: the column whose values are clients.")
    sigma: float = Field(1.0, ge=0, description="Quantity: log-normal spread of client sizes.")

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        return _registered("partitioner", v)


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
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="Local optimizer (fresh every round).")
    lr: float = Field(5e-3, gt=0, le=100, description="Local learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Local weight decay.")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null disables.")
    grad_accumulation: int = Field(1, ge=1, description="Micro-batches of batch_size per local step.")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: autocast forward passes where the device supports bfloat16."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations (less memory).")


class StrategySection(_Section):
    aggregator: str = Field("mean", description="Aggregator (registered name).")
    weighting: Literal["examples", "uniform"] = Field(
        "examples", description="Aggregation weight per client: its example count, or 1."
    )
    server_optimizer: str = Field("sgd", description="sgd (FedAvg/FedAvgM), adam, yogi, adagrad.")
    server_lr: float = Field(1.0, gt=0, le=100, description="Server learning rate (1.0 with sgd is FedAvg).")
    server_momentum: float = Field(0.0, ge=0, lt=1, description="sgd server momentum (FedAvgM).")
    beta1: float = Field(0.9, ge=0, lt=1, description="FedOpt first-moment decay.")
    beta2: float = Field(0.99, ge=0, lt=1, description="FedOpt second-moment decay.")
    tau: float = Field(1e-3, gt=0, description="FedOpt adaptivity (epsilon).")
    objective: str = Field("plain", description="Client objective: plain, fedprox, scaffold.")
    lora_aggregation: Literal["naive", "exact", "stack"] = Field(
        "naive",
        description="LoRA pairs: average A and B; average B·A, SVD to rank r; or merge B·A into the base.",
    )
    trim_ratio: float = Field(0.1, ge=0, lt=0.5, description="trimmed_mean: share β cut from each end.")
    byzantine: int = Field(1, ge=0, description="krum/multi_krum/bulyan: Byzantine clients f tolerated.")
    krum_m: int | None = Field(None, ge=1, description="multi_krum: updates averaged (default n − f).")
    norm_bound: float = Field(1.0, gt=0, description="norm_bound: L2 bound each update is scaled to.")
    gm_iters: int = Field(10, ge=1, description="geometric_median: smoothed Weiszfeld iterations.")
    mu: float = Field(0.01, ge=0, description="FedProx proximal weight.")

    @field_validator("aggregator")
    @classmethod
    def _aggregator(cls, v: str) -> str:
        return _registered("aggregator", v)

    @field_validator("server_optimizer")
    @classmethod
    def _server_optimizer(cls, v: str) -> str:
        return _registered("server optimizer", v)

    @field_validator("objective")
    @classmethod
    def _objective(cls, v: str) -> str:
        return _registered("objective", v)


class ValidationSection(_Section):
    max_update_norm: float | None = Field(
        None, gt=0, description="Reject updates whose L2 norm exceeds this; null: no bound."
    )
    max_num_examples: int | None = Field(
        None, ge=1, description="Reject reported example counts above this; default: the training set size."
    )


class AttackSection(_Section):
    kind: Literal[
        "none",
        "label_flip",
        "backdoor",
        "sign_flip",
        "scale",
        "gaussian",
        "alie",
        "nan",
        "inf",
        "wrong_shape",
    ] = Field("none", description="Simulated attack (see fedfm.attacks).")
    fraction: float = Field(0.2, ge=0, le=1, description="Share of each cohort that is malicious.")
    scale: float = Field(10.0, description="sign_flip / scale: factor applied to the update.")
    noise_std: float = Field(1.0, ge=0, description="gaussian: standard deviation of the sent noise.")
    target_label: int = Field(0, ge=0, description="backdoor: the label the trigger should produce.")
    trigger: str = Field("cf mn bb", min_length=1, description="backdoor: phrase prepended to the text.")
    poison_fraction: float = Field(0.5, gt=0, le=1, description="backdoor: share of poisoned rows per batch.")


class CompressionSection(_Section):
    method: str = Field(
        "none",
        description="Upload compression (registered name): none, fp16, bf16, q8, q4, topk, randk "
        "(see fedfm.transforms.compression).",
    )
    block_size: int = Field(0, ge=0, description="q8/q4: values per scale block; 0: one scale per tensor.")
    ratio: float = Field(0.01, gt=0, le=1, description="topk/randk: share of entries sent.")
    error_feedback: bool = Field(True, description="topk: carry the unsent rest into the next round.")

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        return _registered("compression method", v)


class TaskSection(_Section):
    kind: Literal["classification", "instruction"] = Field(
        "classification",
        description="classification (encoder or decoder + head), or instruction tuning of a causal LM.",
    )
    packing: bool = Field(False, description="instruction: pack each batch's examples into full rows.")
    system_prompt: str | None = Field(
        None, description="instruction: a system message put before every conversation."
    )
    eval_prompts: list[str] | None = Field(
        None, description="instruction: prompts answered greedily each eval; default: held-out ones."
    )
    num_eval_prompts: int = Field(8, ge=0, description="instruction: held-out prompts generated each eval.")
    max_new_tokens: int = Field(32, ge=1, description="instruction: generation length for eval prompts.")
    baselines: bool = Field(
        False, description="Also train local-only and centralized baselines after the run (or --baselines)."
    )


class PrivacySection(_Section):
    dp: Literal["none", "client", "example"] = Field(
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


class RaySection(_Section):
    address: str | None = Field(
        None, description="Ray cluster to join (ray.init(address)); default: start a local one."
    )
    num_workers: int = Field(2, ge=1, description="Long-lived workers, each with one copy of the base model.")
    cpus_per_worker: float = Field(
        1.0, gt=0, description="CPUs reserved per worker (also its torch threads)."
    )
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker (fractions share one GPU).")


class SyntheticSection(_Section):
    mode: Literal["none", "warmup", "augment", "both", "only"] = Field(
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


class EvalSection(_Section):
    every: int = Field(1, ge=1, description="Evaluate the global model every N rounds (and last).")
    at_start: bool = Field(True, description="Evaluate the initial global model as round 0.")
    batch_size: int = Field(64, ge=1, description="Evaluation batch size.")
    local: bool = Field(False, description="Also evaluate on every client's local test split.")


class RunConfig(_Section):
    """The whole experiment. ``RunConfig()`` is the embedded default experiment."""

    run: RunSection = Field(default_factory=RunSection)
    task: TaskSection = Field(default_factory=TaskSection)
    model: ModelSection = Field(default_factory=ModelSection)
    peft: PeftSection = Field(default_factory=PeftSection)
    data: DataSection = Field(default_factory=DataSection)
    partition: PartitionSection = Field(default_factory=PartitionSection)
    sampling: SamplingSection = Field(default_factory=SamplingSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    strategy: StrategySection = Field(default_factory=StrategySection)
    eval: EvalSection = Field(default_factory=EvalSection)
    compression: CompressionSection = Field(default_factory=CompressionSection)
    validation: ValidationSection = Field(default_factory=ValidationSection)
    attack: AttackSection = Field(default_factory=AttackSection)
    privacy: PrivacySection = Field(default_factory=PrivacySection)
    secagg: SecAggSection = Field(default_factory=SecAggSection)
    synthetic: SyntheticSection = Field(default_factory=SyntheticSection)
    ray: RaySection = Field(default_factory=RaySection)

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        from fedfm.algorithms.robust import min_cohort
        from fedfm.sampling import cohort_size

        cohort = cohort_size(
            self.partition.num_clients, self.sampling.clients_per_round, self.sampling.fraction
        )
        if cohort < self.sampling.min_clients:
            raise ValueError(
                f"sampling.min_clients ({self.sampling.min_clients}) exceeds the cohort size ({cohort})"
            )
        needed = min_cohort(self.strategy)
        if cohort < needed:
            raise ValueError(
                f"strategy.aggregator = {self.strategy.aggregator!r} with strategy.byzantine = "
                f"{self.strategy.byzantine} needs at least {needed} clients per round; the cohort is "
                f"{cohort} (raise sampling.clients_per_round / sampling.fraction or lower byzantine)"
            )
        if self.sampling.clients_per_round and self.sampling.clients_per_round > self.partition.num_clients:
            raise ValueError(
                f"sampling.clients_per_round ({self.sampling.clients_per_round}) exceeds "
                f"partition.num_clients ({self.partition.num_clients})"
            )
        if self.eval.local and self.data.client_test_fraction == 0:
            raise ValueError("eval.local needs data.client_test_fraction > 0")
        s = self.strategy
        lora_aware = s.lora_aggregation != "naive" or self.peft.rank_tiers
        modes = "strategy.lora_aggregation = 'exact'/'stack' and peft.rank_tiers"
        if lora_aware and self.peft.method != "lora":
            raise ValueError(f"{modes} need peft.method = 'lora'")
        if lora_aware and s.aggregator != "mean":
            raise ValueError(
                f"{modes} aggregate with the weighted mean; "
                f"strategy.aggregator = {s.aggregator!r} is not supported with them"
            )
        if s.lora_aggregation == "stack" and (s.server_optimizer, s.server_lr, s.server_momentum) != (
            "sgd",
            1,
            0,
        ):
            raise ValueError(
                "strategy.lora_aggregation = 'stack' merges the average into the base weights (FedAvg): "
                "it needs server_optimizer = 'sgd', server_lr = 1.0, server_momentum = 0"
            )
        tiers = self.peft.rank_tiers
        if tiers is not None and (not tiers or min(tiers) < 1 or max(tiers) != self.peft.r):
            raise ValueError(
                f"peft.rank_tiers {tiers} must be positive with max equal to peft.r ({self.peft.r})"
            )
        if tiers and self.peft.rank_assignment == "per_client" and len(tiers) != self.partition.num_clients:
            raise ValueError(
                f"peft.rank_assignment = 'per_client' needs one rank per client: {len(tiers)} given for "
                f"partition.num_clients = {self.partition.num_clients}"
            )
        if tiers and s.objective == "scaffold":
            raise ValueError("strategy.objective = 'scaffold' is not supported with peft.rank_tiers")
        if tiers and self.attack.kind == "alie":
            raise ValueError("attack.kind = 'alie' is not supported with peft.rank_tiers (ranks differ)")
        if self.partition.method == "natural" and not self.partition.column:
            raise ValueError("partition.column is required for partition.method = 'natural'")
        _privacy_checks(self)
        _task_checks(self)
        _synthetic_checks(self)
        _engine_checks(self)
        return self

    def to_toml(self) -> str:
        return tomli_w.dumps(self.model_dump(exclude_none=True))


_UPDATE_ATTACKS = ("sign_flip", "scale", "gaussian", "alie", "nan", "inf", "wrong_shape")


def _task_checks(cfg: RunConfig) -> None:
    if cfg.task.kind != "instruction":
        return
    if cfg.attack.kind in ("label_flip", "backdoor"):
        raise ValueError(f"attack.kind = {cfg.attack.kind!r} poisons labels: classification only")
    if cfg.peft.method == "head":
        raise ValueError("peft.method = 'head' has no meaning for a causal LM (no classification head)")
    if cfg.strategy.lora_aggregation == "stack" and cfg.task.baselines:
        raise ValueError("task.baselines is not supported with strategy.lora_aggregation = 'stack'")
    if cfg.model.name == "minilm":
        raise ValueError("task.kind = 'instruction' needs a causal LM (e.g. model.name = 'smollm2-135m')")


def _engine_checks(cfg: RunConfig) -> None:
    if cfg.run.engine != "ray":
        return
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise ValueError("run.engine = 'ray' needs Ray: pip install 'fedfm[ray]'")
    if cfg.secagg.enabled:
        raise ValueError("run.engine = 'ray' does not run secure aggregation yet (use 'inprocess')")
    if cfg.strategy.lora_aggregation == "stack":
        raise ValueError(
            "run.engine = 'ray' does not support strategy.lora_aggregation = 'stack' (it moves the base)"
        )


def _synthetic_checks(cfg: RunConfig) -> None:
    sy = cfg.synthetic
    if sy.mode == "none":
        return
    if not sy.path:
        raise ValueError(
            f"synthetic.mode = {sy.mode!r} needs synthetic.path (a JSONL file from `fedfm synth`)"
        )
    if not Path(sy.path).expanduser().is_file():
        raise ValueError(f"synthetic.path {sy.path!r} is not a file")
    if cfg.task.kind != "classification":
        raise ValueError("synthetic data (synthetic.mode) is supported for task.kind = 'classification'")


def _require_privacy_extra(field: str) -> None:
    import importlib.util

    missing = [m for m in ("dp_accounting", "cryptography", "opacus") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(
            f"{field} needs the privacy extra ({', '.join(missing)} missing): pip install 'fedfm[privacy]'"
        )


def _privacy_checks(cfg: RunConfig) -> None:
    """What DP and secure aggregation compose with, and why the rest does not."""
    p, sa, s = cfg.privacy, cfg.secagg, cfg.strategy
    if p.dp != "none" or sa.enabled:
        _require_privacy_extra("privacy.dp" if p.dp != "none" else "secagg.enabled")
    if p.dp != "none" and p.noise_multiplier is None and p.target_epsilon is None:
        raise ValueError(f"privacy.dp = {p.dp!r} needs privacy.noise_multiplier or privacy.target_epsilon")
    if p.accountant == "pld" and cfg.sampling.method != "poisson":
        raise ValueError("privacy.accountant = 'pld' needs sampling.method = 'poisson' (use 'rdp' for fixed)")
    if p.dp == "client":
        if s.weighting != "uniform":
            raise ValueError(
                "privacy.dp = 'client' bounds each client's influence by C, which example-count weights "
                "would break: set strategy.weighting = 'uniform'"
            )
        if s.aggregator != "mean":
            raise ValueError(
                f"privacy.dp = 'client' is analysed for the noised mean; strategy.aggregator = "
                f"{s.aggregator!r} has no such guarantee"
            )
        if s.objective == "scaffold":
            raise ValueError("privacy.dp = 'client' does not protect SCAFFOLD's control variates")
        if p.noise == "distributed" and not sa.enabled:
            raise ValueError(
                "privacy.noise = 'distributed' needs secagg.enabled = true: one client's noise share "
                "alone protects little once the server sees it"
            )
    elif p.dp == "example" and (s.objective != "plain" or cfg.peft.rank_tiers):
        raise ValueError(
            "privacy.dp = 'example' (DP-SGD) needs strategy.objective = 'plain' and no peft.rank_tiers: "
            "proximal terms and control variates are not per-example gradients"
        )
    if p.noise == "distributed" and p.accountant == "pld":
        raise ValueError("privacy.accountant = 'pld' applies to central noise; distributed noise uses RDP")
    if p.dp == "none" and p.noise_seed is not None:
        raise ValueError("privacy.noise_seed applies to runs with privacy.dp")
    if p.dp != "client" and (p.noise == "distributed" or p.adaptive_clipping):
        raise ValueError("privacy.noise and privacy.adaptive_clipping apply to privacy.dp = 'client'")
    lora_aware = s.lora_aggregation != "naive" or cfg.peft.rank_tiers
    if p.dp == "client" and lora_aware:
        raise ValueError("privacy.dp = 'client' needs strategy.lora_aggregation = 'naive' and no rank tiers")
    if not sa.enabled:
        return
    why = "the server sees only the sum under secure aggregation"
    if s.aggregator != "mean":
        raise ValueError(f"secagg needs strategy.aggregator = 'mean' ({why}; robust rules need each update)")
    if lora_aware:
        raise ValueError("secagg needs strategy.lora_aggregation = 'naive' and no peft.rank_tiers")
    if cfg.compression.method != "none":
        raise ValueError("secagg quantizes updates itself: set compression.method = 'none'")
    if cfg.validation.max_update_norm is not None:
        raise ValueError(f"validation.max_update_norm cannot be checked ({why}); bound updates with clipping")
    if cfg.attack.kind in _UPDATE_ATTACKS:
        raise ValueError(
            f"attack.kind = {cfg.attack.kind!r} corrupts single updates, which {why}; "
            "data attacks (label_flip, backdoor) still apply"
        )
    if sa.neighbors is not None and sa.neighbors % 2:
        raise ValueError("secagg.neighbors must be even (each client links k/2 ring neighbours each side)")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"partition.alpha=0.1"`` → (["partition", "alpha"], 0.1); values are TOML, else strings."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    path = [p.strip() for p in key.strip().split(".")]
    if len(path) < 2 or not all(path):
        raise ConfigError(f"override {text!r}: the key must be section.field")
    raw = raw.strip()
    if raw.lstrip("+-") in ("nan", "inf"):
        return path, raw  # a name like attack.kind=nan; float fields still read "inf" as infinity
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path, value


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A new nested dict with each ``section.field=value`` applied."""
    result: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return result


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see `fedfm run --help` and docs/configuration.md)"
        got = e.get("input")
        shown = f" (got {got!r})" if e["type"] != "extra_forbidden" and not isinstance(got, dict) else ""
        lines.append(f"  {field}: {msg}{shown}")
    return "invalid configuration:\n" + "\n".join(lines)


def make_config(data: Mapping[str, Any] | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Validate a nested mapping (plus dotted overrides) into a ``RunConfig``."""
    merged = apply_overrides(data or {}, overrides)
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Read a TOML experiment file (or none: the default experiment) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{p}: not valid TOML: {err}") from None
    return make_config(data, overrides)
