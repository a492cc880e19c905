"""Secure aggregation: SecAgg (Bonawitz et al., CCS 2017) and SecAgg+ (Bell et al., CCS 2020).

The server learns Σ_k x_k over the clients that delivered a masked input, and nothing about any
single x_k. Every primitive comes from ``cryptography``; this module is the protocol only.

Per round, with fresh keys:

0. **AdvertiseKeys.** Client u makes two X25519 key pairs, (c_u) for encrypting shares and
   (s_u) for pairwise masks, and sends both public keys. The server broadcasts the roster.
   With ``signatures`` (against an active server) u signs its keys with its long-term identity
   (``fedfm.privacy.signing``) and every client verifies every advert before going on.
1. **ShareKeys.** u draws a 32-byte self-mask seed b_u and Shamir-shares b_u and s_u's private
   key (threshold t, over the prime field GF(2⁵²¹ − 1)) among its share holders: its neighbours
   and itself. Each share travels AES-GCM-encrypted under HKDF(X25519(c_u, c_v)) with a fresh
   salt per share, and u shows the server a SHA-256 commitment to each (share, salt); the server
   only routes ciphertexts and keeps the commitments. A holder checks what it got against them.
   Clients that sent shares form U2.
2. **MaskedInput.** u sends y_u = x_u + PRG(b_u) + Σ_{v ∈ N(u) ∩ U2} ±PRG(s_uv) mod 2^bits, with
   s_uv = HKDF(X25519(s_u, s_v)) (+ if u < v, − otherwise) and PRG = AES-256-CTR. Senders: U3.
2½. **ConsistencyCheck** (``signatures``): each survivor signs the list U3 the server sent it
   (once per round); the server forwards the signatures, and a client goes on only with t valid
   signatures by distinct roster members on that very list — so a server cannot tell some
   clients that u dropped (to collect u's mask key) and others that it survived (to collect b_u).
3. **Unmasking.** The server names U3 and the dropped U2 \\ U3. Each responding client returns
   its shares (with their salts) of b_v for v ∈ U3 and of s_v for dropped v — never both for
   one client. The server opens each share against its dealer's commitment (a holder that
   returns a wrong share is named and its share discarded), checks that more than t shares lie
   on one polynomial (a dealer of inconsistent shares is named), rebuilds b_v and the dropped
   clients' mask keys from t of them, and removes the masks.

SecAgg+ replaces "everyone" by a sparse neighbour graph (``neighbors`` = k): each client masks
with and shares among k others, so client cost grows with k rather than n. The graph is a
Harary-style ring over a random permutation drawn from a public per-round seed, so server and
clients derive the same graph.

Cryptographic material comes from the operating system's CSPRNG (never from the run seed); the
unmasked sum does not depend on it, so runs stay reproducible. Every message field a client sends
is checked before use; a bad one raises ``SecAggError`` naming that client, and the transport
drops the client, not the round.
"""

from __future__ import annotations

import math
import os
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

from fedfm.privacy import shamir

PRIME = shamir.PRIME
_RAW = {"encoding": serialization.Encoding.Raw, "format": serialization.PublicFormat.Raw}
_KEY_BYTES = 32


class SecAggError(RuntimeError):
    """The round's sum cannot be recovered, or a message is bad; the message says why and whose."""


# ---------------------------------------------------------------- primitives (pure functions)


def shamir_share(secret: int, threshold: int, holders: Sequence[int]) -> dict[int, int]:
    return shamir.share(secret, threshold, holders)


def shamir_reconstruct(shares: Mapping[int, int], threshold: int) -> int:
    try:
        return shamir.reconstruct(shares, threshold)
    except shamir.ShareError as err:
        raise SecAggError(str(err)) from None


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
    signatures: bool = False  # signed adverts and the consistency check (active server)
    session: int = 0  # the round: what every signature is bound to

    def context(self, what: bytes) -> bytes:
        return b"fedfm-secagg/" + what + struct.pack("<qq", self.session, self.graph_seed)


@dataclass(frozen=True)
class AdvertiseKeys:
    client: int
    cipher_public: bytes
    mask_public: bytes
    identity: bytes = b""  # signed mode: the long-term identity (certificate or public key)
    signature: bytes = b""

    def nbytes(self) -> int:
        return 4 + len(self.cipher_public) + len(self.mask_public) + len(self.identity) + len(self.signature)

    def signed_part(self, params: SecAggParams) -> bytes:
        return (
            params.context(b"advert") + struct.pack("<I", self.client) + self.cipher_public + self.mask_public
        )

    def problem(self) -> str | None:
        if len(self.cipher_public) != _KEY_BYTES or len(self.mask_public) != _KEY_BYTES:
            return "advertised keys must be 32-byte X25519 public keys"
        probe = X25519PrivateKey.generate()  # a low-order point (all zeros, say) fails any exchange
        try:
            for key in (self.cipher_public, self.mask_public):
                probe.exchange(X25519PublicKey.from_public_bytes(key))
        except ValueError:
            return "advertised a degenerate X25519 public key"
        return None


@dataclass(frozen=True)
class EncryptedShare:
    sender: int
    receiver: int
    nonce: bytes
    ciphertext: bytes
    commitments: tuple[bytes, bytes] = (b"", b"")  # to (self-mask share, mask-key share), with salts

    def nbytes(self) -> int:
        return 8 + len(self.nonce) + len(self.ciphertext) + sum(map(len, self.commitments))


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
    signatures: Mapping[int, bytes] = field(default_factory=dict)  # signed mode: survivors' signatures

    def nbytes(self) -> int:
        return 4 * (len(self.survivors) + len(self.dropped)) + sum(map(len, self.signatures.values()))


@dataclass(frozen=True)
class UnmaskResponse:
    client: int
    self_mask_shares: dict[int, tuple[int, bytes]]  # owner → (share of b_owner, salt), owners in U3
    mask_key_shares: dict[int, tuple[int, bytes]]  # owner → (share of s_owner's key, salt), dropped

    def nbytes(self) -> int:
        return 4 + 102 * (len(self.self_mask_shares) + len(self.mask_key_shares))


_SHARE_BYTES = shamir.SHARE_BYTES
_SALT = 32


def _share_plaintext(sender: int, receiver: int, b: tuple[int, bytes], key: tuple[int, bytes]) -> bytes:
    return (
        struct.pack("<II", sender, receiver)
        + b[0].to_bytes(_SHARE_BYTES, "little")
        + b[1]
        + key[0].to_bytes(_SHARE_BYTES, "little")
        + key[1]
    )


def survivors_message(params: SecAggParams, survivors) -> bytes:
    """What a survivor signs in the consistency check: this round's exact survivor list."""
    ids = sorted(int(u) for u in survivors)
    return params.context(b"survivors") + struct.pack(f"<{len(ids)}I", *ids)


# ---------------------------------------------------------------- the two parties


@dataclass
class SecAggClient:
    """One client's side of one round. Holds its keys and the shares others sent it.

    Signed mode: ``signer`` holds this client's long-term identity, ``verifier`` names the
    identities of others (``fedfm.privacy.signing``).
    """

    client_id: int
    params: SecAggParams
    signer: object = None
    verifier: object = None
    _cipher_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    _mask_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    _self_seed: bytes = field(default_factory=lambda: os.urandom(32), repr=False)
    _roster: dict[int, AdvertiseKeys] = field(default_factory=dict, repr=False)
    _names: dict[int, str] = field(default_factory=dict, repr=False)  # signed mode: verified identities
    _held: dict[int, tuple[tuple[int, bytes], tuple[int, bytes]]] = field(default_factory=dict, repr=False)
    _in_u2: set[int] = field(default_factory=set, repr=False)  # dealt this client a share: in U2
    _graph: dict[int, set[int]] = field(default_factory=dict, repr=False)
    _signed: tuple[int, ...] | None = None
    _unmasked: bool = False

    def advertise(self) -> AdvertiseKeys:
        advert = AdvertiseKeys(
            self.client_id,
            self._cipher_key.public_key().public_bytes(**_RAW),
            self._mask_key.public_key().public_bytes(**_RAW),
        )
        if not self.params.signatures:
            return advert
        if self.signer is None:
            raise SecAggError(f"client {self.client_id}: signed secure aggregation needs an identity")
        signature = self.signer.sign(advert.signed_part(self.params))
        return AdvertiseKeys(
            advert.client, advert.cipher_public, advert.mask_public, self.signer.identity, signature
        )

    def _verify_roster(self, roster: Mapping[int, AdvertiseKeys]) -> None:
        names: dict[int, str] = {}
        for u, advert in roster.items():
            name = self.verifier.identify(advert.identity, advert.signed_part(self.params), advert.signature)
            if name is None:
                raise SecAggError(f"client {self.client_id}: the keys of client {u} carry no valid signature")
            names[u] = name
        if len(set(names.values())) != len(names):
            raise SecAggError(f"client {self.client_id}: two roster entries have one identity")
        self._names = names

    def share_keys(self, roster: Mapping[int, AdvertiseKeys]) -> list[EncryptedShare]:
        if self.client_id not in roster:
            raise SecAggError(f"client {self.client_id} is not on the roster")
        bad = [u for u, a in roster.items() if a.problem() is not None]
        if bad:  # the server should have dropped these: it is not doing its job
            raise SecAggError(f"client {self.client_id}: the roster holds unusable keys of clients {bad[:5]}")
        if self.params.signatures:
            self._verify_roster(roster)
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
            b = (b_shares[v], os.urandom(_SALT))
            k = (key_shares[v], os.urandom(_SALT))
            if v == self.client_id:
                self._held[v] = (b, k)
                self._in_u2.add(v)
                continue
            key = agree(self._cipher_key, roster[v].cipher_public, b"share")
            nonce = os.urandom(12)
            aad = struct.pack("<II", self.client_id, v)
            plaintext = _share_plaintext(self.client_id, v, b, k)
            commitments = (
                shamir.commit(b"b", self.client_id, v, *b),
                shamir.commit(b"s", self.client_id, v, *k),
            )
            sealed = AESGCM(key).encrypt(nonce, plaintext, aad)
            out.append(EncryptedShare(self.client_id, v, nonce, sealed, commitments))
        return out

    def receive_shares(self, shares: Iterable[EncryptedShare]) -> list[int]:
        """Decrypt the shares dealt to this client; returns the dealers whose shares do not match
        the commitments they showed the server (the server names them and drops them)."""
        bad = []
        for s in shares:
            if s.receiver != self.client_id or s.sender not in self._roster:
                raise SecAggError(f"client {self.client_id} got a share not meant for it (from {s.sender})")
            self._in_u2.add(s.sender)  # the server routed it: the sender is in U2, whatever it sent
            key = agree(self._cipher_key, self._roster[s.sender].cipher_public, b"share")
            try:
                plain = AESGCM(key).decrypt(s.nonce, s.ciphertext, struct.pack("<II", s.sender, s.receiver))
            except Exception:  # forged or damaged in transit: as good as no share
                bad.append(s.sender)
                continue
            sender, receiver = struct.unpack("<II", plain[:8])
            if (sender, receiver) != (s.sender, s.receiver):
                raise SecAggError(f"client {self.client_id}: share header does not match its envelope")
            o, n = 8, _SHARE_BYTES
            b = (int.from_bytes(plain[o : o + n], "little"), plain[o + n : o + n + _SALT])
            o += n + _SALT
            k = (int.from_bytes(plain[o : o + n], "little"), plain[o + n : o + n + _SALT])
            if s.commitments != (
                shamir.commit(b"b", s.sender, s.receiver, *b),
                shamir.commit(b"s", s.sender, s.receiver, *k),
            ):
                bad.append(s.sender)
                continue
            self._held[s.sender] = (b, k)
        return bad

    def mask(self, vector: torch.Tensor) -> MaskedInput:
        """y = x + PRG(b) ± PRG(s_uv) for every neighbour that shared keys, mod 2^bits."""
        bits, n = self.params.bits, self.params.length
        if vector.dtype != torch.int64 or vector.shape != (n,):
            raise ValueError(f"secure aggregation expects an int64 vector of length {n}")
        modulus_mask = (1 << bits) - 1
        y = (vector + prg(self._self_seed, n, bits)) & modulus_mask
        for v in sorted(self._graph[self.client_id]):
            if v not in self._in_u2:  # v never shared keys (not in U2): no mask with it
                continue
            p = prg(agree(self._mask_key, self._roster[v].mask_public, b"mask"), n, bits)
            y = (y + p if self.client_id < v else y - p) & modulus_mask
        return MaskedInput(self.client_id, y)

    def sign_survivors(self, survivors) -> bytes:
        """Consistency check: sign the survivor list the server sent — once per round."""
        ids = tuple(sorted(int(u) for u in survivors))
        if self._signed is not None and self._signed != ids:
            raise SecAggError(f"client {self.client_id}: the server sent a second, different survivor list")
        if self.client_id not in ids:
            raise SecAggError(f"client {self.client_id}: the survivor list leaves this client out")
        self._signed = ids
        return self.signer.sign(survivors_message(self.params, ids))

    def _check_consistency(self, request: UnmaskRequest, t: int) -> None:
        ids = tuple(sorted(request.survivors))
        if self._signed != ids:
            raise SecAggError("the unmasking request names other survivors than this client signed")
        message = survivors_message(self.params, ids)
        valid = set()
        for u, signature in request.signatures.items():
            advert = self._roster.get(u)
            if u in ids and advert is not None:
                name = self.verifier.identify(advert.identity, message, signature)
                if name is not None and name == self._names.get(u):
                    valid.add(u)
        if len(valid) < t:
            raise SecAggError(
                f"consistency check failed: {len(valid)} valid survivor signatures, {t} needed; "
                "refusing to unmask"
            )

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped:
            raise SecAggError("the server named a client both surviving and dropped; refusing to unmask")
        if self._unmasked:
            raise SecAggError("unmasking was already answered this round")
        holders = self._graph[self.client_id] | {self.client_id}
        t = threshold_for(len(holders), self.params.threshold)
        if len(survivors & holders) < t:
            raise SecAggError("fewer survivors than the threshold; refusing to unmask")
        if self.params.signatures:
            self._check_consistency(request, t)
        self._unmasked = True
        return UnmaskResponse(
            self.client_id,
            {o: s[0] for o, s in self._held.items() if o in survivors},
            {o: s[1] for o, s in self._held.items() if o in dropped},
        )
