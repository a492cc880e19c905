"""A plain Hugging Face Trainer script: LoRA on MiniLM, text classification from a CSV.

It is a fedfm client by two changed lines, marked ``# fedfm``: ``federate(trainer)`` takes the
place of ``trainer.train()``. Run it alone (delete the two lines) and it trains on its CSV;
run it under fedfm and every round trains from the global model:

    fedfm federate examples/hf_trainer/classify.toml --clients 2 -- \\
        examples/hf_trainer/classify.py --data site{k}.csv

(``{k}`` is the client's index) or, against a deployed ``fedfm server``, with ``FEDFM_SERVER``,
``FEDFM_TOKEN`` and the TLS files in the environment (see docs/deployment.md).
"""

from __future__ import annotations

import argparse
import csv

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

from fedfm.hf import federate  # fedfm


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="CSV with 'text' and 'label' columns")
    ap.add_argument("--model", default=None, help="model folder (default: the packaged MiniLM)")
    ap.add_argument("--labels", default=None, help="comma-separated label names (default: sorted)")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per round")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default="trainer-out")
    return ap.parse_args(argv)


def build_trainer(args: argparse.Namespace) -> Trainer:
    """The script's Trainer, exactly as a plain run would build it."""
    if args.model is None:  # the MiniLM folder fedfm installs offline (any model folder works)
        from fedfm.models.resolve import resolve_model

        args.model = resolve_model("minilm")

    with open(args.data, newline="") as fh:
        rows = list(csv.DictReader(fh))
    labels = args.labels.split(",") if args.labels else sorted({r["label"] for r in rows})
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    enc = tokenizer(
        [r["text"] for r in rows], truncation=True, max_length=args.max_length, padding="max_length"
    )
    train = [
        {"input_ids": torch.tensor(i), "attention_mask": torch.tensor(m), "labels": labels.index(r["label"])}
        for i, m, r in zip(enc["input_ids"], enc["attention_mask"], rows, strict=True)
    ]

    model = AutoModelForSequenceClassification.from_pretrained(
        args.model,
        num_labels=len(labels),
        ignore_mismatched_sizes=True,  # a new head for these labels
    )
    lora = LoraConfig(task_type="SEQ_CLS", r=args.r, lora_alpha=args.alpha, lora_dropout=0.0)
    model = get_peft_model(model, lora)
    training = TrainingArguments(
        output_dir=args.output,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    return Trainer(model=model, args=training, train_dataset=train)


def main() -> None:
    trainer = build_trainer(parse())
    federate(trainer)  # fedfm: was trainer.train()


if __name__ == "__main__":
    main()
