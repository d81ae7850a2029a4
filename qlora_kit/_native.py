"""Blockwise quantize / dequantize on CPU: bit-identical to bitsandbytes, many times faster.

4-bit (NF4 / FP4, the weights) and 8-bit with a 256-entry code (the nested absmax of double quantization).
The kernels are csrc/quant4.c, built as `qlora_kit._quant4` and loaded with ctypes (plain C, no Python API:
ctypes drops the GIL for the call, and the C side splits blocks over torch.get_num_threads() OpenMP
threads). The library reports its ABI version (`q4_abi_version`), checked at load: a build of another
version (a stale .so left from before a kernel's signature changed) is never called, only reported. When the
library is missing, stale or unloadable -- no compiler at install time -- the same functions run the torch
paths below, which reproduce bitsandbytes operation for operation: same bits, slower; the first such call logs
one warning saying why. `make test` sets QLORA_KIT_REQUIRE_NATIVE=1, under which tests/test_native.py fails
rather than letting every native test skip.

4-bit layout (bitsandbytes'): codes packed two per byte, the first element in the high nibble, in a flat
uint8 tensor of ceil(n/2) bytes; one fp32 absmax per block of `blocksize` elements, ceil(n/blocksize) of them.
8-bit: one uint8 code per element, in the input's shape, and the same per-block absmax.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import torch

from qlora_kit.codes import four_bit

log = logging.getLogger(__name__)

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
ABI_VERSION = 1
"""The kernels' interface version; csrc/quant4.c's Q4_ABI_VERSION must equal it (bump both with any signature)."""
REBUILD = "rebuild with `python setup.py build_ext --inplace` (or `make`)"


def load_library(module: str, abi_symbol: str, abi_version: int) -> tuple[ctypes.CDLL | None, str]:
    """(the built C library `qlora_kit.<module>`, "") or (None, why not). Each library reports its interface
    version through `abi_symbol`; a build of another version (a stale .so left from before a kernel's signature
    or meaning changed) is never called, only reported. find_spec locates the file without importing it."""
    spec = importlib.util.find_spec(f"{__package__}.{module}")
    if spec is None or not spec.origin:
        return None, f"the native kernels (qlora_kit.{module}) were not built: no C compiler with OpenMP at install?"
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError as e:  # another platform's build, or no OpenMP runtime
        return None, f"{spec.origin} cannot be loaded ({e})"
    try:
        getattr(lib, abi_symbol).restype = ctypes.c_int
        getattr(lib, abi_symbol).argtypes = []
        version = getattr(lib, abi_symbol)()
    except AttributeError:
        version = 0  # built before the version symbol existed
    if version != abi_version:
        return None, f"{spec.origin} is a stale build (ABI version {version}, this code needs {abi_version}); {REBUILD}"
    return lib, ""


def _load() -> tuple[ctypes.CDLL | None, str]:
    lib, why = load_library("_quant4", "q4_abi_version", ABI_VERSION)
    if lib is None:
        return None, why
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.q4_quantize.argtypes = [ptr, i32, i64, i64, ptr, ptr, i32, ptr, ptr, i32]
    lib.q4_dequantize.argtypes = [ptr, ptr, i64, i64, ptr, i32, ptr, i32]
    lib.q8_build_lut.argtypes = [ptr, ptr]
    lib.q8_quantize.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i32]
    lib.q8_dequantize.argtypes = [ptr, ptr, i64, i64, ptr, ctypes.c_float, ptr, i32]
    lib.q4_quantize.restype = lib.q4_dequantize.restype = i32
    lib.q8_quantize.restype = lib.q8_dequantize.restype = i32
    lib.q8_build_lut.restype = None
    return lib, ""


_LIB, UNAVAILABLE = _load()
HAVE_NATIVE: bool = _LIB is not None
"""Whether the C kernels are in use; `UNAVAILABLE` says why not."""


@cache
def _note_fallback() -> None:
    """One warning per process, at the first call that runs on the torch path."""
    log.warning("%s; quantizing on the pure-torch path instead: same bits, several times slower",
                UNAVAILABLE or "the native kernels are disabled")


@cache
def _tables(quant_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bounds, order, code), built as bitsandbytes builds them for its CPU kernel, so neither side drifts."""
    code = four_bit(quant_type)
    order = torch.argsort(code)
    bounds = (code[order[:-1]] + code[order[1:]]) / 2
    return bounds.contiguous(), order, code.contiguous()


def _check(blocksize: int, quant_type: str, dtype: torch.dtype, *tensors: torch.Tensor) -> None:
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if blocksize <= 0 or blocksize % 2:
        raise ValueError(f"blocksize must be a positive even number, got {blocksize}")
    if dtype not in _DTYPE_CODES:
        raise ValueError(f"only bf16/fp16/fp32 are supported, got {dtype}")
    for t in tensors:
        if t.device.type != "cpu":
            raise ValueError(f"CPU tensors only, got one on {t.device}")


def quantize_4bit(A: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4") -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [ceil(n/2)], absmax fp32 [ceil(n/blocksize)]) for A of any shape, flattened in C order."""
    _check(blocksize, quant_type, A.dtype, A)
    A = A.detach().contiguous()
    if _LIB is None:
        _note_fallback()
        return _torch_quantize(A.reshape(-1), blocksize, quant_type)
    n = A.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    bounds, order, _ = _tables(quant_type)
    order8 = order.to(torch.uint8)
    rc = _LIB.q4_quantize(
        A.data_ptr(), _DTYPE_CODES[A.dtype], n, blocksize, bounds.data_ptr(), order8.data_ptr(),
        quant_type != "nf4", packed.data_ptr(), absmax.data_ptr(), torch.get_num_threads(),
    )
    if rc:
        raise RuntimeError(f"q4_quantize rejected its arguments (n={n}, blocksize={blocksize})")
    return packed, absmax


def dequantize_4bit(
    packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, shape: Sequence[int],
    dtype: torch.dtype, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The tensor of `shape` and `dtype`: code[q] * absmax[block] in fp32, rounded to `dtype` to nearest even.

    `out`, a contiguous tensor of that shape and dtype, receives the result instead of a new one: the export
    dequantizes into the very buffer the weight was read into, which saves a fresh allocation (and its page
    faults) per layer.

    That is bitsandbytes' reference kernel, and its CPU C kernels wherever they agree with it. They do not
    (bitsandbytes 0.50) when the last dim is a multiple of 16 but not of the blocksize -- the AVX-512 kernel
    reads the wrong absmax -- nor in the sign of zero for FP4's code 8 (its scalar kernel writes -0.0).
    """
    _check(blocksize, quant_type, dtype, packed, absmax)
    n = math.prod(shape)
    packed = packed.detach().contiguous().view(torch.uint8).reshape(-1)
    absmax = absmax.detach().float().contiguous().reshape(-1)
    if packed.numel() < (n + 1) // 2 or absmax.numel() < -(-n // blocksize):
        raise ValueError(f"{packed.numel()} bytes / {absmax.numel()} scales are too few for shape {tuple(shape)}")
    if out is not None and (out.shape != tuple(shape) or out.dtype != dtype or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {tuple(shape)}")
    if _LIB is None:
        _note_fallback()
        result = _torch_dequantize(packed, absmax, blocksize, quant_type, n, dtype).reshape(shape)
        return result if out is None else out.copy_(result)
    out = torch.empty(tuple(shape), dtype=dtype) if out is None else out
    rc = _LIB.q4_dequantize(
        packed.data_ptr(), absmax.data_ptr(), n, blocksize, _tables(quant_type)[2].data_ptr(),
        _DTYPE_CODES[dtype], out.data_ptr(), torch.get_num_threads(),
    )
    if rc:
        raise RuntimeError(f"q4_dequantize rejected its arguments (n={n}, blocksize={blocksize})")
    return out


def _torch_quantize(A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    # bitsandbytes' default quantize_4bit kernel, step for step: reciprocal for full blocks, division for the
    # tail, clamp, bucketize. Any "simplification" here changes bits.
    bounds, order, _ = _tables(quant_type)
    A = A.float()
    n = A.numel()
    full = n - n % blocksize
    blocks = A[:full].reshape(-1, blocksize)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if full < n:
        am = A[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(A[full:] / am, -1, 1)])
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = torch.bucketize(scaled, bounds, out_int32=True)
    if quant_type != "nf4":
        q = order[q]
    q8 = q.to(torch.uint8)
    return (q8[::2] << 4) | q8[1::2], absmax


def _torch_dequantize(
    packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, n: int, dtype: torch.dtype
) -> torch.Tensor:
    # bitsandbytes' default dequantize_4bit kernel, eagerly.
    codes = torch.stack((packed >> 4, packed & 15), dim=1).reshape(-1)[:n]
    values = _tables(quant_type)[2][codes.long()]
    full = n - n % blocksize
    out = torch.empty(n, dtype=torch.float32)
    out[:full] = (values[:full].view(-1, blocksize) * absmax[: full // blocksize].view(-1, 1)).reshape(-1)
    if full < n:
        out[full:] = values[full:] * absmax[full // blocksize]
    return out.to(dtype)


# ---- 8-bit: the nested absmax stage ----
#
# bitsandbytes' CPU C kernel, which is what its quantize_blockwise runs on CPU (its torch kernel, a nearest-code
# search, gives other codes): the scaled value indexes a 65536-entry table over [-1, 1] built from the code's
# midpoints. See csrc/quant4.c for every detail that decides bits; the torch fallback repeats each of them.

LUT8_SIZE = 65536


def _check8(code: torch.Tensor, blocksize: int, *tensors: torch.Tensor) -> None:
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    if code.shape != (256,) or code.dtype != torch.float32:
        raise ValueError(f"code must be 256 fp32 values, got {tuple(code.shape)} {code.dtype}")
    for t in (code, *tensors):
        if t.device.type != "cpu":
            raise ValueError(f"CPU tensors only, got one on {t.device}")


@cache
def _lut8(code_bytes: bytes) -> torch.Tensor:
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    if not bool((code[1:] >= code[:-1]).all()):
        raise ValueError("the 8-bit code must be sorted ascending (as bitsandbytes' dynamic map is)")
    if _LIB is None:
        # bitsandbytes' build loop: entry i is the number of midpoints below -1 + 2i/65535 (the code is sorted)
        mids = (code[:-1] + code[1:]) * 0.5
        values = -1.0 + (torch.arange(LUT8_SIZE, dtype=torch.float32) * 2.0) / (LUT8_SIZE - 1)
        return torch.bucketize(values, mids).to(torch.uint8)
    lut = torch.empty(LUT8_SIZE, dtype=torch.uint8)
    _LIB.q8_build_lut(code.data_ptr(), lut.data_ptr())
    return lut


def quantize_blockwise(
    A: torch.Tensor, code: torch.Tensor, blocksize: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes shaped like A, absmax fp32 [ceil(n/blocksize)]) for fp32 A, as bitsandbytes' CPU kernel.

    `code` is the sorted 256-entry table (bitsandbytes.functional.create_dynamic_map()); any blocksize.
    """
    _check8(code, blocksize, A)
    if A.dtype != torch.float32:
        raise ValueError(f"8-bit blockwise quantization takes fp32, got {A.dtype}")
    A = A.detach().contiguous()
    lut = _lut8(code.detach().contiguous().numpy().tobytes())
    if _LIB is None:
        _note_fallback()
        return _torch_quantize8(A, lut, blocksize)
    n = A.numel()
    out = torch.empty(A.shape, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    rc = _LIB.q8_quantize(A.data_ptr(), n, blocksize, lut.data_ptr(), out.data_ptr(), absmax.data_ptr(),
                          torch.get_num_threads())
    if rc:
        raise RuntimeError(f"q8_quantize rejected its arguments (n={n}, blocksize={blocksize})")
    return out, absmax


def dequantize_blockwise(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = 256,
    offset: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """fp32 code[q] * absmax[block], shaped like `codes`; plus `offset` when given, with the rounding of a
    separate `+ offset` (the nested absmax is stored minus its mean). Equal to bitsandbytes' CPU result."""
    _check8(code, blocksize, codes, absmax)
    codes = codes.detach().contiguous().view(torch.uint8)
    absmax = absmax.detach().float().contiguous().reshape(-1)
    n = codes.numel()
    if absmax.numel() < -(-n // blocksize):
        raise ValueError(f"{absmax.numel()} scales are too few for {n} codes in blocks of {blocksize}")
    # -0.0 is the one float whose addition changes nothing, -0.0 itself included
    off = -0.0 if offset is None else float(offset)
    code = code.detach().contiguous()
    if _LIB is None:
        _note_fallback()
        return _torch_dequantize8(codes, absmax, code, blocksize, off)
    out = torch.empty(codes.shape, dtype=torch.float32)
    rc = _LIB.q8_dequantize(codes.data_ptr(), absmax.data_ptr(), n, blocksize, code.data_ptr(), off,
                            out.data_ptr(), torch.get_num_threads())
    if rc:
        raise RuntimeError(f"q8_dequantize rejected its arguments (n={n}, blocksize={blocksize})")
    return out


def _torch_quantize8(A: torch.Tensor, lut: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = A.numel()
    nblocks = -(-n // blocksize)
    x = torch.nn.functional.pad(A.reshape(-1), (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    absmax = torch.where(x.isnan(), 0.0, x.abs()).amax(dim=1)  # NaN never wins; the padding is 0
    v = x * (1.0 / absmax).view(-1, 1)
    v = torch.nan_to_num(v, nan=-1.0).clamp(-1.0, 1.0)  # NaN goes where -1 goes, entry 0
    t = (v + 1.0) * 0.5
    index = (t.double() * 65535.0 + 0.5).float().long()  # exact in double, then fma's one rounding
    q = torch.where((absmax == 0).view(-1, 1), 0, lut[index])
    return q.reshape(-1)[:n].reshape(A.shape), absmax


def _torch_dequantize8(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, offset: float
) -> torch.Tensor:
    n = codes.numel()
    nblocks = -(-n // blocksize)
    values = torch.nn.functional.pad(code[codes.reshape(-1).long()], (0, nblocks * blocksize - n))
    out = values.view(nblocks, blocksize) * absmax[:nblocks].view(-1, 1) + offset
    return out.reshape(-1)[:n].reshape(codes.shape)


# ---- 4-bit matmul for a few rows: the decode path (csrc/gemv4.c) ----
#
# y = x Wᵀ (+ bias) straight from the packed codes, never building W. Each weight is the value dequantize_4bit
# gives in x's dtype; only the fp32 summation order differs from F.linear(x, dequantize(W)): see gemv4.c.

GEMV_MAX_ROWS = 16  # rows of x per call: the kernel keeps one accumulator per row in registers
GEMV_CHUNK = 32  # in_features and the blocksize must be multiples of it


GEMV_ABI_VERSION = 2
"""csrc/gemv4.c's G4_ABI_VERSION (2: LoRA B passed transposed, g4_dense added)."""


def _load_gemv() -> ctypes.CDLL | None:
    lib, why = load_library("_gemv4", "g4_abi_version", GEMV_ABI_VERSION)
    if lib is None:
        log.debug("decode kernel unavailable: %s", why)
        return None
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.g4_gemm.argtypes = [ptr, i64, i64, i32, ptr, ptr, ptr, ptr, ptr, ctypes.c_float, ptr, i64, i64, ptr,
                            i32, ptr, ptr, ptr, ptr, ptr, ptr, i32, i32]
    lib.g4_dense.argtypes = [ptr, i64, i64, i32, ptr, i64, ptr, ptr, i32, i32]
    lib.g4_isa.argtypes = []
    lib.g4_gemm.restype = lib.g4_dense.restype = lib.g4_isa.restype = i32
    return lib


_GEMV = _load_gemv()
HAVE_GEMV: bool = _GEMV is not None
GEMV_ISA: int = _GEMV.g4_isa() if _GEMV is not None else -1
"""The decode kernel this machine runs: 3 AVX-512 BF16 (for bf16 activations), 2 AVX-512, 1 AVX2 + FMA, 0 portable
C, -1 not built."""
GEMV_MAX_RANK = 256  # LoRA rank the kernel fuses; above it the adapter runs as torch ops


def gemv_supported(x: torch.Tensor, in_features: int, blocksize: int) -> bool:
    """Whether `gemm_4bit` takes x: a CPU tensor of at most GEMV_MAX_ROWS rows whose width and blocksize the
    kernel's 32-element chunks tile."""
    return (
        HAVE_GEMV and x.is_cpu and x.dtype in _DTYPE_CODES
        and 0 < x.numel() <= GEMV_MAX_ROWS * in_features
        and in_features % GEMV_CHUNK == 0 and blocksize % GEMV_CHUNK == 0
    )


@dataclass(frozen=True)
class GemvWeight:
    """A 4-bit weight's arguments for the kernel, converted once (not per decode step); `keep` holds the tensors
    the pointers point into."""

    packed: int
    absmax: int | None
    qabsmax: int | None
    nested_absmax: int | None
    nested_code: int | None
    offset: float
    code: int
    out_features: int
    blocksize: int
    keep: tuple

    @property
    def args(self) -> tuple:
        """The weight's arguments of g4_gemm, in its order."""
        return (self.packed, self.absmax, self.qabsmax, self.nested_absmax, self.nested_code, self.offset, self.code,
                self.out_features, self.blocksize)


def gemv_weight(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, out_features: int,
                nested: tuple[torch.Tensor, torch.Tensor, torch.Tensor | float] | None = None) -> GemvWeight:
    """`absmax` fp32 per block, or with `nested` = (nested_absmax, nested_code, offset) the 8-bit codes of double
    quantization, undone in the kernel."""
    packed = packed.detach().contiguous().view(torch.uint8)
    code = _tables(quant_type)[2]
    if nested is None:
        am = absmax.detach().float().contiguous()
        return GemvWeight(packed.data_ptr(), am.data_ptr(), None, None, None, 0.0, code.data_ptr(), out_features,
                          blocksize, (packed, am, code))
    qam = absmax.detach().contiguous().view(torch.uint8)
    nam, ncode = nested[0].detach().float().contiguous(), nested[1].detach().float().contiguous()
    return GemvWeight(packed.data_ptr(), None, qam.data_ptr(), nam.data_ptr(), ncode.data_ptr(), float(nested[2]),
                      code.data_ptr(), out_features, blocksize, (packed, qam, nam, ncode, code))


@dataclass(frozen=True)
class LoraArgs:
    """LoRA factors and each row's adapter as the kernel takes them: pointer and scale arrays built once per
    batch composition (a decode step reuses them; see QLinear._decode), `keep` holding what they point into."""

    count: int
    a_ptrs: object
    bt_ptrs: object
    ranks: object
    scales: object
    rows: int
    keep: tuple


def lora_args(adapters: Sequence[tuple[torch.Tensor, torch.Tensor, float]], row_adapter: torch.Tensor) -> LoraArgs:
    """`adapters`: LoRA factors (A fp32 [r, k], B fp32 [out_features, r], scale); `row_adapter` (int32, one per
    row of x flattened to [m, k]; -1 none) says which one each row adds, as QLinear adds it. B goes to the kernel
    transposed (see gemv4.c): that copy lives as long as these arguments, one batch composition."""
    n = len(adapters)
    factors = tuple((a.detach().contiguous(), b.detach().t().contiguous()) for a, b, _ in adapters)
    vp = ctypes.c_void_p * n
    rows = row_adapter.to(torch.int32).contiguous()
    return LoraArgs(
        n, vp(*(a.data_ptr() for a, _ in factors)), vp(*(bt.data_ptr() for _, bt in factors)),
        (ctypes.c_int64 * n)(*(a.shape[0] for a, _ in factors)), (ctypes.c_float * n)(*(s for _, _, s in adapters)),
        rows.data_ptr(), (factors, rows),
    )


_NO_LORA = (0, None, None, None, None, None)


def gemm_4bit(
    x: torch.Tensor, weight: GemvWeight, bias: torch.Tensor | None = None, lora: LoraArgs | None = None,
    isa: int = 3,
) -> torch.Tensor:
    """x[..., k] @ Wᵀ + bias in x's dtype, W (out_features x k) in the 4-bit layout (`gemv_weight`), plus each
    row's LoRA delta where `lora` (`lora_args`) is given. `isa` caps the kernel used (tests compare them). Only
    for inputs `gemv_supported` accepts."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)  # data_ptr only: no autograd here (callers run it under no_grad or on frozen inputs)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    m, dtype = x2.shape[0], x.dtype
    bias_c = None if bias is None else bias.detach().to(dtype).contiguous()
    y = torch.empty(m, weight.out_features, dtype=dtype)
    ad = _NO_LORA if lora is None or not lora.count else (
        lora.count, lora.a_ptrs, lora.bt_ptrs, lora.ranks, lora.scales, lora.rows)
    rc = _GEMV.g4_gemm(
        x2.data_ptr(), m, k, _DTYPE_CODES[dtype], *weight.args, None if bias_c is None else bias_c.data_ptr(), *ad,
        y.data_ptr(), isa, torch.get_num_threads(),
    )
    if rc:
        raise RuntimeError(f"g4_gemm rejected its arguments (m={m}, k={k}, n={weight.out_features})")
    return y.view(x.shape[:-1] + (weight.out_features,))


# ---- the same few rows against a dense 16-bit W (the LM head, layers left unquantized): csrc/gemv4.c ----

def dense_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `dense_gemm` takes x against weight: CPU, bf16/fp16 (the same for both), at most GEMV_MAX_ROWS
    rows, in_features a multiple of 16."""
    k = weight.shape[-1]
    return (
        HAVE_GEMV and x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype == weight.dtype
        and x.dtype in (torch.bfloat16, torch.float16) and weight.dim() == 2 and x.shape[-1] == k
        and 0 < x.numel() <= GEMV_MAX_ROWS * k and k % 16 == 0
    )


def dense_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, isa: int = 3) -> torch.Tensor:
    """F.linear(x, weight, bias) for the few rows of a decode step, fp32 sums in another order (see gemv4.c)."""
    k, n = weight.shape[-1], weight.shape[0]
    x2 = x.detach().reshape(-1, k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    w = weight.detach() if weight.is_contiguous() else weight.detach().contiguous()
    bias_c = None if bias is None else bias.detach().to(x.dtype).contiguous()
    y = torch.empty(x2.shape[0], n, dtype=x.dtype)
    rc = _GEMV.g4_dense(x2.data_ptr(), x2.shape[0], k, _DTYPE_CODES[x.dtype], w.data_ptr(), n,
                        None if bias_c is None else bias_c.data_ptr(), y.data_ptr(), isa, torch.get_num_threads())
    if rc:
        raise RuntimeError(f"g4_dense rejected its arguments (m={x2.shape[0]}, k={k}, n={n})")
    return y.reshape(*x.shape[:-1], n)
