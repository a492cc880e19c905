"""``fedfm provision``: a certificate authority, per-site certificates and tokens, a startup kit per site.

As NVFlare's provisioning does, one command writes everything a federation needs to start:

    OUT/ca/ca.pem, ca.key              the CA (keep ca.key offline; it signs every identity)
    OUT/server/                        server.pem + server.key (names: --server-name), ca.pem,
                                       tokens.txt (one 'site token' line per site, or the site
                                       name alone with --no-tokens), start.sh
    OUT/<site>/                        <site>.pem + <site>.key (certificate CN = the site name),
                                       ca.pem, token (this site's 'site token' line), start.sh

Identities: the server binds each site's token to its certificate (mutual TLS: a token presented
with another site's certificate is refused), or with ``--no-tokens`` the certificate alone is the
identity. The same certificate keys sign the secure-aggregation messages of rounds with
``secagg.signatures = true``. Keys are EC P-256, written with mode 0600; tokens are 32 random
bytes (hex) from the OS CSPRNG.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
import shlex
from pathlib import Path

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class ProvisionError(ValueError):
    """Provisioning cannot proceed (a bad site name, an existing folder); the message says why."""


def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(days: int, common_name: str = "fedfm federation CA"):
    """A self-signed CA certificate and its private key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue(ca_cert, ca_key, common_name: str, days: int, server_names: list[str] | None = None):
    """A certificate for ``common_name`` signed by the CA: a server certificate when
    ``server_names`` (DNS names or IP addresses) are given, else a client (site) certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server_names:
        alt = []
        for n in server_names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                alt.append(x509.DNSName(n))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def provision(
    out: str | Path,
    sites: list[str],
    server_names: list[str],
    *,
    tokens: bool = True,
    days: int = 365,
    port: int = 50051,
) -> dict[str, Path]:
    """Write the CA, the server kit and one kit per site under ``out``; returns each kit's folder."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ProvisionError(f"{out} exists and is not empty; provision into a new folder")
    if not sites:
        raise ProvisionError("give at least one --site")
    if not server_names:
        raise ProvisionError("give at least one --server-name (the host name or address clients dial)")
    bad = [s for s in sites if not SITE_NAME.match(s) or s in ("ca", "server")]
    if bad:
        raise ProvisionError(
            f"site names must be 1-63 letters, digits, '_', '.', '-' (and not 'ca' or 'server'): {bad}"
        )
    if len(set(sites)) != len(sites):
        raise ProvisionError("site names must be unique")
    ca_cert, ca_key = make_ca(days)
    kits = {"ca": out / "ca", "server": out / "server"}
    for folder in kits.values():
        folder.mkdir(parents=True)
    (kits["ca"] / "ca.pem").write_bytes(_cert_pem(ca_cert))
    _write_private(kits["ca"] / "ca.key", _key_pem(ca_key))
    cert, key = issue(ca_cert, ca_key, server_names[0], days, server_names)
    server = kits["server"]
    (server / "ca.pem").write_bytes(_cert_pem(ca_cert))
    (server / "server.pem").write_bytes(_cert_pem(cert))
    _write_private(server / "server.key", _key_pem(key))
    lines = []
    for site in sites:
        token = secrets.token_hex(32) if tokens else None
        lines.append(f"{site} {token}" if token else site)
        kit = kits[site] = out / site
        kit.mkdir()
        cert, key = issue(ca_cert, ca_key, site, days)
        (kit / "ca.pem").write_bytes(_cert_pem(ca_cert))
        (kit / f"{site}.pem").write_bytes(_cert_pem(cert))
        _write_private(kit / f"{site}.key", _key_pem(key))
        if token:
            _write_private(kit / "token", f"{site} {token}\n".encode())
        _write_script(kit / "start.sh", _client_command(site, server_names[0], port, bool(token)))
    _write_private(server / "tokens.txt", ("\n".join(lines) + "\n").encode())
    _write_script(server / "start.sh", _server_command(port))
    return kits


def _client_command(site: str, host: str, port: int, token: bool) -> str:
    here = '"$(dirname "$0")"'
    parts = [
        f"exec fedfm client --server {shlex.quote(f'{host}:{port}')}",
        f"--ca {here}/ca.pem --cert {here}/{site}.pem --key {here}/{site}.key",
    ]
    if token:
        parts.append(f"--token-file {here}/token")
    parts.append('--data "${1:?usage: start.sh DATA_FILE [fedfm client options]}" "${@:2}"')
    return " \\\n  ".join(parts)


def _server_command(port: int) -> str:
    here = '"$(dirname "$0")"'
    return " \\\n  ".join(
        [
            'exec fedfm server "${1:?usage: start.sh EXPERIMENT.toml [fedfm server options]}"',
            f"--address 0.0.0.0:{port} --tokens {here}/tokens.txt",
            f"--cert {here}/server.pem --key {here}/server.key --client-ca {here}/ca.pem",
            '"${@:2}"',
        ]
    )


def _write_script(path: Path, command: str) -> None:
    """The kit's ``start.sh``: ``exec`` (the script's process becomes fedfm's, so stopping the
    script stops fedfm) and every argument after the first passed through (``--retry``,
    ``--give-up``, ``--output``, ``--round-timeout``, ``--dashboard`` …)."""
    head = "# written by fedfm provision; arguments after the first go to fedfm as they are"
    path.write_text(f"#!/usr/bin/env bash\n{head}\nset -euo pipefail\n{command}\n")
    path.chmod(0o755)
