"""Write the final trainable state as a folder the ecosystem loads.

With ``strategy.lora_aggregation = "stack"`` the base weights themselves changed during the run,
so the folder holds the merged model (``AutoModelForSequenceClassification.from_pretrained``).
Otherwise PEFT methods (lora, ia3, prompt_tuning) give a PEFT adapter folder that
``peft.PeftModel.from_pretrained(base_model, folder)`` loads, the classification head included
(PEFT's ``modules_to_save``). ``head`` and ``full`` have no adapter format, so they give a full
transformers model folder that ``AutoModelForSequenceClassification.from_pretrained`` loads.
"""

from __future__ import annotations

from pathlib import Path

from fedfm.models.build import ModelBundle
from fedfm.models.state import set_trainable_state
from fedfm.types import Params, is_statistic


def export_adapter(
    bundle: ModelBundle, params: Params, folder: str | Path, merged: bool = False, labels: bool = False
) -> Path:
    """``merged``: write the model with the adapter merged in (the bundle's model is unusable after).
    ``labels`` (a classifier): the folder records ``num_labels`` / ``id2label`` / ``label2id`` (see
    ``with_labelled_base``), so ``AutoPeftModelForSequenceClassification`` loads it as it is."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    set_trainable_state(bundle.trainable, params)
    model = bundle.model.merge_and_unload() if merged else bundle.model
    model.save_pretrained(str(folder))
    bundle.tokenizer.save_pretrained(str(folder))
    if labels and (folder / "adapter_config.json").is_file():
        with_labelled_base(bundle, folder)
    stats = {k: v for k, v in params.items() if is_statistic(k)}
    if stats and (folder / "adapter_config.json").is_file():  # an adapter file holds no buffers
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in stats.items()}, str(folder / STATISTICS_FILE))
    return folder


# model.batch_norm = "aggregated" with an adapter: the run's BatchNorm statistics, keyed as the
# base model's buffers (load with ``model.load_state_dict(load_file(...), strict=False)``)
STATISTICS_FILE = "batch_norm_statistics.safetensors"


WEIGHT_FILES = (
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
)


def with_labelled_base(bundle: ModelBundle, folder: Path) -> None:
    """A PEFT adapter of a classifier names its base model, whose own config says nothing of this
    run's labels (a loader would build a 2-label head and fail on the adapter's). So the export
    holds ``base/``: the base model's config with the run's ``num_labels`` / ``id2label`` /
    ``label2id``, its weight files (hard links where the file system allows, else copies) and its
    tokenizer — a complete model folder, so the usual pattern (``AutoTokenizer.from_pretrained(
    peft_config.base_model_name_or_path)``) finds the run's tokenizer and not a default one — and
    the adapter config points there. A base given as a hub id (no local folder) is left as it is."""
    import json
    import os
    import shutil

    source = Path(bundle.source)
    if not source.is_dir():
        return
    base = folder / "base"
    base.mkdir(exist_ok=True)
    bundle.model.config.save_pretrained(str(base))
    bundle.tokenizer.save_pretrained(str(base))
    for pattern in WEIGHT_FILES:
        for file in source.glob(pattern):
            target = base / file.name
            if target.exists() or _without_head(file, target):
                continue
            try:
                os.link(file, target)
            except OSError:
                shutil.copy2(file, target)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(base.resolve())
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _without_head(file: Path, target: Path) -> bool:
    """A base checkpoint that carries a classification head of its own (sized for other labels):
    write it without the head, so the loader builds the run's head; False if there was none."""
    if file.suffix != ".safetensors":
        return False
    from safetensors import safe_open
    from safetensors.torch import save_file

    from fedfm.models.build import HEAD_MODULES

    with safe_open(str(file), framework="pt") as f:
        keys = list(f.keys())
        head = [k for k in keys if k.split(".")[0] in HEAD_MODULES]
        if not head:
            return False
        save_file({k: f.get_tensor(k) for k in keys if k not in head}, str(target), metadata={"format": "pt"})
    return True


def export_run(run_dir: str | Path, output: str | Path, merge: bool = False) -> Path:
    """The final model of a finished run folder as a folder the ecosystem loads.

    ``merge``: the adapter merged into the base weights, a plain transformers folder
    (``AutoModelForCausalLM`` / ``AutoModelForSequenceClassification.from_pretrained``); else the
    PEFT adapter folder (``PeftModel.from_pretrained``).
    """
    import json

    from fedfm.algorithms.lora import LORA_AGGREGATION
    from fedfm.config import load_config
    from fedfm.models.merge import merge_into_base
    from fedfm.server.checkpoint import load_checkpoint
    from fedfm.tasks import task_kind

    run_dir, output = Path(run_dir), Path(output)
    state = load_checkpoint(run_dir / "checkpoint")
    if state is None or not (run_dir / "config.toml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a fedfm run folder with a checkpoint")
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty")
    cfg = load_config(run_dir / "config.toml")
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"device": "cpu"})})
    labels = json.loads((run_dir / "partition.json").read_text())["label_names"]
    kind = task_kind(cfg)
    from fedfm.sharing import SHARING_MODES

    sharing = SHARING_MODES.get(cfg.sharing.mode)
    params = state.params
    server = sharing.server_model(cfg, labels)  # offsite tuning: the adapter plugged into the FM
    if server is not None:
        bundle, params = server.bundle, server.params(params)
    else:
        bundle = kind.build_bundle(cfg, labels)
    merge_into_base(bundle.model, state.merged)
    stacked = LORA_AGGREGATION.get(cfg.strategy.lora_aggregation).merges_into_base
    can_merge = hasattr(bundle.model, "merge_and_unload")
    merged = (merge or stacked) and can_merge
    record = kind.labels_in_export and cfg.model.init == "pretrained"  # a random base has no files
    return export_adapter(bundle, params, output, merged=merged, labels=record)
