"""Who a caller is: the client identity the transport authenticated, never one a payload claims.

Identities come from the tokens file, one client per line in file order (client ids from 0):

    hospital-a  3f9c…      a token, bound to the site's certificate under mutual TLS
    hospital-b             no token: the certificate alone identifies the site (mutual TLS only)

Tokens are compared in constant time (``hmac.compare_digest`` on SHA-256 digests), never echoed
in an error or a log line, and can reach a client from a file or an environment variable
instead of its command line. Under mutual TLS the certificate's common name must be the site's
name, so a token presented with another site's certificate is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CONNECTED_S = 15.0  # a client heard from this recently counts as connected: three missed heartbeats
MAX_CALLS_PER_CLIENT = 4  # concurrent RPCs one identity may hold open


class DeployError(ValueError):
    """A deployment that cannot start (certificates, tokens, config); the message says why."""


def read_tokens(path: str | Path) -> list[tuple[str, str | None]]:
    """``name token`` or ``name`` per line (``#`` comments); client ids are the line order, from 0."""
    pairs: list[tuple[str, str | None]] = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) > 2:
            raise DeployError(f"{path}:{n}: expected 'name token' or 'name' ({len(parts)} fields)")
        pairs.append((parts[0], parts[1] if len(parts) == 2 else None))
    if not pairs:
        raise DeployError(f"{path}: no clients")
    tokens = [t for _, t in pairs if t is not None]
    if len(set(tokens)) != len(tokens) or len({n for n, _ in pairs}) != len(pairs):
        raise DeployError(f"{path}: client names and tokens must be unique")
    return pairs


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass
class Member:
    client_id: int
    name: str
    token_digest: bytes | None = None  # None: identified by its certificate alone
    last_seen: float = 0.0
    calls: int = 0

    def connected(self, now: float) -> bool:
        return now - self.last_seen < CONNECTED_S


def bearer(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :]
    return None


def certificate_name(context) -> str | None:
    """The common name of the client certificate the TLS handshake verified (mutual TLS), or None."""
    try:
        names = context.auth_context().get("x509_common_name") or []
    except Exception:
        return None
    return names[0].decode(errors="replace") if names else None


@dataclass
class Roster:
    """The federation's members, looked up by token digest or by certificate name."""

    members: list[Member]
    mutual_tls: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_file(cls, path: str | Path, mutual_tls: bool) -> Roster:
        pairs = read_tokens(path)
        if not mutual_tls and any(t is None for _, t in pairs):
            raise DeployError(f"{path}: sites without a token need mutual TLS (--client-ca) to be identified")
        members = [Member(k, name, digest(t) if t else None) for k, (name, t) in enumerate(pairs)]
        return cls(members, mutual_tls)

    def identify(self, context) -> tuple[Member | None, str]:
        """(member, "") for an authenticated caller, else (None, why) — the reason never holds the token."""
        token = bearer(context.invocation_metadata())
        cert = certificate_name(context) if self.mutual_tls else None
        if token is not None:
            presented = digest(token)
            found = None
            for m in self.members:  # every digest compared, in constant time each
                if m.token_digest is not None and hmac.compare_digest(m.token_digest, presented):
                    found = m
            if found is None:
                return None, "unknown or missing client token"
            if self.mutual_tls and cert != found.name:
                return None, "the client certificate does not belong to this token's client"
            return found, ""
        if self.mutual_tls and cert is not None:
            for m in self.members:
                if m.token_digest is None and m.name == cert:
                    return m, ""
        return None, "unknown or missing client token"

    def enter(self, member: Member) -> bool:
        """Count one more open call of ``member``; False when it already holds too many."""
        with self.lock:
            if member.calls >= MAX_CALLS_PER_CLIENT:
                return False
            member.calls += 1
            member.last_seen = time.monotonic()
            return True

    def leave(self, member: Member) -> None:
        with self.lock:
            member.calls = max(0, member.calls - 1)
            member.last_seen = time.monotonic()

    def connected(self) -> list[int]:
        now = time.monotonic()
        return sorted(m.client_id for m in self.members if m.connected(now) or m.calls)
