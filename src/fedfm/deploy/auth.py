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


class Revocations:
    """The serials of revoked certificates (``revoked.txt``: ``serial site revoked_at reason`` per
    line, written by ``fedfm provision revoke``), read again whenever the file changes, so a
    revocation applies at the site's next call without restarting the server. grpcio's Python TLS
    takes no revocation list, so the check is here, on the peer certificate of every call."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.seen: tuple | None = None
        self.entries: dict[int, str] = {}
        self.lock = threading.Lock()

    def reason(self, serial: int) -> str | None:
        with self.lock:
            try:
                stat = self.path.stat()
                seen = (stat.st_mtime_ns, stat.st_size)
            except FileNotFoundError:
                seen = None
            if seen != self.seen:
                self.seen, self.entries = seen, self._read() if seen else {}
            return self.entries.get(serial)

    def _read(self) -> dict[int, str]:
        entries = {}
        for line in self.path.read_text().splitlines():
            parts = line.split(maxsplit=3)
            if len(parts) >= 3:
                try:
                    serial = int(parts[0], 16)
                except ValueError:
                    continue
                why = parts[3] if len(parts) > 3 else "revoked"
                entries[serial] = f"revoked on {parts[2]}: {why}"
        return entries


EXPIRY_WARNING_DAYS = 30


def expiring(cert_pem: bytes, days: int = EXPIRY_WARNING_DAYS) -> str | None:
    """A warning when the certificate expires within ``days`` (or has expired), else None."""
    import datetime

    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_pem)
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    if left > datetime.timedelta(days=days):
        return None
    name = cert.subject.rfc4514_string()
    when = cert.not_valid_after_utc.date().isoformat()
    if left.total_seconds() <= 0:
        return f"the certificate of {name} expired on {when}"
    return f"the certificate of {name} expires on {when} (in {left.days} days): renew it (docs/deployment.md)"


def certificate_warnings(paths) -> list[str]:
    """A warning for each PEM certificate file that expires within 30 days (or has expired)."""
    said = (expiring(Path(p).read_bytes()) for p in paths if Path(p).is_file())
    return [w for w in said if w]


def peer_pem(context) -> bytes | None:
    """The client certificate the TLS handshake verified (PEM), or None."""
    pems = context.auth_context().get("x509_pem_cert") or []
    return pems[0] if pems else None


def peer_serial(context) -> int | None:
    """The serial number of the client certificate the TLS handshake verified, or None."""
    from cryptography import x509

    pem = peer_pem(context)
    return None if pem is None else x509.load_pem_x509_certificate(pem).serial_number


@dataclass
class Roster:
    """The federation's members, looked up by token digest or by certificate name; a revoked
    certificate is refused whatever token comes with it."""

    members: list[Member]
    mutual_tls: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    revocations: Revocations | None = None

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
        if self.mutual_tls and self.revocations is not None:
            serial = peer_serial(context)
            why = None if serial is None else self.revocations.reason(serial)
            if why is not None:
                return None, f"the certificate of site {cert!r} (serial {serial:x}) was {why}"
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
