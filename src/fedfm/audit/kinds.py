"""The registered attacks of ``fedfm audit``: each one's options, what it needs, and how it runs on
an ``AuditContext`` (``fedfm.audit.runner``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from fedfm.audit import AUDITS, AuditKind
from fedfm.audit.scores import fmt


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InversionOptions(_Options):
    victim: int = Field(0, ge=0, description="The attacked client.")
    batch: int = Field(1, ge=1, description="Rows in the best case's one SGD step.")
    clients: int = Field(5, ge=2, description="Secure aggregation: updates in the sum the server sees.")
    epsilon: float = Field(8.0, gt=0, description="Client-level DP column: ε (z calibrated over the run).")
    tau: float = Field(
        0.05, gt=0, lt=1, description="Span test: relative distance below which an input is in."
    )


class CanaryOptions(_Options):
    canaries: int = Field(400, ge=20, description="Canary clients (each joins with probability ½).")
    epsilon: float | None = Field(
        None, gt=0, description="Audit client-level DP at this ε when the config has none (default: refuse)."
    )
    noise_factor: float = Field(
        1.0, gt=0, description="Test only: scale the noise the mechanism adds (0.1: a broken mechanism)."
    )


class MembershipOptions(_Options):
    limit: int = Field(500, ge=10, description="At most this many members and non-members.")
    reference_steps: int = Field(100, ge=1, description="Local steps of the reference model's training.")


def run_inversion(ctx, options: InversionOptions) -> dict:
    from fedfm.audit.inversion import InversionAudit, default_settings

    if options.victim >= ctx.data.num_clients:
        raise ValueError(f"inversion.victim = {options.victim}: the run has {ctx.data.num_clients} clients")
    audit = InversionAudit(
        ctx.cfg,
        ctx.bundle,
        ctx.task,
        ctx.data,
        ctx.attacked_state,
        options.victim,
        options.batch,
        options.tau,
    )
    clients = min(options.clients, ctx.data.num_clients)  # a sum of distinct clients' updates
    lora = any("lora_B" in key for key in ctx.bundle.trainable)
    rows = audit.run(default_settings(clients, options.epsilon, lora), ctx.seed, progress=ctx.note)
    return {"rows": rows, "victim": options.victim, "attacked_round": 2, "batch": options.batch}


def run_canaries(ctx, options: CanaryOptions) -> dict:
    from fedfm.audit.canaries import canary_audit, central_plan

    own = ctx.cfg.privacy.dp == "client"
    if not own and options.epsilon is None:
        return {"skipped": "no client-level DP in this configuration (privacy.dp); "
                "--set canaries.epsilon=2 audits the same run with it"}  # fmt: skip
    epsilon = None if own else options.epsilon
    plan = central_plan(ctx.cfg, ctx.data.num_clients, ctx.bundle.num_trainable(), epsilon, ctx.note)
    return {"rows": [canary_audit(plan, options.canaries, ctx.seed, noise_factor=options.noise_factor)]}


def run_membership(ctx, options: MembershipOptions) -> dict:
    from fedfm.audit.membership import membership_audit

    result = membership_audit(
        ctx.bundle, ctx.task, ctx.reference_task(), ctx.data, ctx.final, ctx.start, ctx.cfg.training,
        ctx.seed, options.limit, options.reference_steps,
    )  # fmt: skip
    return {"rows": [result]}


class ObservedOptions(_Options):
    pass


def run_observed(ctx, options: ObservedOptions) -> dict:
    from fedfm.audit.observed import observed_attack

    return observed_attack(ctx.run_dir or ctx.trained_dir)


def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def header(*names: str) -> list[str]:
    return [row(*names), row("---", *["---:"] * (len(names) - 1))]


def _inversion_table(result: dict) -> str:
    lines = [
        f"Victim: client {result['victim']}; attacked round {result['attacked_round']}; best case: plain "
        f"SGD, one step on {result['batch']} row(s), no clipping, dropout off.\n",
        *header(
            "setting", "token precision", "token recall", "ROUGE-L", "label-count error", "span rank / width"
        ),
    ]
    for r in result["rows"]:
        full = " (full: no test)" if r.get("span_full") else ""
        scores = [fmt(r.get(k)) for k in ("token_precision", "token_recall", "rouge_l", "label_count_error")]
        lines.append(
            row(r["setting"], *scores, f"{r.get('span_rank', '—')} / {r.get('input_width', '—')}{full}")
        )
    return "\n".join(lines) + "\n"


def _canary_table(result: dict) -> str:
    lines = header(
        "reported ε (δ)", "one-run 95% lower bound", "estimate (Andrew et al.)", "canaries (joined)",
        "right / guesses", "z", "noise factor",
    )  # fmt: skip
    for r in result["rows"]:
        lines.append(
            row(
                f"{fmt(r['reported_epsilon'], 2)} ({r['delta']:g})",
                fmt(r["epsilon_lower_bound"], 2),
                fmt(r["epsilon_estimate"], 2),
                f"{r['canaries']} ({r['joined']})",
                f"{r['right']} / {r['guesses']}",
                fmt(r["noise_multiplier"], 3),
                f"{r['noise_factor']:g}",
            )  # fmt: skip
        )
    return "\n".join(lines) + "\n"


def _membership_table(result: dict) -> str:
    lines = header("attack", "AUC", "TPR at 1% FPR", "members / non-members")
    for r in result["rows"]:
        n = f"{r['members']} / {r['nonmembers']}"
        lines.append(row("loss threshold", fmt(r["loss_auc"]), fmt(r["loss_tpr_at_1pct_fpr"]), n))
        if "calibrated_auc" in r:
            lines.append(
                row("reference-calibrated", fmt(r["calibrated_auc"]), fmt(r["calibrated_tpr_at_1pct_fpr"]), n)
            )
    return "\n".join(lines) + "\n"


def _observed_table(result: dict) -> str:
    lines = header(
        "clients", "with skewed data", "property AUC (−mean training loss)", "data size seen exactly"
    )
    for r in result["rows"]:
        lines.append(
            row(r["clients"], r["skewed"], fmt(r["property_auc"]), "yes" if r["data_size_exact"] else "no")
        )
    return "\n".join(lines) + "\n"


AUDITS.register("inversion")(
    AuditKind(
        run_inversion,
        InversionOptions,
        "a curious server inverts one client's update (labels, tokens)",
        _inversion_table,
    )
)
AUDITS.register("canaries")(
    AuditKind(
        run_canaries,
        CanaryOptions,
        "canary clients: empirical ε (one-run bound, estimate) vs reported",
        _canary_table,
    )
)
AUDITS.register("membership")(
    AuditKind(
        run_membership,
        MembershipOptions,
        "membership inference on the final model",
        _membership_table,
        needs_final=True,
    )
)
AUDITS.register("observed")(
    AuditKind(
        run_observed,
        ObservedOptions,
        "what the server sees per client in the clear (loss, example count): a property attack",
        _observed_table,
        needs_final=True,
    )
)
