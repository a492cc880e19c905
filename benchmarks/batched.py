"""The batched engine against the in-process engine and centralized training, same workload.

Workloads (real models and data):
- ``minilm``: the default experiment (MiniLM + LoRA + head on BBC News), a cohort of ``--clients``
  clients holding ``--per-client`` examples each, batch 16, one local epoch (AdamW).
- ``smollm2``: SmolLM2-135M-Instruct + LoRA instruction tuning on the chatterbot corpus, a cohort of
  ``--clients`` clients of ``--llm-per-client`` examples, batch 4, max length 64.

Modes, alternated in one process (the model is loaded once; machine noise hits every mode):
``central`` trains the same examples in one loop with one optimizer, one client's batch at a time
(the same per-client batch size and step count); ``inprocess`` runs the cohort one client at a
time; ``batched-k`` runs it in groups of k. Only the training phase is timed (no evaluation,
aggregation or checkpoint). Peak memory comes from running each mode once in a fresh process: on a
GPU ``torch.cuda.max_memory_allocated``, on the CPU the process's peak RSS (model and data
included). ``--flat`` checks that the batched engine's peak does not grow with the number of
clients (the same 800 examples among 25, 100, 400 clients, groups of 10).

    python benchmarks/batched.py [--workloads minilm smollm2] [--repeats 2] [--device cpu]
        [--out benchmarks/results/batched.json]
    python benchmarks/batched.py --simulation 1000 --device cuda   # 1,000 clients, 100 per round

``--simulation N`` instead runs the default experiment with N clients, 100 per round, on the
batched engine end to end (``fedfm.run``), and reports its wall time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _overrides(
    workload: str, clients: int, per_client: int, device: str, threads: int, batch: int
) -> list[str]:
    common = [
        f"training.batch_size={batch}",
        f"partition.num_clients={clients}",
        "partition.method=iid",
        "sampling.fraction=1.0",
        "training.local_epochs=1",
        "eval.at_start=false",
        f"run.device={device}",
        f"run.threads={threads}",
    ]
    if workload == "minilm":
        return [*common, f"data.max_examples={clients * per_client}", "data.max_test_examples=10"]
    return [
        *common,
        "task.kind=instruction",
        "model.name=smollm2-135m",
        "model.max_length=64",
        "data.name=chatterbot",
        "data.test_fraction=0.1",
        f"data.max_examples={clients * per_client}",
        "training.lr=2e-3",
        "peft.r=8",
        "peft.alpha=16",
    ]


def _central(run, cfg):
    """The cohort's examples in one loop: each client's batches in turn, one model and optimizer."""
    from fedfm.client.program import batch_order, make_optimizer, num_local_steps

    bundle, task, t = run.bundle, run.task, cfg.training

    def central() -> None:
        from fedfm.models.state import set_trainable_state

        set_trainable_state(bundle.trainable, run.state.params)
        optimizer = make_optimizer(list(bundle.trainable.values()), t)
        bundle.model.train()
        gen = torch.Generator().manual_seed(0)
        for rows in run.data.client_train:
            rows = torch.as_tensor(rows)
            for pos in batch_order(len(rows), t.batch_size, num_local_steps(len(rows), t), gen):
                loss = task.loss(bundle.model, task.batch(task.train, rows[pos], bundle.device))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(bundle.trainable.values(), t.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    return central


def _engine_fn(run, cfg, name: str, k: int | None):
    from fedfm.client.program import ClientProgram
    from fedfm.engines import ENGINES, EngineSetup
    from fedfm.types import RoundContext

    group = cfg.batched.model_copy(update={"clients_per_group": k}) if k else cfg.batched
    setup = EngineSetup(run.bundle, run.task, run.jobs, ClientProgram.from_config(cfg), None, None, group)
    engine = ENGINES.get(name)(setup)
    cohort = list(range(len(run.jobs)))

    def train() -> None:  # results are looked at and dropped, as the round's streaming mean does
        failed = [
            r.failure for r in engine.run_cohort(run.state.params, cohort, RoundContext(1, 0)) if r.failure
        ]
        assert not failed, failed[:2]

    return train


def measure(workload, clients, per_client, batch, ks, repeats, device, threads):
    from fedfm.client.program import num_local_steps
    from fedfm.config import make_config
    from fedfm.server.driver import Run

    cfg = make_config({}, _overrides(workload, clients, per_client, device, threads, batch))
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(cfg, Path(tmp), progress=False)
        examples = sum(len(r) for r in run.data.client_train)
        steps = sum(num_local_steps(len(r), cfg.training) for r in run.data.client_train)
        modes = {"central": _central(run, cfg), "inprocess": _engine_fn(run, cfg, "inprocess", None)}
        modes.update({f"batched-{k}": _engine_fn(run, cfg, "batched", k) for k in ks if k <= clients})
        walls = {m: [] for m in modes}
        next(iter(modes.values()))()  # warm-up: first-call allocations and kernel choices
        for _ in range(repeats):
            for name, fn in modes.items():
                start = time.perf_counter()
                fn()
                if run.bundle.device.type == "cuda":
                    torch.cuda.synchronize()
                walls[name].append(time.perf_counter() - start)
                print(f"  {workload} batch {batch} {name}: {walls[name][-1]:.2f} s", flush=True)
        central = statistics.median(walls["central"])
        inproc = statistics.median(walls["inprocess"])
        rows = []
        for name in modes:
            wall = statistics.median(walls[name])
            rows.append({
                "mode": name,
                "wall_s": walls[name],
                "examples_per_s": examples / wall,
                "ratio_to_central": wall / central,
                "speedup_vs_inprocess": inproc / wall,
                "peak_mb": spawn_peak(workload, clients, per_client, batch, name, device, threads),
            })  # fmt: skip
    return {"workload": workload, "clients": clients, "examples": examples, "batch_size": batch,
            "steps": steps, "modes": rows}  # fmt: skip


def peak(workload, clients, per_client, batch, mode, device, threads) -> dict:
    """One mode once in this (fresh) process: its peak memory — CUDA's allocator peak on a GPU,
    else the process's peak RSS (model and data included)."""
    from fedfm.config import make_config
    from fedfm.server.driver import Run

    cfg = make_config({}, _overrides(workload, clients, per_client, device, threads, batch))
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(cfg, Path(tmp), progress=False)
        if run.bundle.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if mode == "central":
            _central(run, cfg)()
        else:
            name, _, k = mode.partition("-")
            _engine_fn(run, cfg, name, int(k) if k else None)()
    if run.bundle.device.type == "cuda":
        return {"peak_mb": torch.cuda.max_memory_allocated() / 2**20}
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec
    status = Path("/proc/self/status").read_text().splitlines()
    return {"peak_mb": next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024}


def spawn_peak(*args) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--peak", *map(str, args)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def flat_peaks(args) -> list[dict]:
    """The same 800 examples among ``args.flat`` clients, trained in groups of 10 (batch 4)."""
    flat = [
        {
            "clients": n,
            "peak_mb": spawn_peak("minilm", n, 800 // n, 4, "batched-10", args.device, args.threads),
        }
        for n in args.flat
    ]
    for f in flat:
        print(f"batched-10, {f['clients']} clients: peak {f['peak_mb']:.0f} MiB", flush=True)
    return flat


def simulation(num_clients: int, device: str, threads: int) -> dict:
    import fedfm

    overrides = [
        f"partition.num_clients={num_clients}",
        "sampling.clients_per_round=100",
        "run.engine=batched",
        f"run.device={device}",
        f"run.threads={threads}",
    ]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = fedfm.run(None, output=Path(tmp) / "r", overrides=overrides, progress=False)
    wall = time.perf_counter() - start
    last = result.history[-1]
    return {"clients": num_clients, "per_round": 100, "rounds": len(result.history), "wall_s": wall,
            "test_accuracy": last.get("test_accuracy")}  # fmt: skip


def markdown(results: list[dict]) -> str:
    lines = [
        "| workload | mode | examples/s | wall ÷ centralized | speed-up vs in-process | peak (MiB) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for w in results:
        for r in w["modes"]:
            lines.append(
                f"| {w['workload']} ({w['clients']} clients × {w['examples'] // w['clients']} ex., batch "
                f"{w['batch_size']}) | {r['mode']} | "
                f"{r['examples_per_s']:.1f} | {r['ratio_to_central']:.2f} | "
                f"{r['speedup_vs_inprocess']:.2f} | {r['peak_mb']:.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workloads", nargs="+", default=["minilm", "smollm2"])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--per-client", type=int, default=32)
    parser.add_argument("--llm-per-client", type=int, default=4)
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[16, 4], help="per-client batch (MiniLM)"
    )
    parser.add_argument("--llm-batch-size", type=int, default=4)
    parser.add_argument("--ks", type=int, nargs="+", default=[5, 10, 25, 50])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--simulation", type=int, default=0)
    parser.add_argument(
        "--flat",
        type=int,
        nargs="*",
        default=[25, 100, 400],
        help="peak memory of batched-10 with this many clients (4 ex. each, batch 4)",
    )
    parser.add_argument("--peak", nargs=7, help=argparse.SUPPRESS)
    parser.add_argument("--repeak", action="store_true", help="measure only the peaks again, into --out")
    parser.add_argument("--flat-only", action="store_true", help="with --repeak: only the --flat peaks")
    parser.add_argument("--out", default="benchmarks/results/batched.json")
    args = parser.parse_args()
    if args.peak:
        w, c, p, b, mode, dev, t = args.peak
        print(json.dumps(peak(w, int(c), int(p), int(b), mode, dev, int(t))))
        return
    machine = {
        "python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
        "platform": platform.platform(), "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
    }  # fmt: skip
    if args.repeak:
        out = json.loads(Path(args.out).read_text())
        for w in [] if args.flat_only else out["results"]:
            for r in w["modes"]:
                args_ = (w["workload"], w["clients"], w["examples"] // w["clients"], w["batch_size"])
                r["peak_mb"] = spawn_peak(*args_, r["mode"], args.device, args.threads)
                print(
                    f"  {w['workload']} batch {w['batch_size']} {r['mode']}: {r['peak_mb']:.0f} MiB",
                    flush=True,
                )
        out["flat"] = flat_peaks(args)
        print(markdown(out["results"]))
    elif args.simulation:
        out = {"machine": machine, "simulation": simulation(args.simulation, args.device, args.threads)}
        print(json.dumps(out["simulation"]))
    else:
        results = []
        for w in args.workloads:
            per = args.per_client if w == "minilm" else args.llm_per_client
            for batch in args.batch_sizes if w == "minilm" else [args.llm_batch_size]:
                results.append(
                    measure(w, args.clients, per, batch, args.ks, args.repeats, args.device, args.threads)
                )
        flat = flat_peaks(args)
        out = {"machine": machine, "method": __doc__.split("\n\n")[2], "results": results, "flat": flat}
        print(markdown(results))

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
