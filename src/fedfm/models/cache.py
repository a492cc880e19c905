"""fedfm's model cache: GGUF files dequantised once and kept as safetensors folders.

``FEDFM_CACHE`` names the cache folder (default: ``$XDG_CACHE_HOME/fedfm`` or ``~/.cache/fedfm``).
The first load of a GGUF model dequantises it with transformers (16–25 s for SmolLM2-135M on two
cores) and writes a normal model folder; later loads read that folder in well under a second.
Concurrent first loads are safe: each process writes its own temporary folder and renames it
into place (an atomic rename on POSIX); a process that loses the race drops its copy.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path


def cache_root() -> Path:
    if os.environ.get("FEDFM_CACHE"):
        return Path(os.environ["FEDFM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedfm"


def _complete(folder: Path, stamp: dict) -> bool:
    marker = folder / "fedfm-source.json"
    return marker.is_file() and json.loads(marker.read_text()) == stamp


def cached_gguf(gguf: Path, name: str) -> Path:
    """A safetensors model folder for the GGUF file ``gguf``, built on first use."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stamp = {"source": gguf.name, "bytes": gguf.stat().st_size}
    target = cache_root() / name
    if _complete(target, stamp):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # dequantised already: save plain float weights
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "fedfm-source.json").write_text(json.dumps(stamp))
        if target.exists() and not _complete(target, stamp):
            shutil.rmtree(target, ignore_errors=True)  # a stale or half-written folder from elsewhere
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: use its folder
            if not _complete(target, stamp):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
