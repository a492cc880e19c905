"""Secure aggregation across processes: the SecAgg messages of ``fedfm.privacy.secagg`` over gRPC.

The server half (``RemoteSecureRound``) has the interface the round loop uses in simulation
(``layout``, ``accept``, ``finish``, byte counts), but each protocol step is an exchange with the
client processes through the engine: advertise keys → share keys → deliver shares (before
training), then (signed mode) the consistency check and unmasking (after the masked inputs). Each
client keeps its ``SecAggClient`` for the round (``ClientSecure``) and masks its own vector; the
server only ever sees masked vectors and the sum.

Messages are decoded field by field (bytes in base64, integers as JSON integers, each checked)
— no pickling of network input — and always attributed to the client the transport
authenticated: a message that names another sender is refused. A client whose message does not
decode is named and left out of the protocol; the round goes on with the rest.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import time

from fedfm.privacy import packing, shamir
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

MAX_ID = 2**31 - 1


class MessageError(ValueError):
    """A secure-aggregation message that does not decode; the message says what is wrong."""


def _b(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb(text, limit: int = 1 << 16) -> bytes:
    if not isinstance(text, str) or len(text) > limit:
        raise MessageError("expected a base64 string")
    try:
        return base64.b64decode(text.encode(), validate=True)
    except (binascii.Error, ValueError):
        raise MessageError("expected a base64 string") from None


def _int(value, high: int = MAX_ID) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise MessageError(f"expected an integer in [0, {high}]")
    return value


def _list(value, limit: int = 1 << 16) -> list:
    if not isinstance(value, list) or len(value) > limit:
        raise MessageError("expected a list")
    return value


def encode_advert(a: AdvertiseKeys) -> dict:
    return {
        "client": a.client,
        "cipher_public": _b(a.cipher_public),
        "mask_public": _b(a.mask_public),
        "identity": _b(a.identity),
        "signature": _b(a.signature),
    }


def decode_advert(d: dict, sender: int | None = None) -> AdvertiseKeys:
    client = _int(d["client"])
    if sender is not None and client != sender:
        raise MessageError(f"advertises keys for client {client}")
    return AdvertiseKeys(
        client,
        _unb(d["cipher_public"]),
        _unb(d["mask_public"]),
        _unb(d.get("identity", "")),
        _unb(d.get("signature", "")),
    )


def encode_share(s: EncryptedShare) -> dict:
    return {
        "sender": s.sender,
        "receiver": s.receiver,
        "nonce": _b(s.nonce),
        "ciphertext": _b(s.ciphertext),
        "commitments": [_b(c) for c in s.commitments],
    }


def decode_share(d: dict, sender: int | None = None) -> EncryptedShare:
    share = EncryptedShare(
        _int(d["sender"]),
        _int(d["receiver"]),
        _unb(d["nonce"]),
        _unb(d["ciphertext"]),
        tuple(_unb(c) for c in _list(d["commitments"], 2)),
    )
    if sender is not None and share.sender != sender:
        raise MessageError(f"sent a share claiming to come from client {share.sender}")
    if len(share.commitments) != 2:
        raise MessageError("a share needs two commitments")
    return share


def _shares_out(shares: dict) -> list:
    return [[int(o), int(v), _b(salt)] for o, (v, salt) in shares.items()]


def _shares_in(rows) -> dict[int, tuple[int, bytes]]:
    out = {}
    for row in _list(rows):
        owner, value, salt = _list(row, 3)
        out[_int(owner)] = (_int(value, shamir.PRIME - 1), _unb(salt))
    return out


def encode_response(r: UnmaskResponse) -> dict:
    return {
        "client": r.client,
        "self_mask_shares": _shares_out(r.self_mask_shares),
        "mask_key_shares": _shares_out(r.mask_key_shares),
    }


def decode_response(d: dict, sender: int | None = None) -> UnmaskResponse:
    client = _int(d["client"])
    if sender is not None and client != sender:
        raise MessageError(f"answers for client {client}")
    return UnmaskResponse(client, _shares_in(d["self_mask_shares"]), _shares_in(d["mask_key_shares"]))


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
        self.out_of_range, self.sum_bound = 0, None

    def _decoded(self, replies: dict, decode) -> dict:
        """Each reply decoded, attributed to its authenticated sender; a bad one names its client."""
        out = {}
        for sender, reply in replies.items():
            try:
                out[sender] = decode(sender, reply)
            except (MessageError, SecAggError, KeyError, TypeError, ValueError) as err:
                reason = f"malformed secure-aggregation message: {type(err).__name__}: {err}"[:300]
                self.server.offenders.append({"client": sender, "reason": reason})
        return out

    @classmethod
    def start(
        cls,
        exchange,
        cohort: list[int],
        layout: packing.Layout,
        cfg,
        graph_seed: int,
        rnd: int,
        identities=None,
    ):
        """Stages 0–1 over the network. ``exchange(rnd, step, {client: message}) → {client: reply}``;
        clients that do not answer in time, or answer nonsense, drop out of the protocol.
        ``identities`` (signed mode): (verifier, {client: site name}) to check adverts first."""
        params = SecAggParams(
            layout.bits, layout.length, cfg.threshold, cfg.neighbors, graph_seed, cfg.signatures, rnd
        )
        verifier, names = identities or (None, {})
        server = SecAggServer(params, verifier=verifier, names=names)
        self = cls(layout, server, exchange, rnd)
        setup = {"params": dataclasses.asdict(params), "layout": encode_layout(layout)}
        replies = exchange(rnd, "advertise", dict.fromkeys(cohort, setup))
        adverts = self._decoded(replies, lambda u, r: decode_advert(r["advert"], u))
        roster = server.collect_keys(adverts.values())
        self.bytes_up += sum(a.nbytes() for a in adverts.values())
        self.bytes_down += len(roster) * sum(a.nbytes() for a in roster.values())
        message = {"roster": [encode_advert(a) for a in roster.values()]}
        replies = exchange(rnd, "share", dict.fromkeys(roster, message))
        outgoing = self._decoded(replies, lambda u, r: [decode_share(s, u) for s in _list(r["shares"])])
        inbox = server.route_shares(outgoing)
        self.bytes_up += sum(s.nbytes() for shares in outgoing.values() for s in shares)
        self.bytes_down += sum(s.nbytes() for shares in inbox.values() for s in shares)
        delivery = {u: {"shares": [encode_share(s) for s in inbox[u]]} for u in inbox}
        replies = exchange(rnd, "receive", delivery)
        reports = self._decoded(replies, lambda u, r: [_int(d) for d in _list(r.get("bad_dealers", []))])
        for holder, dealers in reports.items():
            server.accused(holder, dealers)
        return self

    accept = SecureRound.accept  # stage 2 happens at the server alone: the same code as in simulation
    report = secure_report

    def finish(self) -> packing.Sums:
        """Stage 3 (after the consistency check in signed mode): the survivors' shares over the
        network, then only the sum is recovered."""
        start = time.perf_counter()
        survivors = sorted(self.server.survivors)
        signatures = {}
        if self.server.params.signatures:
            asked = dict.fromkeys(survivors, {"survivors": survivors})
            replies = self.exchange(self.round, "consistency", asked)
            signatures = self._decoded(replies, lambda u, r: _unb(r["signature"]))
        request = self.server.unmask_request(signatures)
        message = {
            "survivors": list(request.survivors),
            "dropped": list(request.dropped),
            "signatures": {str(u): _b(s) for u, s in signatures.items()},
        }
        replies = self.exchange(self.round, "unmask", dict.fromkeys(request.survivors, message))
        responses = self._decoded(replies, lambda u, r: decode_response(r["response"], u))
        self.bytes_down += len(request.survivors) * request.nbytes()
        self.bytes_up += sum(r.nbytes() for r in responses.values())
        total = self.server.finish(responses.values(), request)
        self.server_s += time.perf_counter() - start
        return packing.unpack(self.layout, total)


class ClientSecure:
    """A client's side of its secure rounds: answers protocol steps; masks its own vector.

    ``signer`` / ``verifier`` (``fedfm.privacy.signing``) are this site's certificate identity and
    the federation's CA, for rounds with ``secagg.signatures``."""

    def __init__(self, client_id: int, signer=None, verifier=None) -> None:
        self.client_id, self.signer, self.verifier = client_id, signer, verifier
        self.rounds: dict[int, tuple[SecAggClient, packing.Layout]] = {}

    def answer(self, rnd: int, step: str, message: dict) -> dict:
        if step == "advertise":
            params = SecAggParams(**message["params"])
            if params.signatures and (self.signer is None or self.verifier is None):
                raise SecAggError("signed secure aggregation needs this client's --cert, --key and --ca")
            client = SecAggClient(self.client_id, params, self.signer, self.verifier)
            self.rounds = {rnd: (client, decode_layout(message["layout"]))}  # only the current round
            return {"advert": encode_advert(client.advertise())}
        client, _ = self._round(rnd)
        if step == "share":
            roster = {a.client: a for a in map(decode_advert, message["roster"])}
            return {"shares": [encode_share(s) for s in client.share_keys(roster)]}
        if step == "receive":
            return {"bad_dealers": client.receive_shares(decode_share(s) for s in message["shares"])}
        if step == "consistency":
            return {"signature": _b(client.sign_survivors(message["survivors"]))}
        if step == "unmask":
            signatures = {int(u): _unb(s) for u, s in message.get("signatures", {}).items()}
            request = UnmaskRequest(tuple(message["survivors"]), tuple(message["dropped"]), signatures)
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
