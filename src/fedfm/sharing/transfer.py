"""Knowledge transfer between the FM and small client models (FedMKT / FedDF style): the mode.

Clients train small models of their own (``transfer.client_models``, heterogeneous); knowledge
moves only through logits on a transfer set that is public or FM-synthetic, never client data.
Each round the FM's logits on the transfer set teach the sampled clients' models, and the
weighted ensemble of their logits teaches the FM back. The loop is ``fedfm.protocols.transfer``; this
module registers the mode and its rules.
"""

from __future__ import annotations

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


SHARING_MODES.register("transfer")(
    SharingMode(lambda cfg: cfg, lambda cfg, labels: None, check_transfer, protocol="transfer")
)
