"""Resolve device, dtype and tokenizer once, up front, and fail fast with a clear message."""

from __future__ import annotations

from pathlib import Path

import torch

from qlora_kit.errors import CheckpointError, ConfigError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
"""The compute dtypes a recipe may name; `config`, `shapes` and the planner take their names and sizes from here."""


def resolve_device(name: str | None = None) -> torch.device:
    """The accelerator when there is one, else the CPU (or exactly what the caller names)."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    dtype = DTYPES[name]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("compute_dtype bfloat16 is not supported by this GPU; set compute_dtype=float16")
    return dtype


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False):
    """The checkpoint's own tokenizer; a directory without one is an error naming it."""
    from transformers import AutoTokenizer

    path = Path(model_dir)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such model directory")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot load a tokenizer ({str(e).splitlines()[0]}); "
                              "copy tokenizer.json / tokenizer_config.json into the model directory") from None
