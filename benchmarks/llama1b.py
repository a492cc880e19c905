"""One round of federated LoRA on a randomly initialised 1.1B-parameter Llama-style decoder,
loaded by path in bfloat16, on this machine's CPUs.

The decoder has TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads, 4 key-value heads,
MLP 5632) with SmolLM2's tokenizer (49,152 tokens): 1.17B parameters, saved once in bfloat16
(2.3 GB). fedfm loads it with ``model.dtype = "bfloat16"`` and trains LoRA r = 8 on q/v for 2
clients, 4 local steps of batch 4 (chatterbot pairs, at most 256 tokens each), then scores the
global model on 64 held-out sequences. Throughput does not depend on the weights' values.

    python benchmarks/llama1b.py [--out benchmarks/results/llama1b.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _stamp import stamp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def make_model(folder: Path) -> int:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedfm.models.resolve import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, torch_dtype="bfloat16",
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


CHILD = """
import json, sys, time
sys.path.insert(0, {src!r})
import fedfm
t = time.perf_counter()
r = fedfm.run(json.load(open({cfg!r})), output={out!r}, progress=False)
hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:"))
print(json.dumps({{"history": r.history, "peak_rss_mb": hwm / 1024, "run_s": time.perf_counter() - t}}))
"""


def peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "llama1b.json")
    ap.add_argument("--device", default="cpu", help="run.device (cuda on a GPU)")
    ap.add_argument("--quantization", default="none", choices=["none", "4bit"], help="4bit: QLoRA (a GPU)")
    args = ap.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama-1b"
        params = make_model(folder)
        made_s, made_peak = time.perf_counter() - started, peak_mb()
        cfg = {
            "run": {"rounds": 1, "seed": 0, "device": args.device},
            "task": {"kind": "instruction", "num_eval_prompts": 2, "max_new_tokens": 8},
            "model": {
                "name": str(folder),
                "max_length": 256,
                "dtype": "bfloat16",
                "quantization": args.quantization,
            },
            "peft": {"method": "lora", "r": 8, "alpha": 16},
            "data": {"name": "chatterbot", "max_examples": 320, "test_fraction": 0.2},
            "partition": {"method": "iid", "num_clients": 2},
            "sampling": {"fraction": 1.0},
            "training": {"local_steps": 4, "batch_size": 4, "lr": 2e-4},
            "eval": {"at_start": False, "batch_size": 8},
        }
        t = time.perf_counter()
        # the model is made in this process first; its own peak is reported apart
        import subprocess

        (Path(tmp) / "cfg.json").write_text(json.dumps(cfg))
        code = CHILD.format(
            src=str(ROOT / "src"), cfg=str(Path(tmp) / "cfg.json"), out=str(Path(tmp) / "run")
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        got = json.loads(done.stdout.strip().splitlines()[-1])
    rounds = [r for r in got["history"] if r.get("round") == 1]
    shape = {"model_shape": {"parameters": params, "hidden": 2048, "layers": 22, "dtype": "bfloat16"}}
    result = {
        **stamp("scale/llama-1b-lora-round", cfg | shape, [0]),
        "make_model_s": round(made_s, 1),
        "make_model_peak_rss_mb": round(made_peak, 1),
        "run_wall_s": round(got["run_s"], 1),
        "process_wall_s": round(time.perf_counter() - t, 1),
        "run_peak_rss_mb": round(got["peak_rss_mb"], 1),
        "round": rounds[0] if rounds else None,
    }
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
