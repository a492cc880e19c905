"""What the virtual clock and FedBuff run with, and the reasons for what they refuse (each
``ValueError`` names the field)."""

from __future__ import annotations

from fedfm.config.sections import SystemsSection

SHAPING = "availability, over-selection and deadlines"


def check_systems(cfg) -> None:
    sys, defaults = cfg.systems, SystemsSection()
    if not sys.enabled:
        changed = [
            f
            for f in SystemsSection.model_fields
            if f != "enabled" and getattr(sys, f) != getattr(defaults, f)
        ]
        if changed:
            raise ValueError(f"systems.{changed[0]} is set but systems.enabled = false (set it to true)")
    if (sys.availability == "trace") != (sys.behavior_trace is not None):
        raise ValueError(
            "systems.availability = 'trace' and systems.behavior_trace go together: set both or neither"
        )
    for name in ("device_trace", "behavior_trace"):
        path = getattr(sys, name)
        if path is not None and not path.endswith((".json", ".pkl", ".pickle")):
            raise ValueError(f"systems.{name} = {path!r}: a FedScale trace is a .json or .pkl file")
    shaped = sys.enabled and (sys.availability != "always" or sys.over_selection > 1 or sys.deadline_s)
    from fedfm.privacy.guarantees import dp_mode

    dp = dp_mode(cfg).active
    if shaped and dp:
        raise ValueError(
            f"privacy.dp = {cfg.privacy.dp!r} with systems {SHAPING}: the accountant's amplification by "
            "sampling assumes every client is in a round with probability q = m/N; who is online, who "
            "is over-selected and who beats the deadline change that probability in ways it cannot "
            "bound. Use systems.availability = 'always', over_selection = 1 and no deadline_s with DP"
        )
    if shaped and cfg.secagg.enabled:
        raise ValueError(
            f"secagg.enabled with systems {SHAPING}: the cohort's masks are agreed before training, so "
            "clients dropped at the deadline or by over-selection would have to be unmasked as dropouts "
            "(not built); use availability = 'always', over_selection = 1 and no deadline_s"
        )
    if (
        shaped
        and cfg.sampling.method == "poisson"
        and (sys.availability != "always" or sys.over_selection > 1)
    ):
        raise ValueError(
            "sampling.method = 'poisson' with systems.availability or over_selection: those draw the "
            "cohort from the online clients (fixed size); use sampling.method = 'fixed'"
        )
    if cfg.run.mode == "async":
        check_fedbuff(cfg, dp)


def check_fedbuff(cfg, dp: bool) -> None:
    from fedfm.algorithms.objectives import make_objective
    from fedfm.algorithms.personal import personalizes
    from fedfm.registry import registry_for

    why = {
        "privacy.dp": dp
        and "FedBuff's updates arrive when clients finish, not from a sampled cohort: the subsampling "
        "amplification the accountant assumes does not hold (DP-FedBuff's accounting is not built)",
        "secagg.enabled": cfg.secagg.enabled
        and _concurrency(cfg) < cfg.fedbuff.buffer_size
        and "a secure buffer is a wave of K clients online together, running one masking protocol; "
        "fedbuff.concurrency must leave room for one (concurrency ≥ buffer_size)",
        "personalization.method": personalizes(cfg.personalization)
        and "personal state and cluster choices are per round (use run.mode = 'sync')",
        "sharing.mode": registry_for("sharing mode").get(cfg.sharing.mode).changes_model
        and "offsite, split and transfer sharing run in rounds (use run.mode = 'sync')",
        "strategy.objective": make_objective(cfg.strategy).uses_control_variates
        and "control variates (SCAFFOLD) assume every client corrects towards the same c (stale ones do not)",
        "attack.kind": registry_for("attack").get(cfg.attack.kind).acts
        and "simulated attackers are drawn per round cohort; FedBuff has no cohort",
        "run.protocol": not registry_for("protocol").get(cfg.run.protocol).rounds
        and "the one-shot protocols have no rounds to buffer",
        "training.lr_schedule": cfg.training.scheduled
        and "a schedule across rounds follows the round, and asynchronous tasks are numbered by dispatch "
        "(not built; use a constant training.lr)",
    }
    from fedfm.algorithms.lora import LORA_AGGREGATION

    if LORA_AGGREGATION.get(cfg.strategy.lora_aggregation).merges_into_base:
        why["strategy.lora_aggregation"] = "stacked factors are folded into the base per round"
    for name, reason in why.items():
        if reason:
            value = _value(cfg, name)
            raise ValueError(f"{name} = {value!r} with run.mode = 'async': {reason}")
    fb, n = cfg.fedbuff, cfg.partition.num_clients
    inferred = cfg.clients_inferred()  # the count is checked again once the data names it
    if not inferred and fb.buffer_size > n * fb.max_per_client:
        raise ValueError(
            f"fedbuff.buffer_size ({fb.buffer_size}) exceeds what {n} clients with fedbuff.max_per_client = "
            f"{fb.max_per_client} can fill"
        )
    if not inferred and fb.concurrency is not None and fb.concurrency > n:
        raise ValueError(f"fedbuff.concurrency ({fb.concurrency}) exceeds partition.num_clients ({n})")
    from fedfm.algorithms.robust import min_cohort

    if fb.buffer_size < min_cohort(cfg.strategy):
        raise ValueError(
            f"strategy.aggregator = {cfg.strategy.aggregator!r} needs at least {min_cohort(cfg.strategy)} "
            f"updates per step; fedbuff.buffer_size is {fb.buffer_size}"
        )
    if cfg.sampling.min_clients > fb.buffer_size:
        raise ValueError(
            f"sampling.min_clients ({cfg.sampling.min_clients}) exceeds fedbuff.buffer_size "
            f"({fb.buffer_size})"
        )
    if cfg.systems.over_selection > 1 or cfg.systems.deadline_s:
        raise ValueError(
            "systems.over_selection and deadline_s shape synchronous rounds; run.mode = 'async' has none"
        )


def _concurrency(cfg) -> int:
    from fedfm.algorithms.sampling import cohort_size

    n, s = cfg.partition.num_clients, cfg.sampling
    return cfg.fedbuff.concurrency or cohort_size(n, s.clients_per_round, s.fraction)


def _value(cfg, dotted: str):
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)
