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
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    return _certificate(ca_cert, ca_key, common_name, key.public_key(), days, server_names), key


def _certificate(ca_cert, ca_key, common_name: str, public_key, days: int, server_names=None):
    """The CA's signature on ``public_key`` for ``common_name``: a server certificate (its names
    as subject alternative names) when ``server_names`` are given, else a site's (client) one."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = datetime.datetime.now(datetime.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
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
    return builder.sign(ca_key, hashes.SHA256())


def provision(
    out: str | Path,
    sites: list[str],
    server_names: list[str],
    *,
    tokens: bool = True,
    days: int = 365,
    port: int = 50051,
) -> dict[str, Path]:
    """Write the CA, the server kit and one kit per site under ``out``; returns each kit's folder.
    With no ``sites``, the CA and the server kit alone: sites then join by ``request`` (at the
    site) and ``sign`` (here), and their keys never leave them."""
    import json

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ProvisionError(f"{out} exists and is not empty; provision into a new folder")
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
    settings = {"server_name": server_names[0], "port": port, "tokens": tokens}
    (kits["ca"] / FEDERATION).write_text(json.dumps(settings, indent=1) + "\n")
    issued = []
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
        issued.append(f"{cert.serial_number:x} {site} {cert.not_valid_after_utc.isoformat()}\n")
        (kit / "ca.pem").write_bytes(_cert_pem(ca_cert))
        (kit / f"{site}.pem").write_bytes(_cert_pem(cert))
        _write_private(kit / f"{site}.key", _key_pem(key))
        if token:
            _write_private(kit / "token", f"{site} {token}\n".encode())
        _write_script(kit / "start.sh", _client_command(site, server_names[0], port, bool(token)))
    _write_private(server / "tokens.txt", "".join(f"{line}\n" for line in lines).encode())
    (kits["ca"] / ISSUED).write_text("".join(issued))
    (server / REVOKED).write_text("")  # fedfm revoke appends; the server reads it at each call
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


# Distributed provisioning: a site makes its own key and a certificate signing request; the
# coordinator signs the request and returns the certificate, the CA certificate, the token and
# start.sh. The site's private key never leaves the site. Revocation lists certificate serials in
# the server kit's revoked.txt, which the server checks at every call (fedfm.deploy.auth).

FEDERATION = "federation.json"  # in OUT/ca: what sign needs to write a kit (server name, port, tokens)
ISSUED = "issued.txt"  # in OUT/ca: one "serial site not_after" line per certificate signed
REVOKED = "revoked.txt"  # in OUT/server: one "serial site revoked_at reason" line per revocation


def _check_site(site: str) -> None:
    if not SITE_NAME.match(site) or site in ("ca", "server"):
        raise ProvisionError(
            f"site names must be 1-63 letters, digits, '_', '.', '-' (and not 'ca' or 'server'): {site!r}"
        )


def request(site: str, out: str | Path) -> tuple[Path, Path]:
    """At the site: a new EC P-256 key (``SITE.key``, mode 0600; it stays here) and a certificate
    signing request for the site's name (``SITE.csr.pem``, the one file to send the coordinator)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    _check_site(site)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key_path, csr_path = out / f"{site}.key", out / f"{site}.csr.pem"
    if key_path.exists():
        raise ProvisionError(f"{key_path} exists: this site already has a key (request into a new folder)")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(_name(site)).sign(key, hashes.SHA256())
    _write_private(key_path, _key_pem(key))
    from cryptography.hazmat.primitives import serialization

    csr_path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return key_path, csr_path


def _federation(fed: Path) -> dict:
    import json

    path = fed / "ca" / FEDERATION
    if not (fed / "ca" / "ca.key").is_file() or not path.is_file():
        raise ProvisionError(
            f"{fed} is not a federation made by `fedfm provision` (no ca/ca.key or ca/{FEDERATION})"
        )
    return json.loads(path.read_text())


def sign(
    fed: str | Path, csr_path: str | Path, out: str | Path, *, days: int = 365, renew: bool = False
) -> Path:
    """At the coordinator: check the request (its signature; the name a valid site name, new
    unless ``renew``), sign it with the CA, and write the site's kit to ``out`` — the certificate,
    ca.pem, its token (a new site's line is added to the server's tokens.txt) and start.sh, but no
    key. ``renew``: a new certificate for a member (rotation; its token is kept). → ``out``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    fed, out = Path(fed), Path(out)
    settings = _federation(fed)
    try:
        csr = x509.load_pem_x509_csr(Path(csr_path).read_bytes())
    except ValueError as err:
        raise ProvisionError(f"{csr_path}: not a PEM certificate signing request ({err})") from None
    if not csr.is_signature_valid:
        raise ProvisionError(f"{csr_path}: the request's signature does not verify (altered in transit?)")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    site = str(names[0].value) if len(names) == 1 else ""
    _check_site(site)
    from fedfm.deploy.auth import read_tokens

    tokens_path = fed / "server" / "tokens.txt"
    listed = [line.split("#", 1)[0].strip() for line in tokens_path.read_text().splitlines()]
    members = dict(read_tokens(tokens_path)) if any(listed) else {}
    if site in members and not renew:
        raise ProvisionError(f"site {site!r} is already a member; `--renew` signs a new certificate for it")
    if renew and site not in members:
        raise ProvisionError(f"site {site!r} is not a member: sign without --renew to add it")
    ca_cert = x509.load_pem_x509_certificate((fed / "ca" / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((fed / "ca" / "ca.key").read_bytes(), password=None)
    cert = _certificate(ca_cert, ca_key, site, csr.public_key(), days)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{site}.pem").write_bytes(_cert_pem(cert))
    (out / "ca.pem").write_bytes(_cert_pem(ca_cert))
    token = members.get(site) if renew else (secrets.token_hex(32) if settings["tokens"] else None)
    if token:
        _write_private(out / "token", f"{site} {token}\n".encode())
    if site not in members:
        with tokens_path.open("a") as fh:
            fh.write(f"{site} {token}\n" if token else f"{site}\n")
    with (fed / "ca" / ISSUED).open("a") as fh:
        fh.write(f"{cert.serial_number:x} {site} {cert.not_valid_after_utc.isoformat()}\n")
    _write_script(
        out / "start.sh", _client_command(site, settings["server_name"], settings["port"], bool(token))
    )
    return out


def revoke(fed: str | Path, site: str, reason: str = "revoked by the coordinator") -> list[str]:
    """Revoke every certificate issued to ``site``: their serials go to the server kit's
    revoked.txt, which the server reads at each call, so the site is refused at its next call.
    → the serials revoked (hex)."""
    fed = Path(fed)
    _federation(fed)
    issued = fed / "ca" / ISSUED
    lines = issued.read_text().splitlines() if issued.is_file() else []
    serials = [s for s, name, *_ in (line.split() for line in lines if line.strip()) if name == site]
    if not serials:
        raise ProvisionError(f"no certificate of site {site!r} in {issued}")
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    clean = " ".join(reason.split())
    with (fed / "server" / REVOKED).open("a") as fh:
        fh.writelines(f"{s} {site} {now} {clean}\n" for s in serials)
    return serials
