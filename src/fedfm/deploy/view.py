"""What a deployed client is told of the run's config: an allow-list, never the whole file.

A joining client receives the fields its training needs (the model, the adapter, local training,
the client halves of the transforms, the data format for cutting a demo dataset) and nothing
else: not the server's paths (``data.path``, ``synthetic.path``, ``offsite.distill_path``, trace
files), not its trackers (``run.tracking_uri`` may hold a password), not its aggregation,
sampling, validation or privacy-accounting settings, never ``privacy.noise_seed``. Every field
is server-only unless it is listed in ``CLIENT_FIELDS``: a field added to the config later stays
on the server until someone decides a client needs it (``tests/test_trust_units.py`` fills every
field and checks the view against this list). A client rebuilds its config from the view; what
the view leaves out takes its default there. A plug-in's own options travel when it is of a kind
a client runs (``CLIENT_KINDS``: an objective's, a compression method's, ...); the client must
load the same plug-in (``fedfm --plugin``); an option marked ``json_schema_extra={"server_only":
True}`` stays on the server.
"""

from __future__ import annotations

from typing import Any

import tomli_w

CLIENT_FIELDS = frozenset(
    {
        # the run: seeds for a demo's partition, the ETA line, where to train (an asynchronous
        # server marks its tasks instead of sending run.mode, whose checks need server-only fields)
        "run.seed", "run.rounds", "run.threads", "run.device",
        # the task and the model every client builds
        "task.kind", "task.packing", "task.system_prompt", "task.preference_loss", "task.beta",
        "task.sft_weight", "task.reference_adapter",
        "model.name", "model.init", "model.max_length", "model.quantization", "model.image_size",
        "model.batch_norm", "model.batch_norm_momentum", "model.layers", "model.dtype",
        "peft.method", "peft.r", "peft.alpha", "peft.dropout", "peft.dora", "peft.target_modules",
        "peft.num_virtual_tokens", "peft.layers", "peft.rank_tiers", "peft.rank_assignment",
        # the data's format, and how a demo dataset is cut (``--data config``); never a path
        "data.name", "data.encoding", "data.text_column", "data.label_column", "data.test_fraction",
        "data.client_test_fraction", "data.deduplicate", "data.max_examples", "data.max_test_examples",
        "data.image_column", "data.image_size", "data.augment", "data.hf_config", "data.hf_train_split",
        "data.hf_test_split",
        "partition.method", "partition.num_clients", "partition.alpha", "partition.min_size",
        "partition.classes_per_client", "partition.column", "partition.sigma",
        # local training and the objective
        "training.local_epochs", "training.local_steps", "training.batch_size", "training.optimizer",
        "training.lr", "training.weight_decay", "training.count_costs", "training.momentum",
        "training.max_grad_norm", "training.grad_accumulation", "training.precision",
        "training.gradient_checkpointing", "training.lr_schedule", "training.lr_warmup_rounds",
        "training.lr_min", "training.lr_rounds",
        "strategy.objective", "strategy.mu", "strategy.weighting", "strategy.lora_aggregation",
        "eval.batch_size",  # batches of the preference task's reference log-probabilities
        # the client halves of the update transforms
        "pipeline.extra",
        "compression.method", "compression.block_size", "compression.ratio", "compression.error_feedback",
        "validation.max_update_norm",  # under secure aggregation clients clip to it themselves
        "privacy.dp", "privacy.noise", "privacy.clip_norm", "privacy.adaptive_clipping",
        "privacy.noise_multiplier", "privacy.target_epsilon", "privacy.delta",
        "secagg.enabled", "secagg.signatures",
        # computation sharing and personalization: what the client holds and keeps
        "sharing.mode",
        "offsite.adapter_layers", "offsite.emulator_layers", "offsite.distill_steps",
        "split.cut_layer", "split.u_shaped", "split.activation_bits", "split.activation_noise",
        "split.max_cut_grad_norm",
        "personalization.method", "personalization.head_steps", "personalization.ditto_lambda",
        "personalization.personal_steps", "personalization.clusters", "personalization.cluster_examples",
    }
)  # fmt: skip


# the kinds of component a client runs: a plug-in's options of these kinds travel to clients
CLIENT_KINDS = frozenset(
    {
        "objective",
        "compression method",
        "transform",
        "personalization method",
        "task",
        "partitioner",
        "model",
        "dataset",
    }
)


def client_fields(cfg) -> frozenset[str]:
    """``CLIENT_FIELDS`` plus the options of registered plug-ins of the kinds a client runs."""
    extra = set()
    for section, field in type(cfg).model_fields.items():
        model = field.annotation
        for name, info in getattr(model, "model_fields", {}).items():
            marks = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            if marks.get("component_kind") in CLIENT_KINDS and not marks.get("server_only"):
                extra.add(f"{section}.{name}")
    return CLIENT_FIELDS | extra


def client_view(cfg) -> dict[str, dict[str, Any]]:
    """The allow-listed fields of ``cfg`` as nested sections, as TOML holds them (``plain``: an
    unset field whose default is set travels as ``"null"``), after the sharing mode's view of
    the model clients hold (an offsite run's emulator)."""
    from fedfm.config import plain
    from fedfm.sharing import SHARING_MODES

    held = plain(SHARING_MODES.get(cfg.sharing.mode).client_view(cfg))
    view: dict[str, dict[str, Any]] = {}
    for dotted in sorted(client_fields(cfg)):
        section, name = dotted.split(".")
        if name in held[section]:
            view.setdefault(section, {})[name] = held[section][name]
    return view


def client_config_toml(cfg) -> str:
    """The TOML a joining client receives (``JoinReply.config_toml``)."""
    return tomli_w.dumps(client_view(cfg))
