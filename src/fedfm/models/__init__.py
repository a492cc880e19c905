"""Models: resolve a name, build the FM with its PEFT method, move trainable state, export adapters."""

from fedfm.models.build import ModelBundle, build_classifier
from fedfm.models.resolve import ModelError, resolve_model
from fedfm.models.state import get_trainable_state, set_trainable_state

__all__ = [
    "ModelBundle",
    "ModelError",
    "build_classifier",
    "get_trainable_state",
    "resolve_model",
    "set_trainable_state",
]
