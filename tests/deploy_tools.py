"""Helpers for the deployment tests: certificates, free ports, server and client processes."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path


def make_certificates(folder: Path, sites: int = 4) -> dict[str, Path]:
    """A CA, a server certificate for localhost / 127.0.0.1 and one certificate per site (CN
    ``site{k}``), made by ``fedfm provision``. ``client`` / ``client_key`` are site0's."""
    from fedfm.deploy.provision import provision

    names = [f"site{k}" for k in range(sites)]
    kits = provision(folder / "kits", names, ["localhost", "127.0.0.1"], tokens=False)
    paths = {
        "ca": kits["server"] / "ca.pem",
        "server": kits["server"] / "server.pem",
        "server_key": kits["server"] / "server.key",
    }
    for k in range(sites):
        paths[f"site{k}"] = kits[f"site{k}"] / f"site{k}.pem"
        paths[f"site{k}_key"] = kits[f"site{k}"] / f"site{k}.key"
    paths["client"], paths["client_key"] = paths["site0"], paths["site0_key"]
    return paths


def site_of(token: str) -> int:
    """The site a test token belongs to (``token-{k}-…``); anything else: site 0."""
    parts = token.split("-")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "token" and parts[1].isdigit() else 0


def server_args(path, port, tokens, certs, out, *extra) -> list:
    """``fedfm server`` over mutual TLS with the test certificates, quiet, into ``out``."""
    args = ["server", path, "--address", f"127.0.0.1:{port}", "--tokens", tokens, "--output", out, "--quiet"]
    return [
        *args,
        "--cert",
        certs["server"],
        "--key",
        certs["server_key"],
        "--client-ca",
        certs["ca"],
        *extra,
    ]


def client_args(port, token, certs, *extra, site: int | None = None) -> list:
    """``fedfm client`` with the certificate of its own site (``site``, or the token's)."""
    k = site_of(token or "") if site is None else site
    args = ["client", "--server", f"localhost:{port}", "--data", "config", "--retry", "0.5"]
    args += ["--ca", certs["ca"], "--cert", certs[f"site{k}"], "--key", certs[f"site{k}_key"]]
    return [*args, *(["--token", token] if token else []), *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tokens(path: Path, n: int) -> list[str]:
    tokens = [f"token-{k}-{'x' * 8}" for k in range(n)]
    path.write_text("".join(f"site{k} {t}\n" for k, t in enumerate(tokens)))
    return tokens


FEDFM = [sys.executable, "-m", "fedfm.cli"]


def start(args: list[str], log: Path) -> subprocess.Popen:
    fh = log.open("w")
    return subprocess.Popen([*FEDFM, *map(str, args)], stdout=fh, stderr=subprocess.STDOUT)


def run_federation(path: Path, folder: Path, certs: dict, tokens: list[str], out: Path, port: int) -> None:
    """A server for config ``path`` and one client per token on ``port``, run to the end;
    asserts both exit cleanly (the server's log in the message)."""
    server = start(server_args(path, port, folder / "tokens.txt", certs, out), folder / "server.log")
    clients = [start(client_args(port, t, certs), folder / f"c{k}.log") for k, t in enumerate(tokens)]
    assert server.wait(timeout=240) == 0, (folder / "server.log").read_text()
    for c in clients:
        assert c.wait(timeout=60) == 0


def wait_for_file_text(path: Path, text: str, timeout: float = 120.0) -> None:
    stop = time.monotonic() + timeout
    while time.monotonic() < stop:
        if path.is_file() and text in path.read_text():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{text!r} did not appear in {path} within {timeout} s")
