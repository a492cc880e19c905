"""Distributed provisioning with real processes: each site makes its own key and a signing
request, the coordinator signs it, a federation runs on the kits, and a revoked site is refused
at its next call with the reason while the round goes on without it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from tests.deploy_tools import client_data, free_port, wait_for_file_text
from tests.test_checkpoint import cli
from tests.test_deploy_attacks import experiment, kit_env

pytest.importorskip("grpc")


def kit(path: Path, log: Path, *args) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", str(path), *map(str, args)], env=kit_env(), stdout=log.open("w"), stderr=subprocess.STDOUT
    )


def test_sites_keep_their_keys_and_a_revoked_site_is_refused_at_its_next_call(tmp_path, tiny_config):
    from cryptography import x509

    port, fed = free_port(), tmp_path / "fed"
    assert cli("provision", fed, "--server-name", "localhost", "--port", port).returncode == 0
    sites = {name: tmp_path / f"at-{name}" for name in ("hosp-a", "hosp-b")}
    for name, folder in sites.items():
        done = cli("request", name, folder)
        assert done.returncode == 0 and "never send it" in done.stdout
        assert oct((folder / f"{name}.key").stat().st_mode & 0o777) == "0o600"
        assert cli("sign", fed, folder / f"{name}.csr.pem", "--out", folder).returncode == 0
    # private keys never left the sites: the coordinator holds only the CA's and the server's
    keys = sorted(str(p.relative_to(fed)) for p in fed.rglob("*.key"))
    assert keys == ["ca/ca.key", "server/server.key"]
    ca = x509.load_pem_x509_certificate((fed / "ca" / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((sites["hosp-a"] / "hosp-a.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.rfc4514_string() == "CN=hosp-a"
    assert [line.split()[0] for line in (fed / "server" / "tokens.txt").read_text().splitlines()] == [
        "hosp-a",
        "hosp-b",
    ]
    again = cli("sign", fed, sites["hosp-a"] / "hosp-a.csr.pem", "--out", tmp_path / "x")
    assert again.returncode == 2 and "already a member" in again.stderr and "--renew" in again.stderr
    lines = (sites["hosp-a"] / "hosp-a.csr.pem").read_text().splitlines()  # altered in transit
    lines[3] = lines[3][:-4] + ("AAAA" if not lines[3].endswith("AAAA") else "BBBB")
    (tmp_path / "bad.csr.pem").write_text("\n".join(lines) + "\n")
    bad = cli("sign", fed, tmp_path / "bad.csr.pem", "--out", tmp_path / "y")
    assert bad.returncode == 2 and ("does not verify" in bad.stderr or "not a PEM" in bad.stderr)

    path = experiment(tmp_path, tiny_config, 2, run={"rounds": 3, "threads": 1}, sampling={"min_clients": 1})
    out = tmp_path / "run"
    server = kit(fed / "server" / "start.sh", tmp_path / "server.log", path, "--output", out,
                 "--round-timeout", "15", "--quiet")  # fmt: skip
    data = client_data(path)
    logs = {n: tmp_path / f"{n}.log" for n in sites}
    clients = {
        n: kit(folder / "start.sh", logs[n], data, "--retry", "0.5", "--give-up", "120", "--delay", "1.0")
        for n, folder in sites.items()
    }
    try:
        wait_for_file_text(out / "metrics.jsonl", '"round": 1,', timeout=180)
        done = cli("revoke", fed, "hosp-b", "--reason", "left the consortium")
        assert done.returncode == 0 and "revoked 1 certificate(s) of hosp-b" in done.stdout
        assert clients["hosp-b"].wait(timeout=120) != 0
        said = logs["hosp-b"].read_text()
        assert "the server refused this client" in said and "was revoked on" in said
        assert "left the consortium" in said
        assert server.wait(timeout=240) == 0, (tmp_path / "server.log").read_text()
        assert clients["hosp-a"].wait(timeout=60) == 0
    finally:
        for p in (server, *clients.values()):
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
                p.wait(timeout=30)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r.get("event") == "round"][-1]
    assert last["round"] == 3 and last["num_clients"] == 1  # the round went on without hosp-b
    assert any(f.get("name") == "hosp-b" for r in rows for f in r.get("failed", []))


def test_certificates_near_expiry_are_warned_about(tmp_path):
    from fedfm.deploy.auth import expiring
    from fedfm.deploy.provision import _cert_pem, issue, make_ca

    ca, ca_key = make_ca(365)
    soon, _ = issue(ca, ca_key, "hosp-a", 10)
    later, _ = issue(ca, ca_key, "hosp-b", 300)
    assert "CN=hosp-a expires on" in expiring(_cert_pem(soon)) and "renew it" in expiring(_cert_pem(soon))
    assert expiring(_cert_pem(later)) is None
