"""Knowledge transfer between the FM and small client models (FedMKT / FedDF style): the mode.

Clients train small models of their own (``transfer.client_models``, heterogeneous); knowledge
moves only through logits on a transfer set that is public or FM-synthetic, never client data.
Each round the FM's logits on the transfer set teach the sampled clients' models, and the
weighted ensemble of their logits teaches the FM back. The loop is ``fedfm.protocols.transfer``; this
module registers the mode and its rules.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedfm.config.sections import Section
from fedfm.sharing.base import SHARING_MODES, SharingMode


def check_transfer(cfg) -> None:
    from fedfm.data.synthetic import synthetic_mode
    from fedfm.engines.base import engine_traits
    from fedfm.privacy.guarantees import dp_mode
    from fedfm.registry import registry_for
    from fedfm.transforms.compression import compresses

    who = "sharing.mode = 'transfer'"
    kind = registry_for("task").get(cfg.task.kind)
    if not (kind.has_head and kind.layer_stack):
        raise ValueError(
            f"{who} distils class logits of a text classifier; task.kind = {cfg.task.kind!r} is not one"
        )
    if not (cfg.transfer.path or cfg.synthetic.path):
        raise ValueError(
            f"{who} needs a transfer set: transfer.path (public texts, or `fedfm synth` output), or "
            "synthetic.path"
        )
    if cfg.peft.method not in ("lora", "head", "full"):
        raise ValueError(f"{who} trains LoRA, the head or every weight; peft.method = {cfg.peft.method!r}")
    if not engine_traits(cfg).in_process or not registry_for("protocol").get(cfg.run.protocol).rounds:
        raise ValueError(
            f"{who} runs its own in-process loop: leave run.engine and run.protocol at their defaults"
        )
    if dp_mode(cfg).active or cfg.secagg.enabled:
        raise ValueError(
            f"{who}: the clients' logits on the transfer set are neither clipped and noised nor masked; "
            "turn privacy.dp and secagg.enabled off"
        )
    if cfg.training.scheduled:
        raise ValueError(f"{who} trains at training.lr every round; training.lr_schedule is not built there")
    if registry_for("attack").get(cfg.attack.kind).acts or compresses(cfg):
        raise ValueError(
            f"{who} sends logits, not updates: attack.kind and compression.method must be 'none'"
        )
    if cfg.task.baselines or synthetic_mode(cfg).augment or synthetic_mode(cfg).replaces:
        raise ValueError(
            f"{who}: task.baselines and synthetic.mode other than 'warmup' (the FM's warm-up on the "
            "labelled synthetic data before round 1) do not apply: the clients' data is their own"
        )
    if cfg.peft.rank_tiers:
        raise ValueError(f"{who}: peft.rank_tiers does not apply (client models differ anyway)")


class TransferModelSection(Section):
    """One client architecture of knowledge transfer (client k gets entry k mod the list's length)."""

    name: str = Field("minilm", description="Registered name, local folder, or Hugging Face id.")
    layers: list[int] | None = Field(
        None, description="Keep only these layers of its stack (as model.layers)."
    )
    init: Literal["pretrained", "random"] = Field("pretrained", description="Pretrained or fresh weights.")


class TransferSection(Section):
    """sharing.mode = "transfer": knowledge transfer between the FM and small client models through
    logits on a public or FM-synthetic transfer set (docs/computation-sharing.md)."""

    client_models: list[TransferModelSection] = Field(
        default_factory=lambda: [TransferModelSection(layers=[0, 1])],
        description="The clients' small models (default: MiniLM's first two layers), with peft.* applied.",
    )
    path: str | None = Field(
        None,
        description="Transfer set: JSONL or CSV with a 'text' column (public or `fedfm synth`); "
        "default: synthetic.path. Never client data.",
    )
    max_examples: int | None = Field(500, ge=1, description="Use at most this many transfer texts.")
    temperature: float = Field(2.0, gt=0, description="Softmax temperature of both distillations.")
    client_weight: float = Field(
        1.0, ge=0, description="Weight of the FM's teaching (KL to its logits) in a client's local loss."
    )
    server_steps: int = Field(
        30, ge=0, description="Server steps distilling the clients' ensemble into the FM."
    )
    server_lr: float | None = Field(
        None, gt=0, description="The FM's distillation learning rate; default training.lr."
    )


SHARING_MODES.register("transfer", options=TransferSection, section="transfer")(
    SharingMode(lambda cfg: cfg, lambda cfg, labels: None, check_transfer, protocol="transfer")
)
