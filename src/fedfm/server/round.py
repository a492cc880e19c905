"""One federated round as a function: (server state, cohort results) → (new server state, record).

    ctx      = round_context(rnd, pipeline)                  # transforms' prepare: DP, secure, attack
    results  = engine.run_cohort(θ, cohort, ctx)              # (the driver calls the engine)
    state, record = apply_round(state, results, rnd, strategy)

``apply_round`` reads top to bottom: the server halves of the update transforms turn the results
into a stream and a reduce, the reduce gives the aggregate (or the round is skipped, with the
reason), the objective's server half corrects the aggregate (FedDyn), the server optimizer
steps, the objective updates its server state, and the record
says what happened. It mutates no state it is handed: the new server state is a new value.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from fedfm.algorithms.aggregators import EmptyCohortError
from fedfm.algorithms.objectives import Objective
from fedfm.algorithms.server_optimizers import ServerOptimizer
from fedfm.attacks import AttackPlan
from fedfm.client.costs import round_costs
from fedfm.engines.base import Engine
from fedfm.server.checkpoint import ServerState
from fedfm.server.tally import RoundTally
from fedfm.transforms.base import Pipeline
from fedfm.transforms.compression import serialized_nbytes
from fedfm.transforms.masking import RoundSkipped
from fedfm.types import Aggregate, Params, RoundContext, Summed, is_statistic

if TYPE_CHECKING:  # the privacy extra (cryptography, dp-accounting) is optional
    from fedfm.privacy.secure_round import SecureRound
    from fedfm.privacy.server import RunPrivacy


@dataclass
class ServerRound:
    """One round as the transforms' halves see it: who is in it, θ as each client holds it, the
    privacy side, and the tally they record into. ``prepare`` halves fill ``secure`` and ``attack``."""

    t: int
    cohort: list[int]
    seed: int
    params: Params
    server_control: Params | None
    reference: Callable[[int], Params]  # θ as this client holds it (its LoRA rank)
    max_examples: int
    privacy: RunPrivacy | None = None  # DP runs
    privacy_state: dict = field(default_factory=dict)
    engine: Engine | None = None
    on_client: Callable[[], None] = lambda: None
    tally: RoundTally = field(default_factory=RoundTally)
    secure: SecureRound | None = None  # by the secure transform (deployed: RemoteSecureRound)
    attack: AttackPlan | None = None
    personal: Callable[[str], bool] | None = None  # personalization: tensors that never travel
    sends: Callable | None = None  # personalization: (θ as held, the client's metrics) → what it sends
    staleness: Callable[[int], float] | None = None  # FedBuff: s(τ), τ from the metrics' "staleness"
    tau: int | None = None  # FedBuff's secure waves: the staleness of the whole (summed) wave

    def sent(self, client_id: int, metrics=None) -> Params:
        """The part of θ this client sends an update of (a decoder's template): all of it, the
        shared part, or under IFCA the cluster it names."""
        held = self.reference(client_id)
        return held if self.sends is None else self.sends(held, metrics or {})

    def shared(self) -> Params:
        """θ's part that travels: all of it, or without the personal tensors."""
        if self.personal is None:
            return self.params
        return {k: v for k, v in self.params.items() if not self.personal(k)}

    def vet_and_charge(self, client_id: int, metrics, num_examples: int | None = None) -> str | None:
        """DP-SGD: why the mechanism a client states it ran is not the configured one, or None;
        a matching statement is charged to that client (a release happened). No DP-SGD: None."""
        if self.privacy is None or self.privacy.example is None:
            return None
        return self.privacy.vet_and_charge(self.privacy_state, self.t, client_id, metrics, num_examples)


@dataclass(frozen=True)
class Strategy:
    """Everything that decides how a round turns results into the next state."""

    pipeline: Pipeline
    rule: Callable  # (updates (delta, weight), θ) → aggregate delta
    uniform: bool  # strategy.weighting = "uniform"
    server_optimizer: ServerOptimizer
    objective: Objective
    min_clients: int
    num_clients: int
    traffic: Callable  # (state, rnd, stacked bytes) → (bytes record, new comm totals)
    fold: Callable | None = None  # stack mode: (aggregate, state, t, senders) → (delta, merged, bytes)
    remote: bool = False  # clients in other processes: a failing round is skipped, never raised


def round_context(rnd: ServerRound, pipeline) -> RoundContext:
    """What every client of the round is told: the transforms' ``prepare`` fields."""
    fields = pipeline.prepare(rnd)
    return RoundContext(round=rnd.t, seed=rnd.seed, server_control=rnd.server_control, **fields)


def apply_round(state: ServerState, results, rnd: ServerRound, s: Strategy) -> tuple[ServerState, dict]:
    tally = rnd.tally
    stream, reduce = s.pipeline.server(tally.delivered(results, rnd.on_client), rnd, mean_reduce(rnd, s))
    aggregate, skipped = reach_aggregate(stream, reduce, s.remote)
    if aggregate is not None and len(tally.accepted) < s.min_clients:
        skipped = (
            f"only {len(tally.accepted)} of {len(rnd.cohort)} clients delivered a valid update "
            f"(sampling.min_clients = {s.min_clients}); round skipped, state unchanged"
        )
    new = replace(state, round=rnd.t, privacy=privacy_after(rnd, aggregate, skipped))
    stacked_bytes = 0
    if skipped is None:
        delta = aggregate.delta
        if s.fold is not None:  # FLoRA: the averaged products go into the base weights
            delta, merged, stacked_bytes = s.fold(delta, state, rnd.t, len(tally.accepted))
            new = replace(new, merged=merged)
        cohort = len(tally.accepted)
        delta, objective_state = s.objective.correct(delta, state.objective_state, cohort, s.num_clients)
        params, opt = s.server_optimizer.step(state.params, delta, state.optimizer_state)
        control = state.server_control
        if tally.control_sum is not None:
            mean_control = {k: v / len(tally.accepted) for k, v in tally.control_sum.items()}
            control = s.objective.server_update(control, mean_control, len(tally.accepted), s.num_clients)
        new = replace(
            new, params=params, optimizer_state=opt, server_control=control, objective_state=objective_state
        )
    traffic, comm = s.traffic(state, rnd, stacked_bytes)
    new = replace(new, comm=comm)
    record = {
        "round": rnd.t,
        "num_clients": len(tally.accepted),
        "cohort": rnd.cohort,
        "train_loss": tally.loss_sum / tally.examples if tally.examples else None,
        "failed": tally.failed,
        "rejected": tally.rejected,
        **traffic,
        **round_costs(tally.client_records),
    }
    if skipped:
        record["skipped"] = skipped
    return new, record


def reach_aggregate(stream, reduce, remote: bool) -> tuple[Aggregate | None, str | None]:
    """Run the reduce over the stream → (aggregate, None), or (None, why the round is skipped).
    The stream is drained either way, so every client is tallied even if the reduce stops early."""
    try:
        try:
            return reduce(stream), None
        except (EmptyCohortError, RoundSkipped) as err:
            return None, str(err)
        finally:
            for _ in stream:
                pass
    except Exception as err:  # a deployment survives whatever one client's messages do
        if not remote:
            raise
        return None, f"the round failed ({type(err).__name__}: {err}); round skipped, state unchanged"


def mean_reduce(rnd: ServerRound, s: Strategy):
    """The reduce without DP: the aggregation rule over validated dense updates, or the weighted
    mean from a secure round's unmasked sums (Σ w·Δ / Σ w). Transforms may replace it."""

    def reduce(items) -> Aggregate:
        first = next(items, None)
        if isinstance(first, Summed):
            sums = first.sums
            scale = rnd.staleness(rnd.tau) if rnd.staleness is not None and rnd.tau is not None else 1.0
            return Aggregate({k: v * scale / sums.scalars["weight"] for k, v in sums.delta.items()})
        results = itertools.chain([first] if first is not None else [], items)
        pairs = (
            (discounted(r.update, rnd), 1.0 if s.uniform else float(r.update.num_examples)) for r in results
        )
        return Aggregate(s.rule(pairs, rnd.params))

    return reduce


def discounted(update, rnd: ServerRound) -> Params:
    """FedBuff: the update scaled by its staleness weight s(τ) (the server's τ); else as it is."""
    if rnd.staleness is None:
        return update.delta
    weight = rnd.staleness(int(update.metrics["staleness"]))
    return {k: v if is_statistic(k) else v * weight for k, v in update.delta.items()}


def privacy_after(rnd: ServerRound, aggregate: Aggregate | None, skipped: str | None) -> dict:
    """The privacy state after the round. A skipped round is charged too (its counts were seen);
    under distributed noise only a recovered sum is a release."""
    if rnd.privacy is None:
        return rnd.privacy_state
    if skipped is None:
        return aggregate.privacy if aggregate.privacy is not None else rnd.privacy_state
    skellam = rnd.secure.layout.skellam if rnd.secure is not None else None
    if skellam is None or rnd.tally.unmasked:
        contributors = rnd.tally.unmasked or len(rnd.tally.accepted)
        rnd.privacy.charge_skipped(rnd.privacy_state, rnd.t, contributors, skellam)
    return rnd.privacy_state


DIRECTIONS = ("up", "down")


def traffic(state: ServerState, rnd: ServerRound, stacked_bytes: int, ranks, num_total: int, sent=None):
    """This round's and the run's bytes, next to what full fine-tuning would move → (record, totals).

    Down, per cohort member: θ at its rank (``sent(θ)``: the part a client holds, split fine-tuning's
    bottom layers), SCAFFOLD's c, and in stack mode the stacked factors; under secure aggregation,
    every protocol message in both directions; with split fine-tuning, the cut's activations and
    gradients of the clients that delivered (also recorded apart as ``cut_bytes_*``)."""
    control = serialized_nbytes(rnd.server_control or {})
    by_rank: dict[int | None, int] = {}
    for c in rnd.cohort:
        if ranks[c] not in by_rank:
            held = rnd.reference(c)
            by_rank[ranks[c]] = serialized_nbytes(sent(held) if sent else held)
    up, down = rnd.tally.bytes_up, sum(by_rank[ranks[c]] + control + stacked_bytes for c in rnd.cohort)
    if rnd.secure is not None:
        up, down = rnd.secure.bytes_up, down + rnd.secure.bytes_down
    cut = {}
    records = rnd.tally.client_records
    if any("cut_bytes_up" in r for r in records):
        cut = {
            f"cut_bytes_{d}": int(sum(r.get(f"cut_bytes_{d}", 0) for r in records)) for d in ("up", "down")
        }
        up, down = up + cut["cut_bytes_up"], down + cut["cut_bytes_down"]
    comm = dict(state.comm)
    comm["bytes_up_total"] = comm.get("bytes_up_total", 0) + up
    comm["bytes_down_total"] = comm.get("bytes_down_total", 0) + down
    full = 2 * len(rnd.cohort) * 4 * num_total
    return {"bytes_up": up, "bytes_down": down, **cut, **comm, "full_finetune_bytes": full}, comm
