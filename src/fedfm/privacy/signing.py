"""Long-term identities for secure aggregation against an active server (Bonawitz et al. 2017).

A client signs its round keys when it advertises them and signs the list of survivors in the
consistency check; other clients verify both. Two ways to hold an identity:

* **certificates** (deployments): the client's mutual-TLS certificate and key from
  ``fedfm provision``; a signature verifies if its certificate was issued by the federation's CA
  and is valid now, and the identity is the certificate's common name (the site name);
* **raw Ed25519 keys** (simulation): each simulated client holds a key pair; the verifier knows
  the public keys, as clients would from provisioning.

A server that does not hold the CA key cannot make up clients; one that does (an operator who
also provisions) can add Sybil clients — the threat model in docs/privacy.md says so.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID


@dataclass
class KeySigner:
    """An Ed25519 key pair; its identity is the raw public key."""

    key: ed25519.Ed25519PrivateKey = field(default_factory=ed25519.Ed25519PrivateKey.generate)

    @property
    def identity(self) -> bytes:
        return self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message)


@dataclass(frozen=True)
class KeyVerifier:
    """Known Ed25519 public keys → names; what a simulated client was provisioned with."""

    names: dict[bytes, str]

    def identify(self, identity: bytes, message: bytes, signature: bytes) -> str | None:
        name = self.names.get(identity)
        if name is None:
            return None
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(identity).verify(signature, message)
        except (InvalidSignature, ValueError):
            return None
        return name


class CertificateSigner:
    """A site's certificate and private key (PEM); its identity is the certificate."""

    def __init__(self, cert_pem: bytes, key_pem: bytes) -> None:
        self.identity = cert_pem
        self.key = serialization.load_pem_private_key(key_pem, password=None)

    def sign(self, message: bytes) -> bytes:
        if isinstance(self.key, ec.EllipticCurvePrivateKey):
            return self.key.sign(message, ec.ECDSA(hashes.SHA256()))
        if isinstance(self.key, ed25519.Ed25519PrivateKey):
            return self.key.sign(message)
        raise ValueError("secure aggregation signatures need an EC or Ed25519 client key")


class CertificateVerifier:
    """Accepts signatures by certificates the federation's CA issued; the identity is the CN."""

    def __init__(self, ca_pem: bytes) -> None:
        self.ca = x509.load_pem_x509_certificate(ca_pem)

    def identify(self, identity: bytes, message: bytes, signature: bytes) -> str | None:
        try:
            cert = x509.load_pem_x509_certificate(identity)
            cert.verify_directly_issued_by(self.ca)
            now = datetime.datetime.now(datetime.UTC)
            if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                return None
            key = cert.public_key()
            if isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
            elif isinstance(key, ed25519.Ed25519PublicKey):
                key.verify(signature, message)
            else:
                return None
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            return str(names[0].value) if names else None
        except (InvalidSignature, ValueError, TypeError):
            return None
