"""Build the foundation model for a task and wrap it with the configured PEFT method.

One frozen base model per process: engines swap the small trainable state in and out of it.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedfm.models.resolve import ModelError, load_error, resolve_model
from fedfm.models.state import trainable_parameters
from fedfm.seeding import seed_torch

HEAD_MODULES = ("classifier", "score")

# For tokenizers without a chat template of their own: role headers, the reply, then EOS.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}### {{ message['role'] | capitalize }}:\n{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n\n{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


@dataclass
class ModelBundle:
    """The model, its tokenizer, and the trainable parameters keyed as the payload keys them."""

    model: nn.Module
    tokenizer: Any
    trainable: dict[str, nn.Parameter]
    source: str
    device: torch.device
    # model.batch_norm = "local": the live BatchNorm statistics each client keeps for itself, and
    # their values as loaded (a client's start before it first trains)
    local_statistics: dict[str, torch.Tensor] = field(default_factory=dict)
    initial_statistics: dict[str, torch.Tensor] = field(default_factory=dict)
    # (job, ctx) → a context manager around one client's local training, yielding a dict of metrics
    # it fills at the end (split fine-tuning's cut exchange); None: nothing around it
    training_context: Any = None
    parts: Any = (
        None  # split fine-tuning: which modules are the server's (fedfm.sharing.split.mode.SplitCuts)
    )

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable.values())

    def num_total(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"run.device = {name!r} but CUDA is not available here; use 'auto' or 'cpu'")
    return device


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("peft").setLevel(logging.ERROR)


def load_tokenizer(source: str, name: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as err:
        raise load_error(name, err) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"model {name!r}: the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def label_fields(label_names: list[str]) -> dict:
    """The config fields that give a classifier the run's labels."""
    return {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {n: i for i, n in enumerate(label_names)},
    }


def base_dtype(model_cfg) -> torch.dtype:
    """The dtype the base weights load and stay in (``model.dtype``)."""
    return torch.bfloat16 if getattr(model_cfg, "dtype", "float32") == "bfloat16" else torch.float32


def load_labelled(auto_class, source: str, model_cfg, label_names: list[str]) -> nn.Module:
    """``auto_class`` (a transformers Auto class) for ``source`` with the run's labels: pretrained
    (a checkpoint whose head has another label count gets a fresh head) or freshly initialised."""
    from transformers import AutoConfig

    labels = label_fields(label_names)
    try:
        if model_cfg.init == "pretrained":
            return auto_class.from_pretrained(
                source, dtype=base_dtype(model_cfg), ignore_mismatched_sizes=True, **labels
            )
        return auto_class.from_config(
            AutoConfig.from_pretrained(source, **labels), dtype=base_dtype(model_cfg)
        )
    except Exception as err:
        raise load_error(model_cfg.name, err) from None


def build_classifier(
    model_cfg, peft_cfg, label_names: list[str], seed: int, device: str = "auto"
) -> ModelBundle:
    """A sequence classifier (encoder or decoder) with the PEFT method applied, seeded by ``seed``."""
    _quiet_transformers()
    from transformers import AutoModelForSequenceClassification

    source = resolve_model(model_cfg.name, model_cfg)
    tokenizer = load_tokenizer(source, model_cfg.name)
    seed_torch(seed, "model-init")
    model = load_labelled(AutoModelForSequenceClassification, source, model_cfg, label_names)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    adapted = select_layers(model, model_cfg, peft_cfg)
    model = apply_peft(model, peft_cfg, model_cfg.name, layers=adapted)
    dev = pick_device(device)
    model.to(dev)
    return ModelBundle(model, tokenizer, trainable_parameters(model), source, dev)


def require_bitsandbytes(setting: str, instead: str, device: torch.device) -> None:
    """``ModelError`` unless bitsandbytes can run ``setting`` here: a CUDA device and the package."""
    import importlib.util

    if device.type != "cuda":
        raise ModelError(
            f"{setting} needs bitsandbytes on a CUDA GPU; this run's device is {device.type!r}. "
            f"Use {instead} here."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"{setting} needs the bitsandbytes package: pip install bitsandbytes")


def quantization_config(model_cfg, device: torch.device):
    """bitsandbytes settings for ``model.quantization`` (QLoRA), or a clear error where unsupported."""
    if model_cfg.quantization == "none":
        return None
    require_bitsandbytes(
        f"model.quantization = {model_cfg.quantization!r}", "model.quantization = 'none'", device
    )
    from transformers import BitsAndBytesConfig

    if model_cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def build_causal_lm(
    model_cfg, peft_cfg, training_cfg, seed: int, device: str = "auto", before_peft=None
) -> ModelBundle:
    """A causal LM for instruction tuning, with the PEFT method applied (LoRA targets: PEFT's choice
    for the architecture unless ``peft.target_modules`` is set). ``before_peft(model) → model``
    changes the base first (preference alignment: an SFT adapter merged in)."""
    _quiet_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM

    source = resolve_model(model_cfg.name, model_cfg)
    tokenizer = load_tokenizer(source, model_cfg.name)
    if not getattr(tokenizer, "chat_template", None):  # base models (GPT-2, ...): a plain template
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    dev = pick_device(device)
    quant = quantization_config(model_cfg, dev)
    seed_torch(seed, "model-init")
    try:
        if model_cfg.init == "pretrained":
            extra = {"quantization_config": quant, "device_map": {"": dev.index or 0}} if quant else {}
            model = AutoModelForCausalLM.from_pretrained(source, dtype=base_dtype(model_cfg), **extra)
        else:
            model = AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(source), dtype=base_dtype(model_cfg)
            )
    except Exception as err:
        raise load_error(model_cfg.name, err) from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if before_peft is not None:
        model = before_peft(model)
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    adapted = select_layers(model, model_cfg, peft_cfg)
    if training_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model = apply_peft(model, peft_cfg, model_cfg.name, task_type="CAUSAL_LM", layers=adapted)
    if quant is None:
        model.to(dev)
    return ModelBundle(model, tokenizer, trainable_parameters(model), source, dev)


def select_layers(model: nn.Module, model_cfg, peft_cfg) -> tuple[str, list[int]] | None:
    """Keep only ``model.layers`` of the model's layer stack; return (the stack's name, the
    positions of ``peft.layers`` in what is kept), or None when every layer is adapted."""
    from fedfm.models.layers import check_layers, keep_layers, layer_list, positions

    kept, adapt = getattr(model_cfg, "layers", None), getattr(peft_cfg, "layers", None)
    if kept is None and adapt is None:
        return None
    path, stack = layer_list(model)
    n = len(stack)
    kept = check_layers(kept, n, "model.layers") if kept is not None else list(range(n))
    if len(kept) < n:
        keep_layers(model, kept)
    if adapt is None:
        return None
    return path, positions(kept, check_layers(adapt, n, "peft.layers"), "peft.layers")


def apply_peft(
    model: nn.Module,
    peft_cfg,
    name: str,
    task_type: str | None = "SEQ_CLS",
    layers: tuple[str, list[int]] | None = None,
) -> nn.Module:
    """Wrap with PEFT (lora, ia3, prompt_tuning) or set requires_grad for head / full. ``layers``
    (the layer stack's name, positions): adapt, or with ``full`` train, only those layers."""
    method = peft_cfg.method
    if layers is not None and method in ("head", "prompt_tuning", "ia3"):
        raise ModelError(f"peft.layers does not apply to peft.method = {method!r}; leave it unset")
    if method == "full":
        if layers is not None:
            from fedfm.models.layers import train_only_layers

            train_only_layers(model, layers[1], HEAD_MODULES)
            return model
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method == "head":
        for n, p in model.named_parameters():
            p.requires_grad_(n.split(".")[0] in HEAD_MODULES)
        if not any(p.requires_grad for p in model.parameters()):
            raise ModelError(f"model {name!r} has no classification head named {HEAD_MODULES}")
        return model
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_config(peft_cfg, model, task_type, layers))
    except ValueError as err:
        raise ModelError(
            f"peft.method = {method!r} on model {name!r}: {err}. Set peft.target_modules to the "
            "names of the linear layers to adapt."
        ) from None


def peft_config(
    peft_cfg,
    model: nn.Module | None = None,
    task_type: str | None = "SEQ_CLS",
    layers: tuple[str, list[int]] | None = None,
):
    from peft import IA3Config, LoraConfig, PromptTuningConfig

    # PEFT finds a module's layer index after the stack's last name ("layer", "layers", "h")
    where = (
        {"layers_to_transform": layers[1], "layers_pattern": layers[0].rsplit(".", 1)[-1]} if layers else {}
    )
    if peft_cfg.method == "lora":
        return LoraConfig(
            task_type=task_type,
            r=peft_cfg.r,
            lora_alpha=peft_cfg.alpha,
            lora_dropout=peft_cfg.dropout,
            use_dora=peft_cfg.dora,
            target_modules=peft_cfg.target_modules,
            # no task type (image models): PEFT does not know the head, so it is named here
            modules_to_save=None if task_type else [n for n in HEAD_MODULES if hasattr(model, n)] or None,
            **where,
        )
    if peft_cfg.method == "ia3":
        targets = peft_cfg.target_modules
        return IA3Config(
            task_type=task_type, target_modules=targets, feedforward_modules=[] if targets else None
        )
    if peft_cfg.method == "prompt_tuning":
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=peft_cfg.num_virtual_tokens)
    raise ModelError(f"peft.method {peft_cfg.method!r} has no PEFT config")
