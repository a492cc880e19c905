"""Run protocols: how an experiment reaches its model, looked up by ``run.protocol``.

``rounds`` is federated training round after round (``fedfm.server.driver``); ``fedpft`` is one-shot FL
from FM features (``fedfm.protocols.fedpft``); ``transfer`` is knowledge transfer between the FM and small
client models (``fedfm.protocols.transfer``), which ``sharing.mode = "transfer"`` selects. A protocol is
``run(cfg, run_dir, progress=, callbacks=, resume=) → RunResult`` and an optional ``check(cfg)``
that raises ``ValueError`` naming a field the protocol cannot run with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from fedfm.config.sections import Section
from fedfm.registry import Registry, registry_for


@dataclass(frozen=True)
class Protocol:
    """``rounds``: it runs the round loop (``fedfm.server.driver``), so what acts on rounds
    (personalization, computation sharing, the update pipeline) applies to it."""

    run: Callable
    check: Callable | None = None
    rounds: bool = False


PROTOCOLS: Registry[Protocol] = Registry("protocol")


def _rounds(cfg, run_dir, **options):
    from fedfm.server.driver import Run

    return Run(cfg, run_dir, **options).execute()


def _fedpft(cfg, run_dir, **options):
    from fedfm.protocols.fedpft import run_fedpft

    return run_fedpft(cfg, run_dir, **options)


def check_fedpft(cfg) -> None:
    from fedfm.engines.base import engine_traits
    from fedfm.privacy.guarantees import dp_mode

    who = "run.protocol = 'fedpft'"
    if not registry_for("task").get(cfg.task.kind).features:
        raise ValueError(
            f"{who} fits features of a classifier's backbone; task.kind = {cfg.task.kind!r} has none"
        )
    if cfg.peft.method != "head":
        raise ValueError(f"{who} trains the head on sampled features: set peft.method = 'head'")
    if not engine_traits(cfg).in_process:
        raise ValueError(
            f"{who} runs in-process (one message per client, no rounds): run.engine = 'inprocess'"
        )
    if dp_mode(cfg).active or cfg.secagg.enabled:
        raise ValueError(
            f"{who}: the mixtures' means and counts describe each client's data and are not "
            "differentially private or securely aggregated; turn privacy.dp and secagg.enabled off"
        )
    if registry_for("attack").get(cfg.attack.kind).acts:
        raise ValueError(f"{who} has no attack simulation: attack.kind = 'none'")


def _transfer(cfg, run_dir, **options):
    from fedfm.protocols.transfer import run_transfer

    return run_transfer(cfg, run_dir, **options)


def check_transfer_protocol(cfg) -> None:
    if registry_for("sharing mode").get(cfg.sharing.mode).protocol != "transfer":
        raise ValueError("run.protocol = 'transfer' is set by sharing.mode = 'transfer'; set that instead")


PROTOCOLS.register("rounds")(Protocol(_rounds, rounds=True))
PROTOCOLS.register("transfer")(Protocol(_transfer, check_transfer_protocol))


class FedPftSection(Section):
    """run.protocol = "fedpft": per-class Gaussian mixtures of frozen FM features (Beitollahi et al.)."""

    components: int = Field(4, ge=1, description="Mixture components per class per client.")
    covariance: Literal["diag", "full", "spherical"] = Field(
        "diag", description="Covariance of each component (full sends d² values per component)."
    )
    reg_covar: float = Field(1e-4, gt=0, description="Added to every variance (EM's regulariser).")
    samples_per_example: float = Field(
        1.0, gt=0, description="Server draws this many features per client example of each class."
    )
    head_epochs: int = Field(30, ge=1, description="Passes of the server's head training over the samples.")
    head_lr: float = Field(1e-2, gt=0, description="AdamW learning rate of the server's head training.")
    head_weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay of the head training.")
    head_batch_size: int = Field(256, ge=1, description="Mini-batch of the server's head training.")


PROTOCOLS.register("fedpft", options=FedPftSection, section="fedpft")(Protocol(_fedpft, check_fedpft))
