"""Secure aggregation as a transform (``secagg.enabled``): the server sees only the sum.

``prepare`` sets up the round's protocol before the cohort trains: the fixed-point layout (with
distributed DP's Skellam parameters) and the key exchange, run by the engine when its clients
live elsewhere (``Engine.start_secure``), else simulated here. Client half: fixed-point encode
(→ Skellam noise under distributed DP) → mask; the masked vector is a ``Masked`` payload, with
only DP-SGD's settings beside it in the clear. Server half: collect the masked inputs, unmask the
survivors' sum and check it against the range honest inputs can produce (``fedfm.privacy.packing``:
every entry, and with ``validation.max_update_norm`` — which clients then clip to themselves — the
sum's norm); the stream that leaves is one ``Summed`` (or the round is skipped, with the reason).
The protocol code lives in ``fedfm.privacy`` (the ``privacy`` extra) and is imported on use.
"""

from __future__ import annotations

from fedfm.transforms.base import Passthrough, transform
from fedfm.types import Masked, Summed


class RoundSkipped(Exception):
    """A server half found the round unusable; the message says why. State stays unchanged."""


class SecureMasking(Passthrough):
    name = "secure"

    def __init__(self, secagg, uniform: bool, max_norm: float | None = None) -> None:
        self.secagg, self.uniform, self.max_norm = secagg, uniform, max_norm

    def prepare(self, rnd) -> dict:
        from fedfm.privacy import packing
        from fedfm.privacy.secure_round import SecureRound
        from fedfm.seeding import derive_seed

        members = max(1, len(rnd.cohort))
        skellam = None
        if rnd.privacy is not None:
            rotation = derive_seed(rnd.seed, rnd.t, "rotation")  # public, like the graph
            skellam = rnd.privacy.skellam_round(rnd.privacy_state, members, rotation)
        layout = packing.Layout.for_params(
            rnd.shared(),  # personal tensors are never sent, so never masked
            rnd.server_control is not None,
            clip_range=self.secagg.clip_range,
            quantization_bits=self.secagg.quantization_bits,
            max_weight=1 if self.uniform else rnd.max_examples,
            max_clients=members,
            skellam=skellam,
            max_norm=self.max_norm if skellam is None else None,  # distributed DP clips to C itself
        )
        graph_seed = derive_seed(rnd.seed, rnd.t, "graph")
        start = getattr(rnd.engine, "start_secure", None) or SecureRound.start  # remote clients
        rnd.secure = start(rnd.cohort, layout, self.secagg, graph_seed, rnd.t)
        return {"secure": rnd.secure}

    def client(self, payload, step):
        from fedfm.privacy import packing
        from fedfm.seeding import NoiseSource, torch_generator

        ctx, client = step.ctx, step.job.client_id
        noise = None
        if ctx.secure.layout.skellam is not None:
            noise = (ctx.noise or NoiseSource()).generator(ctx.round, client, "dp")
        vector = packing.pack(
            ctx.secure.layout,
            payload.delta,
            payload.num_examples,
            payload.metrics["train_loss"],
            torch_generator(ctx.seed, ctx.round, client, "secagg"),
            payload.control_delta,
            step.notes.get("clipped_bit"),
            noise,
        )
        shown = {k: v for k, v in payload.metrics.items() if k.startswith("dp_")}
        return Masked(ctx.secure.mask(client, vector), shown)

    def server(self, stream, rnd, reduce):
        return self._unmasked(stream, rnd), reduce

    def _unmasked(self, stream, rnd):
        from fedfm.privacy.secure_round import secure_aggregate

        before = None
        if rnd.privacy is not None and rnd.privacy.plan is not None and rnd.secure.layout.skellam is not None:
            skellam = rnd.secure.layout.skellam  # the write-ahead charge of a distributed-noise round

            def before(survivors):
                rnd.privacy.before_release(rnd.privacy_state, rnd.t, survivors, skellam)

        sums, skipped = secure_aggregate(stream, rnd.secure, rnd.tally, rnd.vet_and_charge, before)
        if sums is None:
            raise RoundSkipped(skipped)
        yield Summed(sums, len(rnd.tally.accepted))


def _check(cfg) -> None:
    """What secure aggregation composes with: the server sees only the sum."""
    from fedfm.algorithms.aggregators import is_linear
    from fedfm.attacks import ATTACKS
    from fedfm.privacy.guarantees import require_privacy_extra
    from fedfm.transforms.compression import compresses
    from fedfm.transforms.dp import lora_aware

    sa, s = cfg.secagg, cfg.strategy
    if not sa.enabled:
        return
    require_privacy_extra("secagg.enabled")
    why = "the server sees only the sum under secure aggregation"
    if not is_linear(s):
        raise ValueError(f"secagg needs strategy.aggregator = 'mean' ({why}; robust rules need each update)")
    if lora_aware(cfg):
        raise ValueError("secagg needs strategy.lora_aggregation = 'naive' and no peft.rank_tiers")
    if compresses(cfg):
        raise ValueError("secagg quantizes updates itself: set compression.method = 'none'")
    attack = ATTACKS.get(cfg.attack.kind)
    if attack.corrupt is not None or attack.craft is not None:
        raise ValueError(
            f"attack.kind = {cfg.attack.kind!r} corrupts single updates, which {why}; "
            "data attacks (label_flip, backdoor) still apply"
        )
    if sa.neighbors is not None and sa.neighbors % 2:
        raise ValueError("secagg.neighbors must be even (each client links k/2 ring neighbours each side)")


@transform("secure", 50, check=_check)
def secure_masking(cfg) -> SecureMasking | None:
    if not cfg.secagg.enabled:
        return None
    return SecureMasking(cfg.secagg, cfg.strategy.weighting == "uniform", cfg.validation.max_update_norm)
