"""Secure aggregation across processes: the SecAgg messages of ``fedfm.privacy.secagg`` over gRPC.

The server half (``RemoteSecureRound``) has the interface the round loop uses in simulation
(``layout``, ``accept``, ``finish``, byte counts), but each protocol step is an exchange with the
client processes through the engine: advertise keys → share keys → deliver shares (before
training), then unmask (after the masked inputs). Each client keeps its ``SecAggClient`` for the
round (``ClientSecure``) and masks its own vector; the server only ever sees masked vectors and
the sum. Messages are encoded field by field (bytes in base64, integers as JSON integers) — no
pickling of network input.
"""

from __future__ import annotations

import base64
import dataclasses
import time

from fedfm.privacy import packing
from fedfm.privacy.secagg import (
    AdvertiseKeys,
    EncryptedShare,
    SecAggClient,
    SecAggError,
    SecAggParams,
    UnmaskRequest,
    UnmaskResponse,
)
from fedfm.privacy.secagg_server import SecAggServer
from fedfm.privacy.secure_round import SecureRound, secure_report
from fedfm.privacy.skellam import SkellamRound


def _b(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


def encode_advert(a: AdvertiseKeys) -> dict:
    return {"client": a.client, "cipher_public": _b(a.cipher_public), "mask_public": _b(a.mask_public)}


def decode_advert(d: dict) -> AdvertiseKeys:
    return AdvertiseKeys(int(d["client"]), _unb(d["cipher_public"]), _unb(d["mask_public"]))


def encode_share(s: EncryptedShare) -> dict:
    return {"sender": s.sender, "receiver": s.receiver, "nonce": _b(s.nonce), "ciphertext": _b(s.ciphertext)}


def decode_share(d: dict) -> EncryptedShare:
    return EncryptedShare(int(d["sender"]), int(d["receiver"]), _unb(d["nonce"]), _unb(d["ciphertext"]))


def encode_response(r: UnmaskResponse) -> dict:
    return {
        "client": r.client,
        "self_mask_shares": [[int(o), int(v)] for o, v in r.self_mask_shares.items()],
        "mask_key_shares": [[int(o), int(v)] for o, v in r.mask_key_shares.items()],
    }


def decode_response(d: dict) -> UnmaskResponse:
    return UnmaskResponse(
        int(d["client"]),
        {int(o): int(v) for o, v in d["self_mask_shares"]},
        {int(o): int(v) for o, v in d["mask_key_shares"]},
    )


def encode_layout(layout: packing.Layout) -> dict:
    return {**dataclasses.asdict(layout), "shapes": [[k, list(s)] for k, s in layout.shapes]}


def decode_layout(d: dict) -> packing.Layout:
    shapes = tuple((k, tuple(int(x) for x in s)) for k, s in d["shapes"])
    skellam = SkellamRound(**d["skellam"]) if d.get("skellam") else None
    return packing.Layout(**{**d, "shapes": shapes, "skellam": skellam})


class RemoteSecureRound:
    """The server's side of one secure round whose clients are other processes."""

    def __init__(self, layout: packing.Layout, server: SecAggServer, exchange, rnd: int) -> None:
        self.layout, self.server, self.exchange, self.round = layout, server, exchange, rnd
        self.bytes_up = self.bytes_down = 0
        self.rejected: list[dict] = []
        self.server_s = 0.0
        self.near_wrap = 0

    @classmethod
    def start(cls, exchange, cohort: list[int], layout: packing.Layout, cfg, graph_seed: int, rnd: int):
        """Stages 0–1 over the network. ``exchange(rnd, step, {client: message}) → {client: reply}``;
        clients that do not answer in time drop out of the protocol (SecAgg tolerates that)."""
        params = SecAggParams(layout.bits, layout.length, cfg.threshold, cfg.neighbors, graph_seed)
        server = SecAggServer(params)
        self = cls(layout, server, exchange, rnd)
        setup = {"params": dataclasses.asdict(params), "layout": encode_layout(layout)}
        replies = exchange(rnd, "advertise", dict.fromkeys(cohort, setup))
        adverts = [decode_advert(r["advert"]) for r in replies.values()]
        roster = server.collect_keys(adverts)
        self.bytes_up += sum(a.nbytes() for a in adverts)
        self.bytes_down += len(roster) * sum(a.nbytes() for a in adverts)
        message = {"roster": [encode_advert(a) for a in roster.values()]}
        replies = exchange(rnd, "share", dict.fromkeys(roster, message))
        outgoing = {u: [decode_share(s) for s in r["shares"]] for u, r in replies.items()}
        inbox = server.route_shares(outgoing)
        self.bytes_up += sum(s.nbytes() for shares in outgoing.values() for s in shares)
        self.bytes_down += sum(s.nbytes() for shares in inbox.values() for s in shares)
        exchange(rnd, "receive", {u: {"shares": [encode_share(s) for s in inbox[u]]} for u in inbox})
        return self

    accept = SecureRound.accept  # stage 2 happens at the server alone: the same code as in simulation
    report = secure_report

    def finish(self) -> packing.Sums:
        """Stage 3: the survivors' shares over the network, then only the sum is recovered."""
        start = time.perf_counter()
        request = self.server.unmask_request()
        message = {"survivors": list(request.survivors), "dropped": list(request.dropped)}
        replies = self.exchange(self.round, "unmask", dict.fromkeys(request.survivors, message))
        responses = [decode_response(r["response"]) for r in replies.values()]
        self.bytes_down += len(request.survivors) * request.nbytes()
        self.bytes_up += sum(r.nbytes() for r in responses)
        total = self.server.finish(responses, request)
        self.server_s += time.perf_counter() - start
        return packing.unpack(self.layout, total)


class ClientSecure:
    """A client's side of its secure rounds: answers protocol steps; masks its own vector."""

    def __init__(self, client_id: int) -> None:
        self.client_id = client_id
        self.rounds: dict[int, tuple[SecAggClient, packing.Layout]] = {}

    def answer(self, rnd: int, step: str, message: dict) -> dict:
        if step == "advertise":
            params = SecAggParams(**message["params"])
            client = SecAggClient(self.client_id, params)
            self.rounds = {rnd: (client, decode_layout(message["layout"]))}  # only the current round
            return {"advert": encode_advert(client.advertise())}
        client, _ = self._round(rnd)
        if step == "share":
            roster = {a.client: a for a in map(decode_advert, message["roster"])}
            return {"shares": [encode_share(s) for s in client.share_keys(roster)]}
        if step == "receive":
            client.receive_shares(decode_share(s) for s in message["shares"])
            return {}
        if step == "unmask":
            request = UnmaskRequest(tuple(message["survivors"]), tuple(message["dropped"]))
            return {"response": encode_response(client.unmask(request))}
        raise SecAggError(f"unknown secure aggregation step {step!r}")

    def _round(self, rnd: int) -> tuple[SecAggClient, packing.Layout]:
        if rnd not in self.rounds:
            raise SecAggError(f"no secure aggregation set up for round {rnd}")
        return self.rounds[rnd]

    def for_round(self, rnd: int) -> RoundMasker:
        client, layout = self._round(rnd)
        return RoundMasker(layout, client)


@dataclasses.dataclass(frozen=True)
class RoundMasker:
    """What ``ClientProgram`` sees as ``ctx.secure`` on a deployed client."""

    layout: packing.Layout
    client: SecAggClient

    def mask(self, client_id: int, vector):
        if client_id != self.client.client_id:
            raise SecAggError(f"client {client_id} cannot mask as client {self.client.client_id}")
        return {"masked": self.client.mask(vector).vector}
