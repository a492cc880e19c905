"""Secure aggregation: SecAgg (Bonawitz et al., CCS 2017) and SecAgg+ (Bell et al., CCS 2020).

The server learns Σ_k x_k over the clients that delivered a masked input, and nothing about any
single x_k. Every primitive comes from ``cryptography``; this module is the protocol only.

Per round, with fresh keys (honest-but-curious server; the active-adversary consistency round
of the paper is not implemented):

0. **AdvertiseKeys.** Client u makes two X25519 key pairs, (c_u) for encrypting shares and
   (s_u) for pairwise masks, and sends both public keys. The server broadcasts the roster.
1. **ShareKeys.** u draws a 32-byte self-mask seed b_u and Shamir-shares b_u and s_u's private
   key (threshold t, over the prime field GF(2⁵²¹ − 1)) among its share holders: its neighbours
   and itself. Each share travels AES-GCM-encrypted under HKDF(X25519(c_u, c_v)); the server only
   routes ciphertexts. Clients that sent shares form U2.
2. **MaskedInput.** u sends y_u = x_u + PRG(b_u) + Σ_{v ∈ N(u) ∩ U2} ±PRG(s_uv) mod 2^bits, with
   s_uv = HKDF(X25519(s_u, s_v)) (+ if u < v, − otherwise) and PRG = AES-256-CTR. Senders: U3.
3. **Unmasking.** The server names U3 and the dropped U2 \\ U3. Each responding client returns
   its shares of b_v for v ∈ U3 and of s_v for dropped v — never both for one client. With t
   shares per client the server rebuilds b_v (removes self-masks) and the dropped clients' mask
   keys (removes their pairwise masks from their neighbours' inputs).

SecAgg+ replaces "everyone" by a sparse neighbour graph (``neighbors`` = k): each client masks
with and shares among k others, so client cost grows with k rather than n. The graph is a
Harary-style ring over a random permutation drawn from a public per-round seed, so server and
clients derive the same graph.

Cryptographic material comes from the operating system's CSPRNG (never from the run seed); the
unmasked sum does not depend on it, so runs stay reproducible.
"""

from __future__ import annotations

import math
import os
import secrets
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PRIME = 2**521 - 1  # a Mersenne prime: Shamir's field, larger than any 32-byte secret
_RAW = {"encoding": serialization.Encoding.Raw, "format": serialization.PublicFormat.Raw}


class SecAggError(RuntimeError):
    """The round's sum cannot be recovered (too few clients left); the message says why."""


# ---------------------------------------------------------------- primitives (pure functions)


def shamir_share(secret: int, threshold: int, holders: Sequence[int]) -> dict[int, int]:
    """Shares f(h + 1) of a random degree-(t − 1) polynomial with f(0) = secret, one per holder."""
    if not 1 <= threshold <= len(holders):
        raise ValueError(f"threshold {threshold} must be between 1 and {len(holders)} holders")
    coefficients = [secret % PRIME] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for h in holders:
        x, y = h + 1, 0
        for c in reversed(coefficients):
            y = (y * x + c) % PRIME
        shares[h] = y
    return shares


def shamir_reconstruct(shares: Mapping[int, int], threshold: int) -> int:
    """f(0) by Lagrange interpolation from any ``threshold`` shares {holder: f(holder + 1)}."""
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares, {threshold} needed")
    points = [(h + 1, y) for h, y in list(shares.items())[:threshold]]
    secret = 0
    for j, (xj, yj) in enumerate(points):
        num, den = 1, 1
        for m, (xm, _) in enumerate(points):
            if m != j:
                num = num * xm % PRIME
                den = den * (xm - xj) % PRIME
        secret = (secret + yj * num * pow(den, -1, PRIME)) % PRIME
    return secret


def prg(seed: bytes, length: int, bits: int) -> torch.Tensor:
    """``length`` uniform integers in [0, 2^bits) from AES-256-CTR keyed by the 32-byte ``seed``."""
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    stream = encryptor.update(b"\0" * (8 * length)) + encryptor.finalize()
    words = np.frombuffer(stream, dtype=np.uint64) & np.uint64((1 << bits) - 1)
    return torch.from_numpy(words.astype(np.int64))


def agree(private: X25519PrivateKey, public: bytes, purpose: bytes) -> bytes:
    """A 32-byte key both ends derive: HKDF-SHA256 of the X25519 shared secret."""
    shared = private.exchange(X25519PublicKey.from_public_bytes(public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fedfm-secagg/" + purpose).derive(
        shared
    )


def neighbours(ids: Sequence[int], k: int | None, graph_seed: int) -> dict[int, set[int]]:
    """Each client's neighbours: everyone (SecAgg), or k on a permuted ring (SecAgg+, k ≥ 2)."""
    ids = sorted(ids)
    if k is None or k >= len(ids) - 1:
        return {u: set(ids) - {u} for u in ids}
    ring = [ids[i] for i in np.random.default_rng(graph_seed).permutation(len(ids))]
    half = (k + 1) // 2
    graph: dict[int, set[int]] = {u: set() for u in ids}
    for i, u in enumerate(ring):
        for step in range(1, half + 1):
            v = ring[(i + step) % len(ring)]
            graph[u].add(v)
            graph[v].add(u)
    return graph


def threshold_for(holders: int, fraction: float) -> int:
    return max(1, min(holders, math.ceil(fraction * holders)))


# ---------------------------------------------------------------- messages (bytes and ints only)


@dataclass(frozen=True)
class SecAggParams:
    """Public per-round protocol settings, the same at the server and every client."""

    bits: int  # the masking modulus is 2^bits
    length: int  # entries of the vector being summed
    threshold: float  # share of a client's share holders needed to reconstruct its secrets
    neighbors: int | None  # SecAgg+ degree k; None: complete graph (SecAgg)
    graph_seed: int  # public: which neighbour graph this round uses


@dataclass(frozen=True)
class AdvertiseKeys:
    client: int
    cipher_public: bytes
    mask_public: bytes

    def nbytes(self) -> int:
        return 4 + len(self.cipher_public) + len(self.mask_public)


@dataclass(frozen=True)
class EncryptedShare:
    sender: int
    receiver: int
    nonce: bytes
    ciphertext: bytes

    def nbytes(self) -> int:
        return 8 + len(self.nonce) + len(self.ciphertext)


@dataclass(frozen=True)
class MaskedInput:
    client: int
    vector: torch.Tensor  # int64 entries in [0, 2^bits)

    def nbytes(self, bits: int) -> int:
        return 4 + self.vector.numel() * math.ceil(bits / 8)


@dataclass(frozen=True)
class UnmaskRequest:
    survivors: tuple[int, ...]  # U3: delivered a masked input
    dropped: tuple[int, ...]  # U2 \ U3: shared keys, then dropped

    def nbytes(self) -> int:
        return 4 * (len(self.survivors) + len(self.dropped))


@dataclass(frozen=True)
class UnmaskResponse:
    client: int
    self_mask_shares: dict[int, int]  # owner → share of b_owner (owners in U3)
    mask_key_shares: dict[int, int]  # owner → share of s_owner's private key (dropped owners)

    def nbytes(self) -> int:
        return 4 + 70 * (len(self.self_mask_shares) + len(self.mask_key_shares))


_SHARE_BYTES = 66  # an element of GF(2^521 − 1)


def _share_plaintext(sender: int, receiver: int, b_share: int, key_share: int) -> bytes:
    return (
        struct.pack("<II", sender, receiver)
        + b_share.to_bytes(_SHARE_BYTES, "little")
        + (key_share.to_bytes(_SHARE_BYTES, "little"))
    )


# ---------------------------------------------------------------- the two parties


@dataclass
class SecAggClient:
    """One client's side of one round. Holds its keys and the shares others sent it."""

    client_id: int
    params: SecAggParams
    _cipher_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    _mask_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    _self_seed: bytes = field(default_factory=lambda: os.urandom(32), repr=False)
    _roster: dict[int, AdvertiseKeys] = field(default_factory=dict, repr=False)
    _held: dict[int, tuple[int, int]] = field(default_factory=dict, repr=False)  # owner → (b, sk) shares
    _graph: dict[int, set[int]] = field(default_factory=dict, repr=False)
    _unmasked: bool = False

    def advertise(self) -> AdvertiseKeys:
        return AdvertiseKeys(
            self.client_id,
            self._cipher_key.public_key().public_bytes(**_RAW),
            self._mask_key.public_key().public_bytes(**_RAW),
        )

    def share_keys(self, roster: Mapping[int, AdvertiseKeys]) -> list[EncryptedShare]:
        if self.client_id not in roster:
            raise SecAggError(f"client {self.client_id} is not on the roster")
        self._roster = dict(roster)
        self._graph = neighbours(list(roster), self.params.neighbors, self.params.graph_seed)
        holders = sorted(self._graph[self.client_id] | {self.client_id})
        t = threshold_for(len(holders), self.params.threshold)
        b_shares = shamir_share(int.from_bytes(self._self_seed, "little"), t, holders)
        sk = self._mask_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        key_shares = shamir_share(int.from_bytes(sk, "little"), t, holders)
        out = []
        for v in holders:
            if v == self.client_id:
                self._held[v] = (b_shares[v], key_shares[v])
                continue
            key = agree(self._cipher_key, roster[v].cipher_public, b"share")
            nonce = os.urandom(12)
            aad = struct.pack("<II", self.client_id, v)
            plaintext = _share_plaintext(self.client_id, v, b_shares[v], key_shares[v])
            out.append(EncryptedShare(self.client_id, v, nonce, AESGCM(key).encrypt(nonce, plaintext, aad)))
        return out

    def receive_shares(self, shares: Iterable[EncryptedShare]) -> None:
        for s in shares:
            if s.receiver != self.client_id or s.sender not in self._roster:
                raise SecAggError(f"client {self.client_id} got a share not meant for it (from {s.sender})")
            key = agree(self._cipher_key, self._roster[s.sender].cipher_public, b"share")
            plain = AESGCM(key).decrypt(s.nonce, s.ciphertext, struct.pack("<II", s.sender, s.receiver))
            sender, receiver = struct.unpack("<II", plain[:8])
            if (sender, receiver) != (s.sender, s.receiver):
                raise SecAggError(f"client {self.client_id}: share header does not match its envelope")
            b = int.from_bytes(plain[8 : 8 + _SHARE_BYTES], "little")
            k = int.from_bytes(plain[8 + _SHARE_BYTES :], "little")
            self._held[s.sender] = (b, k)

    def mask(self, vector: torch.Tensor) -> MaskedInput:
        """y = x + PRG(b) ± PRG(s_uv) for every neighbour that shared keys, mod 2^bits."""
        bits, n = self.params.bits, self.params.length
        if vector.dtype != torch.int64 or vector.shape != (n,):
            raise ValueError(f"secure aggregation expects an int64 vector of length {n}")
        modulus_mask = (1 << bits) - 1
        y = (vector + prg(self._self_seed, n, bits)) & modulus_mask
        for v in sorted(self._graph[self.client_id]):
            if v not in self._held:  # v never shared keys (not in U2): no mask with it
                continue
            p = prg(agree(self._mask_key, self._roster[v].mask_public, b"mask"), n, bits)
            y = (y + p if self.client_id < v else y - p) & modulus_mask
        return MaskedInput(self.client_id, y)

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped:
            raise SecAggError("the server named a client both surviving and dropped; refusing to unmask")
        if self._unmasked:
            raise SecAggError("unmasking was already answered this round")
        holders = self._graph[self.client_id] | {self.client_id}
        if len(survivors & holders) < threshold_for(len(holders), self.params.threshold):
            raise SecAggError("fewer survivors than the threshold; refusing to unmask")
        self._unmasked = True
        return UnmaskResponse(
            self.client_id,
            {o: s[0] for o, s in self._held.items() if o in survivors},
            {o: s[1] for o, s in self._held.items() if o in dropped},
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

    def collect_keys(self, adverts: Iterable[AdvertiseKeys]) -> dict[int, AdvertiseKeys]:
        self.roster = {a.client: a for a in adverts}
        self.graph = neighbours(list(self.roster), self.params.neighbors, self.params.graph_seed)
        return self.roster

    def route_shares(self, outgoing: Mapping[int, list[EncryptedShare]]) -> dict[int, list[EncryptedShare]]:
        """Forward each ciphertext to its receiver; the senders form U2."""
        self.shared = set(outgoing)
        inbox: dict[int, list[EncryptedShare]] = {u: [] for u in self.shared}
        for sender, shares in outgoing.items():
            for s in shares:
                if s.sender != sender:
                    raise SecAggError(f"client {sender} sent a share claiming to come from {s.sender}")
                if s.receiver in inbox:
                    inbox[s.receiver].append(s)
        return inbox

    def input_problem(self, masked: MaskedInput) -> str | None:
        """Why a masked input cannot be used (it then counts as a dropout), or None."""
        v = masked.vector
        if masked.client not in self.shared:
            return "sent a masked input without having shared its keys"
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

    def unmask_request(self) -> UnmaskRequest:
        survivors = tuple(sorted(self.survivors))
        dropped = tuple(sorted(self.shared - self.survivors))
        for u in survivors:  # fail early, before asking anyone for shares
            self._needed(u, survivors)
        return UnmaskRequest(survivors, dropped)

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
            shares = {c: r.self_mask_shares[u] for c, r in responses.items() if u in r.self_mask_shares}
            seed = shamir_reconstruct(shares, t).to_bytes(32, "little")
            total = (total - prg(seed, n, bits)) & modulus_mask
        for u in request.dropped:
            t = self._needed(u, responses)
            shares = {c: r.mask_key_shares[u] for c, r in responses.items() if u in r.mask_key_shares}
            key = X25519PrivateKey.from_private_bytes(shamir_reconstruct(shares, t).to_bytes(32, "little"))
            for v in sorted(self.graph[u] & set(request.survivors)):
                p = prg(agree(key, self.roster[v].mask_public, b"mask"), n, bits)
                # y_v holds +p if v < u, −p otherwise: take it back out
                total = (total - p if v < u else total + p) & modulus_mask
        return total
