"""fedfm on a CUDA GPU: does the same experiment run there, and how fast is local training.

``classify``: (a) the default BBC News experiment end to end on ``--device`` (accuracy, wall time,
peak GPU memory); (b) local-training throughput of one client (examples/s) for MiniLM at 128
tokens, fp32 against bf16 autocast, the two alternated in one process.

``llm``: a causal LM of SmolLM2-135M's shape (randomly initialised, saved to a folder, so no
download is needed) fine-tuned with LoRA on generated conversations: tokens/s and peak GPU memory
for fp32, bf16 autocast and QLoRA (4-bit NF4 base through bitsandbytes). Throughput does not
depend on the weights' values. Usage:

    python benchmarks/gpu.py classify --model minilm --out benchmarks/results/gpu-classify.json
    python benchmarks/gpu.py llm --tokenizer DIR --out benchmarks/results/gpu-llm.json

``all``: one command for a lent GPU, each part in its own process with its own time limit, so
that one failing part loses nothing else (``--dry-run`` prints the plan): the batched engine at
50 clients against the in-process engine (``benchmarks/batched.py --device cuda``), a 1,000-client
default simulation (``--simulation 1000``), a QLoRA round of the 1.17B decoder
(``benchmarks/llama1b.py --quantization 4bit --device cuda``), and a client on two GPUs when two
are present — not built yet (the ranks of ``fedfm client --nproc`` use gloo on the CPU and no
device per rank), so it is recorded as such. JSON out, each part's own JSON inside.

    python benchmarks/gpu.py all --out benchmarks/results/gpu-all.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_mb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None


def _local_throughput(cfg, precisions: list[str], repeats: int) -> dict:
    """Examples (or tokens) per second of one client's local training, precisions alternated."""
    from fedfm.algorithms.objectives import Objective
    from fedfm.client.program import ClientJob, client_update
    from fedfm.models.state import get_trainable_state
    from fedfm.tasks.setup import build_task, prepare_data
    from fedfm.types import RoundContext

    data = prepare_data(cfg)
    bundle, task = build_task(cfg, data)
    start = get_trainable_state(bundle.trainable)
    rows = np.concatenate(data.client_train)
    steps, bs = cfg.training.local_steps, cfg.training.batch_size
    times: dict[str, list[float]] = {p: [] for p in precisions}
    for rep in range(repeats + 1):  # the first pass warms up kernels and allocator
        for p in precisions:
            training = cfg.training.model_copy(update={"precision": p})
            _sync(bundle.device)
            t0 = time.perf_counter()
            client_update(
                bundle, task, ClientJob(0, rows), start, RoundContext(rep, 0), training, Objective("plain")
            )
            _sync(bundle.device)
            if rep:
                times[p].append(time.perf_counter() - t0)
    out = {}
    for p, ts in times.items():
        sec = float(np.median(ts))
        out[p] = {"median_s": round(sec, 3), "examples_per_s": round(steps * bs / sec, 1)}
    return out


def classify(args) -> dict:
    import fedfm
    from fedfm.config import make_config

    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    result: dict = {"device": str(device)}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run = fedfm.run(
            None,
            output=Path(tmp) / "r",
            overrides=[f"model.name={args.model}", f"run.device={device}", f"run.rounds={args.rounds}"],
            progress=False,
        )
        result["default_run"] = {
            "wall_s": round(time.perf_counter() - t0, 1),
            "final_accuracy": run.final_metrics.get("test_accuracy"),
            "peak_gpu_mb": _peak_mb(device),
        }
    print(json.dumps(result["default_run"]), flush=True)
    cfg = make_config(
        {},
        [
            f"model.name={args.model}",
            f"run.device={device}",
            "model.max_length=128",
            "training.batch_size=32",
            f"training.local_steps={args.steps}",
            "partition.method=iid",
        ],
    )
    precisions = ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]
    result["local_training_128_tokens_batch_32"] = _local_throughput(cfg, precisions, args.repeats)
    return result


def _random_smollm2_shape(folder: Path, tokenizer_dir: str) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def _conversations(path: Path, n: int = 256) -> None:
    rng = np.random.default_rng(0)
    words = [
        "federated",
        "learning",
        "keeps",
        "data",
        "on",
        "every",
        "client",
        "while",
        "a",
        "server",
        "averages",
        "small",
        "updates",
    ]
    rows = []
    for i in range(n):
        q = "explain " + " ".join(rng.choice(words, size=8))
        a = " ".join(rng.choice(words, size=120))
        rows.append({"instruction": q, "input": "", "output": a, "topic": f"t{i % 4}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def llm(args) -> dict:
    from fedfm.config import make_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result: dict = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data = Path(tmp) / "smol", Path(tmp) / "conv.jsonl"
        _random_smollm2_shape(model_dir, args.tokenizer)
        _conversations(data)
        base = [
            "task.kind=instruction",
            f"model.name={model_dir}",
            "model.max_length=256",
            "data.name=jsonl",
            f"data.path={data}",
            "data.label_column=topic",
            "partition.method=iid",
            "partition.num_clients=2",
            "training.batch_size=8",
            f"training.local_steps={args.steps}",
            f"run.device={device}",
        ]
        settings = {"lora-fp32": ["training.precision=fp32"], "lora-bf16": ["training.precision=bf16"]}
        if device.type == "cuda":
            settings["qlora-4bit-bf16"] = ["model.quantization=4bit", "training.precision=bf16"]
        for name, extra in settings.items():
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            cfg = make_config({}, base + extra)
            try:
                tp = _local_throughput(cfg, [cfg.training.precision], args.repeats)[cfg.training.precision]
            except Exception as err:  # report, do not hide, a setting that fails here
                result[name] = {"error": f"{type(err).__name__}: {err}"}
                continue
            tokens = args.steps * 8 * 256  # upper bound: padded batch width ≤ max_length
            result[name] = {
                **tp,
                "tokens_per_s_upper": round(tokens / tp["median_s"]),
                "peak_gpu_mb": _peak_mb(device),
            }
            print(name, json.dumps(result[name]), flush=True)
    return result


def plan(folder: Path) -> list[tuple[str, list[str], Path]]:
    """(part, command, the JSON it writes) for every part of ``all``."""
    import sys

    here = Path(__file__).resolve().parent
    py = sys.executable
    batched, llama = str(here / "batched.py"), str(here / "llama1b.py")
    parts = {
        "batched-vs-inprocess-50": [batched, "--device", "cuda", "--clients", "50", "--workloads", "minilm"],
        "simulation-1000": [batched, "--device", "cuda", "--simulation", "1000"],
        "qlora-1b-round": [llama, "--device", "cuda", "--quantization", "4bit"],
    }
    return [
        (name, [py, *cmd, "--out", str(folder / f"{name}.json")], folder / f"{name}.json")
        for name, cmd in parts.items()
    ]


def run_all(args) -> dict | None:
    """Every GPU part in its own process; what each printed and wrote, and how it ended."""
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        parts = plan(Path(tmp))
        if args.dry_run:
            for name, cmd, _ in parts:
                print(name, " ".join(cmd))
            return None
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks/gpu.py all needs a CUDA GPU (--dry-run shows the plan)")
        result = {
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "parts": {},
        }
        for name, cmd, out in parts:
            started = time.perf_counter()
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.limit)
                entry = {"rc": done.returncode, "tail": (done.stdout + done.stderr)[-2000:]}
            except subprocess.TimeoutExpired:
                entry = {"rc": None, "tail": f"ran past {args.limit} s"}
            entry["wall_s"] = round(time.perf_counter() - started, 1)
            if out.exists():
                entry["result"] = json.loads(out.read_text())
            result["parts"][name] = entry
            print(name, entry["rc"], entry["wall_s"], flush=True)
        two = torch.cuda.device_count() >= 2
        result["parts"]["two-gpu-client"] = {
            "skipped": "not built: fedfm client --nproc ranks use gloo on the CPU, with no device per rank"
            if two
            else "needs two GPUs"
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("classify")
    c.add_argument("--model", default="minilm")
    c.add_argument("--device", default="auto")
    c.add_argument("--rounds", type=int, default=7)
    c.add_argument("--steps", type=int, default=30)
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--out", default="benchmarks/results/gpu-classify.json")
    g = sub.add_parser("llm")
    g.add_argument("--tokenizer", required=True, help="Folder with SmolLM2's tokenizer files.")
    g.add_argument("--steps", type=int, default=10)
    g.add_argument("--repeats", type=int, default=3)
    g.add_argument("--out", default="benchmarks/results/gpu-llm.json")
    a = sub.add_parser("all")
    a.add_argument("--limit", type=int, default=1800, help="seconds each part may run")
    a.add_argument("--dry-run", action="store_true", help="print the plan; run nothing")
    a.add_argument("--out", default="benchmarks/results/gpu-all.json")
    args = parser.parse_args()
    if args.what == "all":
        result = run_all(args)
        if result is None:
            return
    else:
        result = classify(args) if args.what == "classify" else llm(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
