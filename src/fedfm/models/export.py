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
