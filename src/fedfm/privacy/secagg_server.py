"""The server's side of one secure-aggregation round (Bonawitz et al. 2017; see ``secagg``).

It routes messages, keeps the dealers' share commitments, names every client whose message is
malformed or whose revealed share does not open its commitment, and recovers only the sum.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedfm.privacy import shamir
from fedfm.privacy.secagg import (
    AdvertiseKeys,
    EncryptedShare,
    MaskedInput,
    SecAggError,
    SecAggParams,
    UnmaskRequest,
    UnmaskResponse,
    agree,
    neighbours,
    prg,
    shamir_reconstruct,
    threshold_for,
)


@dataclass
class SecAggServer:
    """The server's side of one round: routes messages, then recovers only the sum."""

    params: SecAggParams
    roster: dict[int, AdvertiseKeys] = field(default_factory=dict)
    shared: set[int] = field(default_factory=set)  # U2
    survivors: set[int] = field(default_factory=set)  # U3: delivered a masked input
    total: torch.Tensor | None = None  # running Σ y_u: memory does not grow with the cohort
    graph: dict[int, set[int]] = field(default_factory=dict)
    commitments: dict[tuple[int, int], tuple[bytes, bytes]] = field(default_factory=dict)
    missing: set = field(default_factory=set)  # (dealer, holder): the holder holds no usable share
    offenders: list[dict] = field(default_factory=list)  # {client, reason}, for the round record
    verifier: object = None  # signed mode: checks adverts before they reach anyone (one bad one
    names: dict[int, str] = field(default_factory=dict)  # would make every client refuse the roster)

    def advert_problem(self, a: AdvertiseKeys) -> str | None:
        problem = a.problem()
        if problem is None and self.params.signatures and self.verifier is not None:
            name = self.verifier.identify(a.identity, a.signed_part(self.params), a.signature)
            if name is None or name != self.names.get(a.client, name):
                problem = "advertised keys without a valid signature by this site's identity"
        return problem

    def collect_keys(self, adverts: Iterable[AdvertiseKeys]) -> dict[int, AdvertiseKeys]:
        roster = {}
        for a in adverts:
            problem = self.advert_problem(a)
            if problem is not None:
                self.offenders.append({"client": a.client, "reason": problem})
                continue
            roster[a.client] = a
        self.roster = roster
        self.graph = neighbours(list(self.roster), self.params.neighbors, self.params.graph_seed)
        return self.roster

    def share_problem(self, sender: int, shares: list[EncryptedShare]) -> str | None:
        """Why a client's ShareKeys message is unusable (it is then left out of U2), or None."""
        expected = self.graph.get(sender, set())
        receivers = [s.receiver for s in shares]
        if sender not in self.roster:
            return "sent shares without having advertised keys"
        if any(s.sender != sender for s in shares):
            return "sent a share claiming to come from another client"
        if set(receivers) != expected or len(receivers) != len(expected):
            return "did not send exactly one share to each of its neighbours"
        if any(len(c) != 32 for s in shares for c in s.commitments):
            return "sent shares without 32-byte commitments"
        return None

    def route_shares(self, outgoing: Mapping[int, list[EncryptedShare]]) -> dict[int, list[EncryptedShare]]:
        """Forward each ciphertext to its receiver and keep its commitments; senders form U2.
        A sender whose message is malformed is named and left out."""
        good = {}
        for sender, shares in outgoing.items():
            problem = self.share_problem(sender, shares)
            if problem is not None:
                self.offenders.append({"client": sender, "reason": problem})
            else:
                good[sender] = shares
        self.shared = set(good)
        inbox: dict[int, list[EncryptedShare]] = {u: [] for u in self.shared}
        for sender, shares in good.items():
            for s in shares:
                self.commitments[(sender, s.receiver)] = s.commitments
                if s.receiver in inbox:
                    inbox[s.receiver].append(s)
        return inbox

    def accused(self, holder: int, dealers) -> None:
        """``holder`` says these dealers' shares did not match their commitments. The server cannot
        tell who lies, so it takes the accusation only as "holder has no share of that dealer's
        secrets" (the threshold absorbs it) and names both; an accusation about a share it never
        routed to ``holder`` is the accuser's own fault."""
        for dealer in dict.fromkeys(dealers):
            if (dealer, holder) not in self.commitments:
                self.offenders.append(
                    {"client": holder, "reason": f"accused client {dealer} of a share it was never sent"}
                )
                continue
            self.missing.add((dealer, holder))
            self.offenders.append(
                {
                    "client": dealer,
                    "reason": f"dealt client {holder} a share that does not match its commitment "
                    f"(says client {holder})",
                }
            )

    def input_problem(self, masked: MaskedInput) -> str | None:
        """Why a masked input cannot be used (it then counts as a dropout), or None."""
        v = masked.vector
        if masked.client not in self.shared:
            return "sent a masked input without having shared its keys"
        if masked.client in self.survivors:
            return "sent a second masked input"
        if not isinstance(v, torch.Tensor) or v.dtype != torch.int64 or v.shape != (self.params.length,):
            return f"masked input must be an int64 vector of length {self.params.length}"
        if bool((v < 0).any()) or bool((v >= (1 << self.params.bits)).any()):
            return f"masked input has entries outside [0, 2^{self.params.bits})"
        return None

    def collect_input(self, masked: MaskedInput) -> None:
        if masked.client in self.survivors:
            raise SecAggError(f"client {masked.client} sent a second masked input")
        self.survivors.add(masked.client)
        y = masked.vector
        self.total = y.clone() if self.total is None else (self.total + y) & ((1 << self.params.bits) - 1)

    def unmask_request(self, signatures: Mapping[int, bytes] | None = None) -> UnmaskRequest:
        survivors = tuple(sorted(self.survivors))
        dropped = tuple(sorted(self.shared - self.survivors))
        for u in survivors:  # fail early, before asking anyone for shares
            self._needed(u, survivors)
        return UnmaskRequest(survivors, dropped, dict(signatures or {}))

    def _needed(self, owner: int, responders: Iterable[int]) -> int:
        holders = (self.graph[owner] | {owner}) & self.shared
        t = threshold_for(len(self.graph[owner]) + 1, self.params.threshold)
        available = len(holders & set(responders))
        if available < t:
            raise SecAggError(
                f"client {owner}'s secrets need {t} of its {len(self.graph[owner]) + 1} share holders, "
                f"only {available} responded; the sum cannot be recovered"
            )
        return t

    def _opened(self, owner: int, kind: bytes, responses: Mapping[int, UnmaskResponse]) -> dict[int, int]:
        """The shares of ``owner``'s secret that open its commitments; holders that returned a wrong
        share are named (a holder that said it had none is not asked)."""
        slot = 0 if kind == b"b" else 1
        opened = {}
        for holder, r in responses.items():
            got = (r.self_mask_shares if kind == b"b" else r.mask_key_shares).get(owner)
            if got is None:
                continue
            if (owner, holder) in self.missing:  # it said it had none: whatever it sends is not used
                continue
            value, salt = got
            expected = b"" if holder == owner else self.commitments.get((owner, holder), (b"", b""))[slot]
            if (
                holder == owner
            ):  # its own share needs no commitment: if it lies, the consistency check names it
                if shamir.valid_share(value):
                    opened[holder] = value
                continue
            if shamir.valid_share(value) and shamir.commit(kind, owner, holder, value, salt) == expected:
                opened[holder] = value
            else:
                self.offenders.append(
                    {
                        "client": holder,
                        "reason": f"returned a share of client {owner}'s secret that does not "
                        "open its commitment; share discarded",
                    }
                )
        return opened

    def _secret(self, owner: int, kind: bytes, responses, t: int) -> int:
        shares = self._opened(owner, kind, responses)
        if len(shares) < t:
            raise SecAggError(
                f"client {owner}'s secret has {len(shares)} verified shares, {t} needed; "
                "the sum cannot be recovered"
            )
        if not shamir.consistent(shares, t):
            reason = f"client {owner} dealt shares of no single secret"
            self.offenders.append({"client": owner, "reason": reason})
            raise SecAggError(f"{reason}; the sum cannot be recovered")
        return shamir_reconstruct(shares, t)

    def finish(self, responses: Iterable[UnmaskResponse], request: UnmaskRequest) -> torch.Tensor:
        """Σ_{u ∈ U3} x_u mod 2^bits, or SecAggError naming the client whose secrets are short."""
        bits, n = self.params.bits, self.params.length
        modulus_mask = (1 << bits) - 1
        responses = {r.client: r for r in responses if r.client in request.survivors}
        if self.total is None:
            raise SecAggError("no client delivered a masked input")
        total = self.total
        for u in request.survivors:
            t = self._needed(u, responses)
            seed = self._secret(u, b"b", responses, t)
            if seed >= 1 << 256:
                raise SecAggError(f"client {u}'s self-mask seed does not fit 32 bytes")
            total = (total - prg(seed.to_bytes(32, "little"), n, bits)) & modulus_mask
        for u in request.dropped:
            t = self._needed(u, responses)
            secret = self._secret(u, b"s", responses, t)
            try:
                key = X25519PrivateKey.from_private_bytes(secret.to_bytes(32, "little"))
            except (OverflowError, ValueError):
                raise SecAggError(f"client {u}'s mask key does not reconstruct") from None
            for v in sorted(self.graph[u] & set(request.survivors)):
                p = prg(agree(key, self.roster[v].mask_public, b"mask"), n, bits)
                # y_v holds +p if v < u, −p otherwise: take it back out
                total = (total - p if v < u else total + p) & modulus_mask
        return total
