"""Llama's RMSNorm as one native pass forward and one backward while training on the CPU (csrc/rmsnorm.c).

Why: under autograd transformers' RMSNorm is eight tensor operations forward and about as many backward, each a
pass over [tokens, hidden] with its threads to wake, and it saves an fp32 copy of its input; gradient
checkpointing runs the forward twice. A decoder layer has two. On the 2-core SmolLM2-135M step the kernel takes a
norm's forward from ~490 to ~180 us and its forward plus backward from ~1290 to ~390 us, and backward keeps only
the input and 4 bytes a row.

Same training: the arithmetic is transformers' own, operation for operation with its 16-bit rounding of the
normalised value; only the row sums group their terms otherwise, so results equal torch's to fp32 rounding and
16-bit outputs to one unit in the last place at a few elements in 10^5 (tests/test_rmsnorm.py holds both).
Which modules: those whose forward is, line for line, transformers' LlamaRMSNorm (Mistral, Qwen2/3, Phi-3,
Granite and others copy it); a norm of another shape (Gemma's 1 + weight, a LayerNorm) is left as it is. Only on
the CPU, only with gradients on (inference stays transformers' exact path), only for a frozen weight; anything
else runs the module's own forward.
"""

from __future__ import annotations

import ctypes
import inspect
import textwrap
from functools import cache

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from qlora_kit._native import _DTYPE_CODES, load_library

RMSNORM_ABI_VERSION = 1
"""csrc/rmsnorm.c's RN_ABI_VERSION."""


def _load() -> ctypes.CDLL | None:
    lib, _ = load_library("_rmsnorm", "rn_abi_version", RMSNORM_ABI_VERSION)
    if lib is not None:
        ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.rn_forward.argtypes = [ptr, i32, ptr, i32, ctypes.c_float, i64, i64, ptr, ptr, i32]
        lib.rn_backward.argtypes = [ptr, i32, ptr, i32, ptr, ptr, i64, i64, ptr, i32]
        lib.rn_forward.restype = lib.rn_backward.restype = i32
    return lib


_RMSNORM = _load()


def _output_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype of `weight * normed.to(x.dtype)` for a pair the kernel takes (one dtype, or an fp32 weight)."""
    if x.dtype in _DTYPE_CODES and weight.dtype in (x.dtype, torch.float32):
        return weight.dtype
    return None


class _RMSNorm(torch.autograd.Function):
    """LlamaRMSNorm over the last dimension; saves x and each row's 1/rms, not autograd's fp32 copy of x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x = x.contiguous()
        d = x.shape[-1]
        y = torch.empty(x.shape, dtype=_output_dtype(x, weight))
        rstd = torch.empty(x.numel() // d)
        _RMSNORM.rn_forward(x.data_ptr(), _DTYPE_CODES[x.dtype], weight.data_ptr(), _DTYPE_CODES[weight.dtype], eps,
                            rstd.numel(), d, y.data_ptr(), rstd.data_ptr(), torch.get_num_threads())
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        g = g.contiguous()
        gx = torch.empty_like(x)
        _RMSNORM.rn_backward(x.data_ptr(), _DTYPE_CODES[x.dtype], weight.data_ptr(), _DTYPE_CODES[weight.dtype],
                             g.data_ptr(), rstd.data_ptr(), rstd.numel(), x.shape[-1], gx.data_ptr(),
                             torch.get_num_threads())
        return gx, None, None


def rms_norm(module: nn.Module, x: torch.Tensor, own_forward) -> torch.Tensor:
    """A LlamaRMSNorm-shaped module's forward: the kernel where it applies, else `own_forward`."""
    weight = module.weight
    if (_RMSNORM is not None and torch.is_grad_enabled() and x.is_cpu and weight.is_cpu and x.numel() > 0
            and not weight.requires_grad and weight.dim() == 1 and weight.shape[0] == x.shape[-1]
            and _output_dtype(x, weight) is not None):
        return _RMSNorm.apply(x, weight, float(module.variance_epsilon))
    return own_forward(module, x)


@cache
def _source(fn) -> str:
    try:
        return textwrap.dedent(inspect.getsource(fn)).strip()
    except (OSError, TypeError):
        return ""


def is_llama_rms_norm(cls: type) -> bool:
    """Whether `cls.forward` is, line for line, LlamaRMSNorm.forward (transformers copies it per model)."""
    ref = _source(LlamaRMSNorm.forward)
    return cls.forward is LlamaRMSNorm.forward or (ref != "" and _source(cls.forward) == ref)


@cache
def _native_class(cls: type) -> type:
    """A subclass of `cls` whose forward takes the kernel, falling back on cls's own."""
    own = cls.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(self, x, own)

    return type(f"Native{cls.__name__}", (cls,), {"forward": forward, "__module__": cls.__module__,
                                                  "_qlora_native": True})


def use_native_rms_norm(model: nn.Module) -> int:
    """Give the model's Llama-shaped norms the kernel's training path, in place (their class only: parameters
    and state dict are unchanged); returns how many modules that was. A no-op without the build."""
    if _RMSNORM is None:
        return 0
    count = 0
    for module in model.modules():
        cls = type(module)
        if not hasattr(cls, "_qlora_native") and hasattr(module, "variance_epsilon") and is_llama_rms_norm(cls):
            module.__class__ = _native_class(cls)
            count += 1
    return count
