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


def client_data(experiment: Path) -> str:
    """``--data`` for a demo client of the experiment file: the run's own dataset, with the path
    of the file it names (the server sends no paths): ``config:FILE``, or ``config``."""
    import tomllib

    path = tomllib.loads(Path(experiment).read_text()).get("data", {}).get("path")
    return f"config:{path}" if path else "config"


def client_args(port, token, certs, *extra, site: int | None = None, data: str = "config") -> list:
    """``fedfm client`` with the certificate of its own site (``site``, or the token's); ``data``:
    its ``--data`` (``client_data(experiment)`` for a demo client)."""
    k = site_of(token or "") if site is None else site
    args = ["client", "--server", f"localhost:{port}", "--data", data, "--retry", "0.5"]
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
    data = client_data(path)
    clients = [
        start(client_args(port, t, certs, data=data), folder / f"c{k}.log") for k, t in enumerate(tokens)
    ]
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


class Hostile:
    """A site in the test process that speaks the protocol with the real client code (training,
    packing, masking, the secure-aggregation steps) and sends what a test tells it to instead.

    ``tasks()`` yields each task (header, blob) the server hands it until the run is done;
    ``honest_step`` / ``honest_update`` are what the real client would answer; ``send`` sends
    anything. ``thetas[round]`` is the global state each training task carried."""

    def __init__(self, port: int, certs: dict, site: int, token: str | None, data: str) -> None:
        import json
        import tomllib

        from fedfm.config import make_config
        from fedfm.deploy import fedfm_pb2 as pb
        from fedfm.deploy.client import ClientSecurity, Trainer, local_data
        from fedfm.deploy.fedfm_pb2_grpc import FedFMStub
        from fedfm.deploy.secure import ClientSecure

        me = ClientSecurity(str(certs["ca"]), str(certs[f"site{site}"]), str(certs[f"site{site}_key"]))
        self.pb, self.stub = pb, FedFMStub(me.channel(f"localhost:{port}"))
        self.meta = (("authorization", f"Bearer {token}"),) if token else ()
        self.joined = self.stub.Join(pb.JoinRequest(), metadata=self.meta, wait_for_ready=True, timeout=120)
        self.client_id = self.joined.client_id
        self.cfg = make_config(tomllib.loads(self.joined.config_toml))
        self.trainer = Trainer(
            self.cfg, local_data(self.cfg, data, json.loads(self.joined.label_names)), True
        )
        self.secure = ClientSecure(self.client_id, *me.identity())
        self.thetas: dict = {}

    def tasks(self):
        from fedfm.wire import join, unpack_tensors

        while True:
            replies = self.stub.GetTask(self.pb.TaskRequest(), metadata=self.meta, timeout=60)
            header, blob = join((c.header, c.data) for c in replies)
            if header["status"] == "done":
                return
            if header["status"] == "train":
                self.thetas[header["round"]] = unpack_tensors(blob)["p"]
            if header["status"] in ("train", "secagg"):
                yield header, blob

    def honest_step(self, header: dict) -> dict:
        answer = self.secure.answer(header["round"], header["step"], header["message"])
        return {"round": header["round"], "step": header["step"], "reply": answer}

    def honest_update(self, header: dict, blob: bytes) -> tuple[dict, bytes]:
        from fedfm.wire import payload_message, unpack_tensors

        rnd = header["round"]
        masker = self.secure.for_round(rnd) if header.get("secure") else None
        rows = self.trainer.data.client_train[self.client_id]
        update, _ = self.trainer.train(self.client_id, rows, header, unpack_tensors(blob), {}, masker)
        return payload_message(rnd, update)

    def send(self, header: dict, payload: bytes = b""):
        import json

        from fedfm.wire import chunks, declared

        pieces = list(chunks({}, payload))  # a hostile site declares what it sends, to be read at all
        first = [self.pb.Chunk(header=json.dumps({**header, **declared(payload)}), data=pieces[0][1])]
        message = first + [self.pb.Chunk(data=d) for _, d in pieces[1:]]
        return self.stub.SubmitUpdate(iter(message), metadata=self.meta, timeout=60)
