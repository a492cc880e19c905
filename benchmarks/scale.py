"""The deployed server at 1 GiB per update: peak memory and wall time with 1, 4 and 8 senders.

A real gRPC server (``fedfm.deploy``: Coordinator, GrpcEngine, the SubmitUpdate/GetTask handlers,
plaintext on loopback) posts one round on a θ of ``--gib`` GiB (16 float32 tensors); each sender
is a separate light process that joins, downloads the task (counting the bytes, keeping none) and
streams a pre-written update file of the same size from disk, so the senders' memory stays small.
The server validates every update (names, shapes, finite values, L2 norm) and aggregates it:

- ``mean``: the streaming path: each update is spilled to ``spool/`` while it arrives and read one
  tensor at a time into the running float64 sum;
- ``median``: the spill path: every update stays spilled; the median reads one tensor name of
  every update at a time;
- ``old-mean``: the path before streaming, emulated on the same server: each update joined into
  one bytes object and unpacked into memory on arrival, and held until aggregation.

Each configuration runs in a fresh server process; its peak RSS is ``VmHWM`` at the end.
Upload and download throughput are the senders' own (bytes / seconds of the call).

    python benchmarks/scale.py [--gib 1] [--senders 1 4 8] [--out benchmarks/results/scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _stamp import stamp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
TENSORS = 16


def shapes(gib: float) -> dict[str, int]:
    per = int(gib * (1 << 30)) // 4 // TENSORS
    return {f"layer{i}.weight": per for i in range(TENSORS)}


def write_update(path: Path, gib: float) -> dict:
    """A random update of the θ's names and shapes as one safetensors file; its declared header."""
    import torch

    from fedfm.wire.stream import TensorStream

    torch.manual_seed(0)
    with open(path, "wb") as fh:
        stream = TensorStream({"p": {k: torch.randn(n) * 1e-3 for k, n in shapes(gib).items()}})
        for piece in stream.pieces():
            fh.write(piece)
        return stream.declared()


def server(args) -> None:
    """One round on a real gRPC server; prints the measurements as JSON."""
    import torch

    import fedfm.deploy.server as srv
    from fedfm.algorithms.aggregators import AGGREGATORS
    from fedfm.deploy.auth import Roster
    from fedfm.deploy.engine import Coordinator, GrpcEngine
    from fedfm.transforms.validation import update_problem
    from fedfm.types import RoundContext
    from fedfm.wire import unpack_tensors

    if args.rule == "old-mean":  # before streaming: join the message, unpack it, hold it in memory

        def in_memory(path):
            if path is None:
                return {}
            blob = Path(path).read_bytes()
            Path(path).unlink()
            return unpack_tensors(blob)

        srv.open_groups = in_memory
    theta = {k: torch.empty(n).fill_(0.01) for k, n in shapes(args.gib).items()}
    rss_theta = status_mb("VmRSS")
    roster = Roster.from_file(args.tokens, mutual_tls=False)
    coord = Coordinator(roster, "", [], "scale", spool_dir=args.spool)
    grpc_server, _ = srv.start_server(
        coord, f"127.0.0.1:{args.port}", srv.Security(insecure=True), lambda *a: None
    )
    jobs = [type("Job", (), {"rank": None})() for _ in range(args.senders)]
    engine = GrpcEngine(coord, jobs, 3600.0, args.senders, 600.0, note=lambda *a: None)
    print(json.dumps({"ready": True}), flush=True)
    engine.wait_for_clients(args.senders)
    start = time.perf_counter()
    results = engine.run_cohort(theta, list(range(args.senders)), RoundContext(round=1, seed=0))
    valid = (
        r for r in results if r.update is not None and update_problem(r.update, theta, max_norm=1e9) is None
    )
    rule = AGGREGATORS.get("median" if args.rule == "median" else "mean")
    pairs = ((r.update.delta, 1.0) for r in valid)
    aggregate = rule(list(pairs) if args.rule == "median" else pairs)
    wall = time.perf_counter() - start
    grpc_server.stop(grace=1.0)
    peak = status_mb("VmHWM")
    out = {
        "rule": args.rule,
        "senders": args.senders,
        "gib_per_update": args.gib,
        "round_wall_s": round(wall, 2),
        "server_peak_rss_mb": round(peak, 1),
        "server_rss_with_theta_mb": round(rss_theta, 1),
        "aggregate_tensors": len(aggregate),
        "spool_left": len(os.listdir(args.spool)),
    }
    print(json.dumps(out), flush=True)


def status_mb(field: str) -> float:
    """A /proc/self/status size in MB: VmRSS now, VmHWM the peak (of this process image only:
    ``ru_maxrss`` would carry the parent's size across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def sender(args) -> None:
    """Join, download the task (bytes counted, none kept), stream the update file; print JSON."""
    import grpc

    from fedfm.deploy import fedfm_pb2 as pb
    from fedfm.deploy import fedfm_pb2_grpc as rpc

    meta = (("authorization", f"Bearer {args.token}"),)
    options = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]
    stub = rpc.FedFMStub(grpc.insecure_channel(f"127.0.0.1:{args.port}", options=options))
    stub.Join(pb.JoinRequest(name="sender"), metadata=meta, timeout=60)
    while True:
        start, got, header = time.perf_counter(), 0, None
        for chunk in stub.GetTask(pb.TaskRequest(), metadata=meta, timeout=3600):
            header = header or json.loads(chunk.header)
            got += len(chunk.data)
        if header.get("status") == "train":
            break
        time.sleep(0.2)
    down_s = time.perf_counter() - start
    declared = json.loads(Path(args.declared).read_text())
    head = {"round": header["round"], "payload": "update", "num_examples": 1, "metrics": {}, **declared}

    def message():
        with open(args.file, "rb") as fh:
            first = True
            while piece := fh.read(1 << 20):
                yield pb.Chunk(header=json.dumps(head) if first else "", data=piece)
                first = False

    start = time.perf_counter()
    reply = stub.SubmitUpdate(message(), metadata=meta, timeout=3600)
    up_s = time.perf_counter() - start
    peak = status_mb("VmHWM")
    print(
        json.dumps(
            {
                "accepted": reply.accepted,
                "reason": reply.reason,
                "download_mb_s": round(got / 1e6 / down_s, 1),
                "upload_mb_s": round(declared["nbytes"] / 1e6 / up_s, 1),
                "sender_peak_rss_mb": round(peak, 1),
            }
        ),
        flush=True,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def configuration(rule: str, n: int, gib: float, update: Path, declared: Path, tmp: Path) -> dict:
    spool, port = tmp / f"spool-{rule}-{n}", free_port()
    spool.mkdir()
    tokens = tmp / f"tokens-{n}.txt"
    tokens.write_text("".join(f"site{k} tok{k}-xxxxxxxxxxxx\n" for k in range(n)))
    me = [sys.executable, __file__]
    common = ["--port", str(port), "--gib", str(gib)]
    srv = subprocess.Popen(
        [
            *me,
            "_server",
            *common,
            "--rule",
            rule,
            "--senders",
            str(n),
            "--tokens",
            str(tokens),
            "--spool",
            str(spool),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert json.loads(srv.stdout.readline()).get("ready")
    senders = [
        subprocess.Popen(
            [
                *me,
                "_sender",
                *common,
                "--token",
                f"tok{k}-xxxxxxxxxxxx",
                "--file",
                str(update),
                "--declared",
                str(declared),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for k in range(n)
    ]
    sent = [json.loads(s.communicate(timeout=3600)[0].strip().splitlines()[-1]) for s in senders]
    result = json.loads(srv.communicate(timeout=3600)[0].strip().splitlines()[-1])
    assert all(s["accepted"] for s in sent), sent
    mean = lambda key: round(sum(s[key] for s in sent) / len(sent), 1)  # noqa: E731
    result.update(
        download_mb_s_per_sender=mean("download_mb_s"),
        upload_mb_s_per_sender=mean("upload_mb_s"),
        sender_peak_rss_mb=max(s["sender_peak_rss_mb"] for s in sent),
    )
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("role", nargs="?", default="bench", choices=["bench", "_server", "_sender"])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--senders", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--old", type=int, nargs="+", default=[1, 4], help="sender counts for the old path")
    ap.add_argument("--rule", default="mean")
    ap.add_argument("--port", type=int)
    ap.add_argument("--tokens", "--token", dest="token")
    ap.add_argument("--spool")
    ap.add_argument("--file")
    ap.add_argument("--declared")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale.json")
    args = ap.parse_args()
    if args.role == "_server":
        args.senders, args.tokens = args.senders[0], args.token
        return server(args)
    if args.role == "_sender":
        return sender(args)
    import torch

    runs = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=os.environ.get("FEDFM_SCALE_TMP")) as tmp:
        tmp = Path(tmp)
        update, declared = tmp / "update.safetensors", tmp / "declared.json"
        declared.write_text(json.dumps(write_update(update, args.gib)))
        plan = [("mean", n) for n in args.senders] + [("median", n) for n in args.senders]
        plan += [("old-mean", n) for n in args.old]
        for rule, n in plan:
            runs.append(configuration(rule, n, args.gib, update, declared, tmp))
    by = {(r["rule"], r["senders"]): r for r in runs}
    lo, hi = min(args.senders), max(args.senders)
    config = {
        "gib_per_update": args.gib,
        "senders": args.senders,
        "old_path_senders": args.old,
        "tensors": TENSORS,
    }
    out = {
        **stamp("scale/server-path", config, [0], torch_threads=torch.get_num_threads()),
        "wall_s": round(time.perf_counter() - started, 1),
        "runs": runs,
        "ratio_peak_mean_max_vs_min_senders": round(
            by[("mean", hi)]["server_peak_rss_mb"] / by[("mean", lo)]["server_peak_rss_mb"], 3
        ),
    }
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
