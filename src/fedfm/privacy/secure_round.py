"""One round of secure aggregation in simulation: real keys, real masking, one message per step.

The server half (``SecureRound``) routes messages between the cohort's ``SecAggClient`` objects,
which in simulation live in this process and in a deployment live in the client processes; the
messages are the dataclasses of ``fedfm.privacy.secagg`` (bytes and integers), so a transport
can carry them unchanged. Bytes of every message are counted, per direction.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from fedfm.privacy import packing
from fedfm.privacy.secagg import (
    MaskedInput,
    SecAggClient,
    SecAggError,
    SecAggParams,
)
from fedfm.privacy.secagg_server import SecAggServer
from fedfm.privacy.signing import KeySigner, KeyVerifier
from fedfm.types import Masked, Params


@dataclass
class SecureRound:
    """The server's view of a round's protocol plus the simulated clients' protocol state."""

    layout: packing.Layout
    server: SecAggServer
    clients: dict[int, SecAggClient]
    bytes_up: int = 0
    bytes_down: int = 0
    rejected: list[dict] = field(default_factory=list)
    server_s: float = 0.0
    # simulation only, for the wrap diagnostic of distributed DP: the exact (unreduced) integer sum
    exact: torch.Tensor | None = None
    masked: set = field(default_factory=set)
    wrapped: int | None = None
    out_of_range: int = 0
    sum_bound: float | None = None

    @classmethod
    def start(
        cls, cohort: list[int], layout: packing.Layout, cfg, graph_seed: int, rnd: int = 0
    ) -> SecureRound:
        """Stages 0–1: keys advertised and broadcast; shares encrypted, routed and decrypted.

        With ``secagg.signatures`` every simulated client gets an Ed25519 identity that all the
        others know, as provisioning would give them."""
        params = SecAggParams(
            layout.bits, layout.length, cfg.threshold, cfg.neighbors, graph_seed, cfg.signatures, rnd
        )
        signers = {c: KeySigner() for c in cohort} if cfg.signatures else {}
        verifier = KeyVerifier({s.identity: f"client-{c}" for c, s in signers.items()})
        server = SecAggServer(params, verifier=verifier, names={c: f"client-{c}" for c in cohort})
        clients = {c: SecAggClient(c, params, signers.get(c), verifier) for c in cohort}
        adverts = [c.advertise() for c in clients.values()]
        roster = server.collect_keys(adverts)
        up = sum(a.nbytes() for a in adverts)
        down = len(cohort) * sum(a.nbytes() for a in adverts)
        outgoing = {u: c.share_keys(roster) for u, c in clients.items()}
        inbox = server.route_shares(outgoing)
        for u in inbox:
            server.accused(u, clients[u].receive_shares(inbox[u]))
        up += sum(s.nbytes() for shares in outgoing.values() for s in shares)
        down += sum(s.nbytes() for shares in inbox.values() for s in shares)
        return cls(layout, server, clients, up, down)

    def accept(self, client_id: int, payload: Params) -> bool:
        """Stage 2 at the server: take a masked input, or count the client as dropped (with why)."""
        masked = MaskedInput(client_id, payload.get("masked") if isinstance(payload, Mapping) else None)
        problem = self.server.input_problem(masked)
        if problem is not None:
            self.rejected.append({"client": client_id, "reason": problem})
            return False
        self.server.collect_input(masked)
        self.bytes_up += masked.nbytes(self.layout.bits)
        return True

    def mask(self, client_id: int, vector: torch.Tensor) -> Params:
        """The client half's last step (run by that client): the masked vector is all it sends."""
        if client_id not in self.clients:
            raise SecAggError(f"client {client_id} is not in this round's secure aggregation")
        if self.layout.skellam is not None:  # a simulation can count wraps exactly; a deployment cannot
            self.exact = vector.clone() if self.exact is None else self.exact + vector
            self.masked.add(client_id)
        return {"masked": self.clients[client_id].mask(vector).vector}

    def finish(self) -> packing.Sums:
        """Stage 3: ask the survivors for shares and recover the sum (or raise SecAggError)."""
        start = time.perf_counter()
        signatures = {}
        if self.server.params.signatures:  # the consistency check: every survivor signs the list
            survivors = sorted(self.server.survivors)
            signatures = {u: self.clients[u].sign_survivors(survivors) for u in survivors}
        request = self.server.unmask_request(signatures)
        responses = [self.clients[u].unmask(request) for u in request.survivors]
        self.bytes_down += len(request.survivors) * request.nbytes()
        self.bytes_up += sum(r.nbytes() for r in responses)
        total = self.server.finish(responses, request)
        self.server_s += time.perf_counter() - start
        if self.exact is not None and set(request.survivors) == self.masked:
            half = 1 << (self.layout.bits - 1)  # centring reads the sum right iff it lies in [−M/2, M/2)
            self.wrapped = int(((self.exact < -half) | (self.exact >= half)).sum())
        return packing.unpack(self.layout, total)

    def report(self) -> dict:
        return secure_report(self)


def secure_report(secure) -> dict:
    """The round record's ``secagg`` part: bytes, server time, field, the range honest sums lie
    in (``sum_bound``: the largest |entry| of Σ w·Δ, or its L2 norm under distributed noise) and
    how many summed entries lay outside it (``out_of_range``: such a round is skipped), and how
    often sums wrapped (``wrapped``: exact count, distributed noise in simulation only)."""
    out = {
        "bytes_up": secure.bytes_up,
        "bytes_down": secure.bytes_down,
        "server_s": secure.server_s,
        "field_bits": secure.layout.bits,
        "out_of_range": secure.out_of_range,
    }
    if secure.sum_bound is not None:
        out["sum_bound"] = secure.sum_bound
    if secure.layout.skellam is not None:
        out["wrapped"] = getattr(secure, "wrapped", None)
        out["expected_wraps"] = secure.layout.skellam.expected_wraps()
    return out


def _new(offenders: list[dict], seen: list[dict]) -> list[dict]:
    return [o for o in offenders if o not in seen]


def sums_problem(sums: packing.Sums, contributors: int, layout: packing.Layout) -> str | None:
    """Why unmasked sums cannot come from ``contributors`` well-formed inputs, or None. The server
    cannot check one masked input, but it can check what they add up to."""
    s = sums.scalars
    if s["count"] != contributors:
        return f"the unmasked count is {s['count']:g} but {contributors} clients contributed"
    if sums.out_of_range:
        what = "L2 norm" if layout.skellam is not None else "entries"
        return (
            f"the unmasked sum's {what} lie outside the range honest inputs can produce "
            f"({sums.out_of_range} out of range; bound {sums.bound:.4g}): a client sent values beyond its "
            "clip range, or the sum wrapped around"
        )
    if layout.skellam is None:
        if not contributors <= s["weight"] <= contributors * layout.max_weight:
            return f"the unmasked weight {s['weight']:g} is impossible for {contributors} clients"
        if abs(s["unclipped"]) > contributors / 2 + 1e-6:
            return (
                f"the unmasked clipped-bit count {s['unclipped']:g} is impossible for {contributors} clients"
            )
    return None


def secure_aggregate(
    results, secure, tally, vet_and_charge=None, before_unmask=None
) -> tuple[packing.Sums | None, str | None]:
    """Server side of a secure round: masked inputs in, the unmasked sums out (or why not).

    ``vet_and_charge(client, metrics)`` vets what a client states in the clear (DP-SGD's settings);
    ``before_unmask(survivors)`` runs just before the sum is recovered (a write-ahead DP charge).
    """
    for result in results:
        payload = result.update
        if not isinstance(payload, Masked):
            tally.reject(result.client_id, f"expected a masked input, got a {type(payload).__name__} payload")
            continue
        metrics = dict(payload.metrics)
        problem = vet_and_charge(result.client_id, metrics) if vet_and_charge is not None else None
        if problem is not None:
            tally.reject(result.client_id, problem)
            continue
        if secure.accept(result.client_id, payload.vector):
            tally.accepted.append(result.client_id)
            if metrics:  # only what a client states in the clear (DP-SGD's settings)
                tally.client_records.append({**metrics, "client": result.client_id})
    try:
        if before_unmask is not None:
            before_unmask(len(tally.accepted))
        sums = secure.finish()
    except SecAggError as err:
        tally.accepted.clear()
        return None, f"secure aggregation failed: {err}; round skipped, state unchanged"
    finally:  # every client a protocol step named, with the reason
        tally.rejected.extend(secure.rejected + _new(secure.server.offenders, secure.rejected))
    secure.out_of_range, secure.sum_bound = sums.out_of_range, sums.bound
    tally.unmasked = len(tally.accepted)  # a sum was recovered: released to the server
    problem = sums_problem(sums, len(tally.accepted), secure.layout)
    if problem is not None:
        tally.accepted.clear()
        return None, f"secure aggregation: {problem} (a malformed masked input); round skipped"
    s = sums.scalars
    if math.isfinite(s["loss"]):
        tally.loss_sum, tally.examples = s["loss"], int(round(s["weight"]))
    if sums.control is not None:
        tally.control_sum = sums.control
    return sums, None
