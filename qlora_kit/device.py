"""Resolve device, dtype and tokenizer once, up front, and fail fast with a clear message."""

from __future__ import annotations

import os
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


MALLOC_KEEP_BYTES = 64 << 20
"""Allocations below this come from the heap, and up to twice this much freed memory stays in it
(`keep_freed_memory`)."""


def keep_freed_memory() -> bool:
    """On glibc, let a training process reuse freed memory instead of returning it to the OS at once; True if set.

    A CPU training step allocates and frees the same few-MiB tensors (dequantized weights, attention scores,
    activations) hundreds of times. glibc serves those from fresh mmaps, or trims the heap under them, so each
    allocation faults its pages in again: on the 2-core host a SmolLM2 step of 680 tokens ran 2.60 s with these
    limits against 3.06-3.21 s without, in separate processes (tools/bench_train.py measures the peak RSS too).
    The limits replace glibc's moving ones (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD); larger tensors are still
    mapped and returned as before. A user's own MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ win: with either
    in the environment, glibc is left as they set it."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    mapped = mallopt(m_mmap_threshold, MALLOC_KEEP_BYTES)
    return bool(mapped) and bool(mallopt(m_trim_threshold, 2 * MALLOC_KEEP_BYTES))
