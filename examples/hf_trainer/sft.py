"""A plain TRL SFTTrainer script: LoRA instruction tuning of the packaged SmolLM2-135M.

It is a fedfm client by two changed lines, marked ``# fedfm`` (``federate(trainer)`` in the
place of ``trainer.train()``). TRL is not a fedfm dependency: ``pip install trl``.

    fedfm federate examples/hf_trainer/sft.toml --clients 2 -- \\
        examples/hf_trainer/sft.py --data chat{k}.jsonl

Each line of the JSONL file is {"instruction": ..., "response": ...}.
"""

from __future__ import annotations

import argparse
import json

from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from fedfm.hf import federate  # fedfm


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="JSONL of instruction/response pairs")
    ap.add_argument("--model", default=None, help="model folder (default: the packaged SmolLM2-135M)")
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per round")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default="sft-out")
    return ap.parse_args(argv)


def build_trainer(args: argparse.Namespace) -> SFTTrainer:
    if args.model is None:  # the SmolLM2 folder fedfm installs offline (any causal LM folder works)
        from fedfm.models.resolve import resolve_model

        args.model = resolve_model("smollm2-135m")
    with open(args.data) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    train = Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": r["instruction"]},
                    {"role": "assistant", "content": r["response"]},
                ]
            }
            for r in rows
        ]
    )
    lora = LoraConfig(task_type="CAUSAL_LM", r=args.r, lora_alpha=args.alpha, lora_dropout=0.0)
    config = SFTConfig(
        output_dir=args.output,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        max_length=args.max_length,
        seed=args.seed,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    return SFTTrainer(model=args.model, args=config, train_dataset=train, peft_config=lora)


def main() -> None:
    trainer = build_trainer(parse())
    federate(trainer)  # fedfm: was trainer.train()


if __name__ == "__main__":
    main()
