"""The training loss: next-token cross-entropy over the trained positions only, never the full fp32 logits.

What the plain path (`model(...).logits`, then F.cross_entropy on its fp32 copy) spends, and this one does not:
- the LM head on every position, when an instruction row trains on its response only (often a minority of its
  tokens): here the head's input is gathered to the trained positions first, by a pre-hook on the model's own
  output layer, so the model's own code still applies the head (and any elementwise logit post-processing such
  as Gemma-2's soft-capping) -- to those rows alone;
- the fp32 copy of the logits kept for backward: cross-entropy here saves the logits in the compute dtype. On the
  CPU a native kernel (csrc/xent.c) computes it in fp32 inside, one pass over the logits forward and one
  backward, where torch's path makes seven over an fp32 copy; elsewhere (or without the native build) torch's
  cross-entropy upcasts one chunk of rows at a time, in forward and again in backward, so no fp32 tensor is
  larger than a chunk (`CHUNK_ELEMENTS`). A 128k vocabulary at 2k trained tokens is 1 GiB in fp32 per row.

Same training: the trained positions, the targets and every operation on them are the plain path's. The chunked
path runs torch's own cross-entropy backward on each chunk, so its gradients are the plain path's bit for bit
wherever the head's matmul gives each row the same bits at any row count (tests check it on this build); the
native kernel does the same operations in the same order with its own exp, so its loss equals torch's to fp32
rounding and its bf16 gradients to one unit in the last place, at a few elements in 10^5 (tests hold both).
"""

from __future__ import annotations

import contextlib
import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from qlora_kit._native import _DTYPE_CODES, load_library
from qlora_kit.attention import packed_rows
from qlora_kit.data import IGNORE_INDEX

CHUNK_ELEMENTS = 1 << 20
"""fp32 elements (4 MiB) of logits upcast at once: the chunk's rows x vocabulary. Forward and backward each hold
about three chunk-sized fp32 tensors (the upcast, its log-softmax, its gradient), so a chunk of 64 MiB put ~0.2 GiB
on the SmolLM2-135M training step's peak (49k vocabulary, ~500 trained rows) for nothing: per-chunk overhead is a
few calls. Gradients do not depend on it (each row's are its own); the loss sum is added in another grouping."""


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of low-precision logits; saves them as they are and upcasts chunk by chunk."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
        ctx.save_for_backward(logits, targets)
        ctx.rows = rows
        total = logits.new_zeros((), dtype=torch.float32)
        for i in range(0, logits.shape[0], rows):
            total += F.cross_entropy(logits[i:i + rows].float(), targets[i:i + rows], reduction="sum")
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets = ctx.saved_tensors
        out = torch.empty_like(logits)
        for i in range(0, logits.shape[0], ctx.rows):
            with torch.enable_grad():  # torch's own backward of the very ops the plain path runs
                chunk = logits[i:i + ctx.rows].detach().float().requires_grad_(True)
                loss = F.cross_entropy(chunk, targets[i:i + ctx.rows], reduction="sum")
                (g,) = torch.autograd.grad(loss, chunk, grad)
            out[i:i + ctx.rows] = g
        return out, None, None


XENT_ABI_VERSION = 1
"""csrc/xent.c's XE_ABI_VERSION."""


def _load_xent() -> ctypes.CDLL | None:
    lib, _ = load_library("_xent", "xe_abi_version", XENT_ABI_VERSION)
    if lib is not None:
        ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.xe_forward.argtypes = [ptr, i32, i64, i64, ptr, ptr, ptr, i32]
        lib.xe_backward.argtypes = [ptr, i32, i64, i64, ptr, ptr, ctypes.c_float, ptr, i32]
        lib.xe_forward.restype = lib.xe_backward.restype = i32
    return lib


_XENT = _load_xent()


class _NativeCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of CPU logits by csrc/xent.c: saves the logits as they are and each row's max and
    log-sum-exp (8 bytes a row); backward writes softmax minus one-hot, times the gradient, in the logits' dtype."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, targets = logits.contiguous(), targets.contiguous().long()
        rows, vocab = logits.shape
        stats = torch.empty(rows, 2)
        losses = torch.empty(rows)
        if _XENT.xe_forward(logits.data_ptr(), _DTYPE_CODES[logits.dtype], rows, vocab, targets.data_ptr(),
                            stats.data_ptr(), losses.data_ptr(), torch.get_num_threads()):
            raise IndexError(f"cross-entropy: a target is outside [0, {vocab}), the logits' vocabulary")
        ctx.save_for_backward(logits, targets, stats)
        return losses.sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, stats = ctx.saved_tensors
        out = torch.empty_like(logits)
        _XENT.xe_backward(logits.data_ptr(), _DTYPE_CODES[logits.dtype], logits.shape[0], logits.shape[1],
                          targets.data_ptr(), stats.data_ptr(), float(grad), out.data_ptr(), torch.get_num_threads())
        return out, None


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum over rows of -log softmax(logits)[target], fp32, for [N, V] logits in any float dtype."""
    if _XENT is not None and logits.is_cpu and logits.dtype in _DTYPE_CODES and logits.dim() == 2:
        return _NativeCrossEntropy.apply(logits, targets)
    rows = max(1, CHUNK_ELEMENTS // max(logits.shape[-1], 1))
    return _ChunkedCrossEntropy.apply(logits, targets, rows)


def trained_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask over [B, T]: position t predicts a trained label at t + 1, those labels in row-major order)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep, labels[:, 1:][keep[:, :-1]]


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over trained positions, and how many positions that was."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    keep, targets = trained_positions(batch["labels"])
    rows = packed_rows() if "seq_ids" in batch else contextlib.nullcontext()  # packed: no row-wide mask built
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model  # DDP: forward
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None  # through the wrapper
    if head is None:  # no separate output layer to gather in front of: the plain path
        with rows:
            logits = model(**inputs, use_cache=False).logits[:, :-1].flatten(0, 1)
        flat = batch["labels"][:, 1:].flatten()
        return cross_entropy_sum(logits[flat != IGNORE_INDEX], flat[flat != IGNORE_INDEX]), int(targets.numel())

    def gather(module, args):
        return (args[0][keep].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        with rows:
            logits = model(**inputs, use_cache=False).logits
    finally:
        handle.remove()
    return cross_entropy_sum(logits.reshape(-1, logits.shape[-1]), targets), int(targets.numel())
