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
from fedfm.types import Params


def export_adapter(bundle: ModelBundle, params: Params, folder: str | Path, merged: bool = False) -> Path:
    """``merged``: write the model with the adapter merged in (the bundle's model is unusable after)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    set_trainable_state(bundle.trainable, params)
    model = bundle.model.merge_and_unload() if merged else bundle.model
    model.save_pretrained(str(folder))
    bundle.tokenizer.save_pretrained(str(folder))
    return folder


def export_run(run_dir: str | Path, output: str | Path, merge: bool = False) -> Path:
    """The final model of a finished run folder as a folder the ecosystem loads.

    ``merge``: the adapter merged into the base weights, a plain transformers folder
    (``AutoModelForCausalLM`` / ``AutoModelForSequenceClassification.from_pretrained``); else the
    PEFT adapter folder (``PeftModel.from_pretrained``).
    """
    import json

    from fedfm.checkpoint import load_checkpoint
    from fedfm.config import load_config
    from fedfm.models.build import build_causal_lm, build_classifier
    from fedfm.models.merge import merge_into_base

    run_dir, output = Path(run_dir), Path(output)
    state = load_checkpoint(run_dir / "checkpoint")
    if state is None or not (run_dir / "config.toml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a fedfm run folder with a checkpoint")
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty")
    cfg = load_config(run_dir / "config.toml")
    if cfg.task.kind == "instruction":
        bundle = build_causal_lm(cfg.model, cfg.peft, cfg.training, cfg.run.seed, "cpu")
    else:
        labels = json.loads((run_dir / "partition.json").read_text())["label_names"]
        bundle = build_classifier(cfg.model, cfg.peft, labels, cfg.run.seed, "cpu")
    merge_into_base(bundle.model, state.merged)
    stacked = cfg.strategy.lora_aggregation == "stack"
    can_merge = hasattr(bundle.model, "merge_and_unload")
    return export_adapter(bundle, state.params, output, merged=(merge or stacked) and can_merge)
