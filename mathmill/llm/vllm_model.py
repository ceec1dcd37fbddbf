"""The bundled SmolLM2 as a model folder vLLM can load (tests, CPU runs, the bench).

vLLM cannot load the embedded model's GGUF file, so it is converted once with
transformers into a safetensors folder (weights dequantized to float32, tokenizer and
chat template included) under ``~/.cache/mathmill/models`` (or
``$MATHMILL_MODELS_DIR``). ``mathmill vllm convert`` runs it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from mathmill.errors import ConfigError
from mathmill.llm.embedded import find_gguf

__all__ = ["convert_gguf", "local_vllm_model", "models_dir"]

_NAME = "SmolLM2-135M-Instruct"
_DONE = ".mathmill-converted"


def models_dir() -> Path:
    """Where converted models live."""
    base = os.environ.get("MATHMILL_MODELS_DIR")
    if base:
        return Path(base)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "mathmill" / "models"


def convert_gguf(gguf: Path, dest: Path) -> Path:
    """Convert a GGUF file to a safetensors model folder at ``dest`` (atomic: a folder
    is only ever complete or absent).
    """
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ConfigError("converting a GGUF needs transformers: scripts/install_vllm.sh") from e
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model: Any = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype="float32"
    )
    # The weights are dequantized: saving them must not claim a quantization.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / _DONE).write_text(gguf.name + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)
    return dest


def local_vllm_model() -> Path:
    """The bundled SmolLM2 as a vLLM model folder, converted on first use
    (``$MATHMILL_VLLM_MODEL`` names another folder).
    """
    override = os.environ.get("MATHMILL_VLLM_MODEL")
    if override:
        return Path(override)
    dest = models_dir() / _NAME
    if not (dest / _DONE).exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(find_gguf(), dest)
    return dest
