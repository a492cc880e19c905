"""Run configuration: pydantic models per component, TOML loading, dotted overrides, resolved dump.

Every field has a default, so an empty config is the embedded default experiment (BBC News,
pretrained MiniLM + LoRA, 10 Dirichlet(0.5) clients, FedAvg). Unknown keys and bad values are
rejected before any work starts, with the dotted field name and the allowed values.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import Field, ValidationError, model_validator

from fedfm.config.options import add_options, add_section, registered_kinds
from fedfm.config.sections import (  # noqa: F401  (re-exported: the sections are part of the config API)
    AttackSection,
    CompressionSection,
    DataSection,
    EvalSection,
    FedBuffSection,
    ModelSection,
    PartitionSection,
    PeftSection,
    PersonalizationSection,
    PipelineSection,
    PrivacySection,
    Registered,
    RunSection,
    SamplingSection,
    SecAggSection,
    SharingSection,
    StrategySection,
    SyntheticSection,
    SystemsSection,
    TaskSection,
    TrainingSection,
    ValidationSection,
    _Section,
    plain,
)
from fedfm.registry import on_options, registry_for


class ConfigError(ValueError):
    """A configuration that cannot run; the message names each bad field."""


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
    pipeline: PipelineSection = Field(default_factory=PipelineSection)
    attack: AttackSection = Field(default_factory=AttackSection)
    privacy: PrivacySection = Field(default_factory=PrivacySection)
    secagg: SecAggSection = Field(default_factory=SecAggSection)
    synthetic: SyntheticSection = Field(default_factory=SyntheticSection)
    sharing: SharingSection = Field(default_factory=SharingSection)
    personalization: PersonalizationSection = Field(default_factory=PersonalizationSection)
    systems: SystemsSection = Field(default_factory=SystemsSection)
    fedbuff: FedBuffSection = Field(default_factory=FedBuffSection)

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, data: Any) -> Any:
        """The task kind's defaults for fields the config leaves out (``TaskKind.defaults``)."""
        if not isinstance(data, Mapping):
            return data
        kind = data.get("task", {}).get("kind") if isinstance(data.get("task"), Mapping) else None
        TASKS = registry_for("task")  # noqa: N806

        if kind is None or kind not in TASKS:
            return data
        defaults = TASKS.get(kind).defaults
        if not defaults:
            return data
        out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
        for group in defaults:
            first_section, first = next(iter(group)).split(".")
            if not isinstance(out.get(first_section, {}), dict) or first in out.get(first_section, {}):
                continue  # the user chose this group's first field: the rest is theirs too
            for dotted, value in group.items():
                section, name = dotted.split(".")
                out.setdefault(section, {}).setdefault(name, value)
        return out

    def clients_inferred(self) -> bool:
        """Natural partitioning without ``partition.num_clients``: the client count is the number
        of distinct values of ``partition.column``, known once the data is read
        (``fedfm.api.natural_clients``); until then the checks on the cohort size wait."""
        from fedfm.data.partition import by_column

        p = self.partition
        return by_column(p) and bool(p.column) and "num_clients" not in p.model_fields_set

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        from fedfm.algorithms.robust import min_cohort
        from fedfm.algorithms.sampling import cohort_size

        if self.clients_inferred():
            return self._other_checks()
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
        return self._other_checks()

    def _other_checks(self) -> RunConfig:
        if self.eval.local and self.data.client_test_fraction == 0:
            raise ValueError("eval.local needs data.client_test_fraction > 0")
        tiers = self.peft.rank_tiers
        if tiers is not None and (not tiers or min(tiers) < 1 or max(tiers) != self.peft.r):
            raise ValueError(
                f"peft.rank_tiers {tiers} must be positive with max equal to peft.r ({self.peft.r})"
            )
        per_client = tiers and self.peft.rank_assignment == "per_client" and not self.clients_inferred()
        if per_client and len(tiers) != self.partition.num_clients:
            raise ValueError(
                f"peft.rank_assignment = 'per_client' needs one rank per client: {len(tiers)} given for "
                f"partition.num_clients = {self.partition.num_clients}"
            )
        if self.peft.layers is not None and self.peft.method in ("head", "prompt_tuning", "ia3"):
            raise ValueError(
                f"peft.layers does not apply to peft.method = {self.peft.method!r} (only to lora and full); "
                "leave it unset"
            )
        t = self.training
        if t.scheduled:
            span = t.lr_rounds or self.run.rounds
            if t.lr_warmup_rounds >= span and t.lr_schedule != "constant":
                raise ValueError(
                    f"training.lr_warmup_rounds = {t.lr_warmup_rounds} leaves no round of the "
                    f"{t.lr_schedule} decay (it spans {span} rounds: training.lr_rounds or run.rounds)"
                )
            if t.lr_min > t.lr:
                raise ValueError(f"training.lr_min = {t.lr_min:g} is above training.lr = {t.lr:g}")
        if t.optimizer == "adamw8bit" and self.run.device == "cpu":
            raise ValueError(
                "training.optimizer = 'adamw8bit' runs on a CUDA GPU (bitsandbytes) and run.device = 'cpu'; "
                "use training.optimizer = 'adamw'"
            )
        from fedfm.data.partition import by_column

        if by_column(self.partition) and not self.partition.column:
            raise ValueError(f"partition.column is required for partition.method = {self.partition.method!r}")
        _component_checks(self)
        from fedfm.config.rules import check_systems

        check_systems(self)
        return self

    def to_toml(self) -> str:
        """The resolved config as TOML; it reads back to the same values (``plain``)."""
        return tomli_w.dumps(plain(self))


# where the components that name no section of their own keep their options
_OTHER_HOSTS = {"dataset": "data", "model": "model"}


def option_host(kind: str) -> str | None:
    """The section a component of ``kind`` brings its options to: the one that names it."""
    for name, field in RunConfig.model_fields.items():
        if kind in registered_kinds(field.annotation) or _OTHER_HOSTS.get(kind) == name:
            return name
    return None


def _host_options(kind: str, name: str, options, own: str | None = None) -> None:
    if own is not None:  # a section of its own: [own]
        add_section(RunConfig, own, options, kind, name)
        return
    section = option_host(kind)
    if section is None:
        raise TypeError(f"{kind} {name!r}: no config section names a {kind}, so it cannot bring options")
    add_options(RunConfig.model_fields[section].annotation, kind, name, options)
    RunConfig.model_rebuild(force=True)


on_options(_host_options)


def _component_checks(cfg: RunConfig) -> None:
    """The rules that live with the components: every registered transform's, and those of the
    chosen sharing mode, task kind, protocol and engine (each raises ``ValueError`` naming the
    field). The configuration asks the registries by kind (``registry_for``); it imports no
    component package."""
    from fedfm.algorithms.lora import LORA_AGGREGATION, check_lora
    from fedfm.data.synthetic import check_synthetic
    from fedfm.transforms.base import check_transforms
    from fedfm.types import EngineTraits

    check_lora(cfg)
    check_transforms(cfg)
    check_synthetic(cfg)
    chosen = {
        "sharing mode": cfg.sharing.mode,
        "task": cfg.task.kind,
        "protocol": cfg.run.protocol,
        "engine": cfg.run.engine,
    }
    entries = {kind: registry_for(kind).get(name) for kind, name in chosen.items()}
    for entry in entries.values():
        check = getattr(entry, "check", None)
        if check is not None:
            check(cfg)
    traits = EngineTraits.of(entries["engine"], cfg)
    if traits.grouped:
        check_batchable(cfg, traits.grouped)
    if LORA_AGGREGATION.get(cfg.strategy.lora_aggregation).merges_into_base and not traits.shared_base:
        raise ValueError(
            f"run.engine = {cfg.run.engine!r} does not support strategy.lora_aggregation = "
            f"{cfg.strategy.lora_aggregation!r} (it moves the base)"
        )


BATCHABLE_PEFT = ("lora", "head")


def check_batchable(cfg, who: str) -> None:
    """Raise ``ValueError`` naming the field that the batched training of groups cannot run with."""
    from fedfm.privacy.guarantees import dp_mode

    if cfg.peft.method not in BATCHABLE_PEFT:
        raise ValueError(
            f"{who} batches LoRA and heads; peft.method = {cfg.peft.method!r} does not batch "
            "(use run.engine = 'inprocess')"
        )
    if cfg.peft.dora:
        raise ValueError(
            f"{who} batches plain LoRA; peft.dora is not built there (use run.engine = 'inprocess')"
        )
    if cfg.training.optimizer == "adamw8bit":
        raise ValueError(
            f"{who} steps stacked AdamW or SGD; training.optimizer = 'adamw8bit' is not built there"
        )
    if cfg.training.scheduled:
        raise ValueError(f"{who} steps groups at training.lr; training.lr_schedule is not built there")
    if dp_mode(cfg).example_level:
        raise ValueError(
            f"{who} cannot run DP-SGD (privacy.dp = 'example'): Opacus clips per example on one "
            "client's model at a time (use run.engine = 'inprocess')"
        )
    if cfg.training.count_costs:
        raise ValueError(
            f"{who} trains clients together in one pass: training.count_costs counts one client's "
            "training at a time (use run.engine = 'inprocess')"
        )
    kind = registry_for("task").get(cfg.task.kind)
    if not kind.batchable:
        raise ValueError(f"{who}: task.kind = {cfg.task.kind!r} has no batched loss")
    if kind.check_batched is not None:
        kind.check_batched(cfg, who)
    from fedfm.algorithms.personal import PERSONAL_METHODS

    if PERSONAL_METHODS.get(cfg.personalization.method).phases:
        raise ValueError(
            f"{who}: personalization.method = {cfg.personalization.method!r} trains in two phases (head "
            "then body; global then personal adapter), which groups do not (use run.engine = 'inprocess')"
        )
    if cfg.training.gradient_checkpointing and cfg.peft.dropout > 0:
        raise ValueError(
            f"{who} with training.gradient_checkpointing needs peft.dropout = 0 (the recomputed "
            "forward would draw other LoRA dropout masks)"
        )


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


# Names other tools give fedfm's fields (Hugging Face TrainingArguments and PEFT, Flower, common
# habit), so a field is suggested by meaning where its spelling is far: learning_rate → lr.
SYNONYMS = {
    "learning_rate": "lr",
    "num_rounds": "rounds",
    "num_server_rounds": "rounds",
    "rounds": "rounds",
    "epochs": "local_epochs",
    "num_epochs": "local_epochs",
    "num_train_epochs": "local_epochs",
    "max_steps": "local_steps",
    "steps": "local_steps",
    "per_device_train_batch_size": "batch_size",
    "train_batch_size": "batch_size",
    "batch": "batch_size",
    "gradient_accumulation_steps": "grad_accumulation",
    "max_seq_length": "max_length",
    "max_seq_len": "max_length",
    "seq_len": "max_length",
    "model_name": "name",
    "model_name_or_path": "name",
    "model": "name",
    "lora_r": "r",
    "rank": "r",
    "lora_rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "clients": "num_clients",
    "n_clients": "num_clients",
    "num_clients_per_round": "clients_per_round",
    "fraction_fit": "fraction",
    "min_fit_clients": "min_clients",
    "min_available_clients": "min_clients",
    "epsilon": "target_epsilon",
    "noise_multiplier": "noise_multiplier",
    "clip": "clip_norm",
    "max_norm": "max_grad_norm",
    "clip_grad_norm": "max_grad_norm",
    "gradient_clipping": "max_grad_norm",
    "random_seed": "seed",
    "output_dir": "output_root",
}


def _sections() -> dict[str, list[str]]:
    return {
        name: list(f.annotation.model_fields)
        for name, f in RunConfig.model_fields.items()
        if hasattr(f.annotation, "model_fields")
    }


def _did_you_mean(loc: tuple) -> str:
    """`` — did you mean 'rounds'?`` for a misspelt section or field: a known synonym
    (``learning_rate`` → ``lr``), then the same name in another section (``training.rounds`` →
    ``run.rounds``), then difflib's closest name in the section, then a synonym elsewhere."""
    import difflib

    sections = _sections()
    name = str(loc[-1])
    if len(loc) != 2 or loc[0] not in sections:
        close = difflib.get_close_matches(name, list(RunConfig.model_fields), n=1, cutoff=0.6)
        return f" — did you mean {close[0]}?" if close else ""
    section, names = loc[0], sections[loc[0]]
    meant = SYNONYMS.get(name.lower())
    if meant in names:
        return f" — did you mean {section}.{meant}?"
    elsewhere = [(other, c) for c in (name, meant) for other, fields in sections.items() if c in fields]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    if elsewhere and elsewhere[0][1] == name or elsewhere and not close:
        other, candidate = elsewhere[0]
        return f" — did you mean {other}.{candidate}? (it is in [{other}], not [{section}])"
    return f" — did you mean {section}.{close[0]}?" if close else ""


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            guess = _did_you_mean(e["loc"])
            msg = f"unknown field{guess} (see docs/configuration.md for every field)"
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


def _register_components() -> None:
    from fedfm.registry import load_components

    load_components()  # every built-in component registered, its options in the config sections


_register_components()
