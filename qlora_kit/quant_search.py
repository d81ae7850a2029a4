"""Scale search: bitsandbytes' 4-bit format with better values, chosen without data.

bitsandbytes stores each block's raw max |x| as its scale. Per block we pick instead the scale that gives the lowest
reconstruction error, by Lloyd's alternation (and optionally a grid) started from bitsandbytes' own result (see
csrc/quant_search.c): a block is never worse than bitsandbytes' under that error, the scale never exceeds the raw
max, and with double quantization the error is measured at the scale as a reader will decode it (the 8-bit level of
its group). Nothing about the format changes -- the same codes, 16 levels, scale slots and nested state -- so
bitsandbytes, transformers and every peer read the result unchanged.

The error is weighted per input column: sum_j m_j (w_ij - q_ij)^2 over a block, m_j the second moment of the layer's
input j, because a layer's output error is X (W - Q)^T and the inputs are far from even: a few channels of an LLM's
residual stream carry activations hundreds of times the rest. Plain weight MSE (all m_j equal) clips the weights
those channels read and, on SmolLM2-135M, lowers weight error by 16% while moving perplexity by nothing; the weighted
search is what moves it (BENCHMARKS.md). Whole-model quantization (loader, `qlora-kit quantize`) gets m from
calibrate.probe_importance -- random token ids through the model, no data -- or, with a calibration file, from the
real inputs' Hessian diagonal; a lone `QuantizedWeight.quantize` call without `importance` weighs all columns alike.

`search_quantize` is what `QuantizedWeight.quantize` calls when `QuantConfig.scale_search` is set. Kernels: the C
library `qlora_kit._quant_search` on CPU (loaded with ctypes, like `_native`), otherwise the torch path below,
which makes the same choices (both sum errors in double; only the order of those sums differs).
"""

from __future__ import annotations

import ctypes
import importlib.util

import torch

from qlora_kit import _native, codes
from qlora_kit.quant import NESTED_BLOCKSIZE

GRID = torch.empty(0)
"""Candidate scales as fractions of each block's raw absmax, tried after bitsandbytes' own: none by default. Measured
on SmolLM2-135M with the probe's weights (tools/bench_fidelity.py's held-out perplexity, bitsandbytes 49.45, bf16
34.55; share of that gap closed) and in time against the plain kernel on a 4096x4096 weight (one thread,
2026-12-02): one Lloyd step alone 51% at ~2.4x; the single fraction 0.8, 50% at ~2.2x; 0.85 plus a step, 58% at
~3.7x; 0.9 and 0.8 plus a step, 61% at ~5x; 8 fractions 1.0..0.6 plus two steps, 70% at ~12x. Each candidate is
a pass over the block, about as costly as the whole plain kernel, so the default is the one candidate that keeps
quantize time within 3x of it."""
SEARCH_STEPS = 1
"""Lloyd steps from the best candidate so far (codes fixed, the best scale is <x, c>_w / <c, c>_w in closed form;
each step one more pass over the block, taken only while it helps)."""


def _load() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec(f"{__package__}._quant_search")
    if spec is None or not spec.origin:
        return None
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    try:
        lib = ctypes.CDLL(spec.origin)
        lib.qs_absmax.argtypes = [ptr, i32, i64, i64, ptr, i32]
        lib.qs_search.argtypes = [ptr, i32, i64, i64, ptr, ptr, ptr, ptr, ptr, i64, ptr, i64, ptr, i32, i32, ptr, ptr, ptr,
                                  i32]
    except (OSError, AttributeError):
        return None
    lib.qs_absmax.restype = lib.qs_search.restype = i32
    return lib


_LIB = _load()
HAVE_NATIVE: bool = _LIB is not None


def block_absmax(A: torch.Tensor, blocksize: int) -> torch.Tensor:
    """bitsandbytes' stored absmax per block of A (flattened): the raw max |x|, the tail's clamped at 1e-38."""
    A = A.detach().contiguous()
    n = A.numel()
    if _LIB is not None and A.dtype in _native._DTYPE_CODES and blocksize % 2 == 0 and blocksize <= 4096:
        out = torch.empty(-(-n // blocksize), dtype=torch.float32)
        if _LIB.qs_absmax(A.data_ptr(), _native._DTYPE_CODES[A.dtype], n, blocksize, out.data_ptr(),
                          torch.get_num_threads()):
            raise RuntimeError(f"qs_absmax rejected its arguments (n={n}, blocksize={blocksize})")
        return out
    flat = A.reshape(-1).float()
    full = n - n % blocksize
    am = flat[:full].view(-1, blocksize).abs().amax(1)
    if full < n:
        am = torch.cat([am, flat[full:].abs().amax().clamp(min=1e-38).unsqueeze(0)])
    return am


def nested_levels(nested_absmax: torch.Tensor, nested_code: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """[groups, 256] ascending: every scale a double-quantized block of each group can decode to, rounded as the
    dequantize rounds (code * nested absmax, then + offset)."""
    return nested_code.view(1, -1) * nested_absmax.float().view(-1, 1) + offset.float()


def column_weights(A: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor | None:
    """`importance` (one value per column of A, i.e. per input of a linear [out, in]) as the search's fp32 weights,
    scaled to mean 1 so the error sums keep ordinary magnitudes; None stays None (every element weighs 1)."""
    if importance is None:
        return None
    imp = importance.detach().reshape(-1).float().cpu()
    cols = A.shape[-1] if A.dim() else 1
    if imp.numel() != cols or not torch.isfinite(imp).all() or (imp < 0).any():
        raise ValueError(f"importance must be {cols} finite values >= 0 (one per column), got {imp.numel()}")
    mean = imp.mean()
    return (imp / mean if mean > 0 else torch.ones_like(imp)).contiguous()


def search(
    A: torch.Tensor, blocksize: int, quant_type: str, absmax: torch.Tensor,
    levels: torch.Tensor | None = None, level_index: torch.Tensor | None = None,
    grid: torch.Tensor = GRID, steps: int = SEARCH_STEPS, weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(packed codes, stored scale per block, chosen level index per block or None) for A.

    `absmax` is `block_absmax(A)`; with double quantization `levels` is `nested_levels(...)` and `level_index`
    bitsandbytes' 8-bit code of each block's absmax (the search's starting point). `grid` and `steps` as
    GRID and SEARCH_STEPS; steps=0 with an empty grid is bitsandbytes' result. `weights` (`column_weights`): the
    error minimised is sum_i weights[col(i)] * (x_i - decoded_i)^2 over each block; None: plain squared error."""
    _native._check(blocksize, quant_type, A.dtype, A)
    A = A.detach().contiguous()
    grid = grid.float().contiguous()
    cols = A.shape[-1] if A.dim() else 1
    if _LIB is None or blocksize > 4096:
        return _torch_search(A.reshape(-1), cols, blocksize, quant_type, absmax, levels, level_index, grid, steps,
                             weights)
    n = A.numel()
    bounds, order, code = _native._tables(quant_type)
    order8 = order.to(torch.uint8)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    scale = torch.empty(absmax.numel(), dtype=torch.float32)
    lv = None if levels is None else levels.contiguous()
    idx = None if level_index is None else level_index.detach().reshape(-1).contiguous().clone()
    rc = _LIB.qs_search(
        A.data_ptr(), _native._DTYPE_CODES[A.dtype], n, blocksize, bounds.data_ptr(), order8.data_ptr(),
        code.data_ptr(), absmax.contiguous().data_ptr(), None if weights is None else weights.data_ptr(), cols,
        None if lv is None else lv.data_ptr(), NESTED_BLOCKSIZE,
        grid.data_ptr(), grid.numel(), steps, packed.data_ptr(), scale.data_ptr(),
        None if idx is None else idx.data_ptr(), torch.get_num_threads(),
    )
    if rc:
        raise RuntimeError(f"qs_search rejected its arguments (n={n}, blocksize={blocksize})")
    return packed, scale, idx


LANES = 16  # C's accumulator lanes: element i of a block is summed into lane i % 16, in order


def _lane_sum(terms: torch.Tensor) -> torch.Tensor:
    """Sum [blocks, bs] in the C kernel's order: sequential float adds per lane, then the lanes in double as a
    pairwise tree (lane i + lane i + 8, then i + i + 4, ...)."""
    chunks = terms.view(terms.shape[0], -1, LANES)
    acc = torch.zeros(terms.shape[0], LANES)
    for c in range(chunks.shape[1]):
        acc = acc + chunks[:, c]
    total = acc.double()
    while total.shape[1] > 1:
        half = total.shape[1] // 2
        total = total[:, :half] + total[:, half:]
    return total[:, 0]


def _candidate(x, weight, assign, tail, scale, quant_type):
    """Codes of x [blocks, bs] assigned at `assign` (reciprocal for full blocks, division for the tail) and the
    weighted sums (error, <x, c>, <c, c>) of decoding them at `scale`, as the C kernel forms them (`weight` is 0
    on padding)."""
    bounds, order, code = _native._tables(quant_type)
    div = assign.clamp(min=1e-38).view(-1, 1)
    y = torch.where(tail.view(-1, 1), x / div, x * (1.0 / div))
    q = order[torch.bucketize(y, bounds)]
    c = code[q]
    d = x - c * scale.view(-1, 1)
    sums = [_lane_sum(t * weight) for t in (d * d, x * c, c * c)]
    return q, *sums


def _snap(levels, group, s):
    """(nearest level, its index) of each block's scale in its group's levels, the lower one on a tie."""
    lv = levels[group]
    hi = torch.searchsorted(lv, s.view(-1, 1), right=True).clamp(1, 255).view(-1)
    lo_v, hi_v = lv.gather(1, (hi - 1).view(-1, 1)).view(-1), lv.gather(1, hi.view(-1, 1)).view(-1)
    take_lo = s - lo_v <= hi_v - s
    return torch.where(take_lo, lo_v, hi_v), torch.where(take_lo, hi - 1, hi)


def _torch_search(A, cols, blocksize, quant_type, absmax, levels, level_index, grid, steps, weights):
    n = A.numel()
    nblocks = -(-n // blocksize)
    width = -(-blocksize // LANES) * LANES
    x = torch.nn.functional.pad(A.float(), (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    index = torch.arange(nblocks * blocksize)
    weight = (index < n).float() if weights is None else torch.where(index < n, weights[index % cols], 0.0)
    x, weight = (torch.nn.functional.pad(t, (0, width - blocksize)) for t in (x, weight.view(nblocks, blocksize)))
    tail = torch.zeros(nblocks, dtype=torch.bool)
    tail[-1:] = n % blocksize != 0
    group = torch.arange(nblocks) // NESTED_BLOCKSIZE
    best_k = torch.zeros(nblocks, dtype=torch.long) if levels is None else level_index.reshape(-1).long().clone()
    best_s = absmax.clone() if levels is None else levels[group, best_k]
    best_q, best_err, best_xc, best_cc = _candidate(x, weight, absmax, tail, best_s, quant_type)

    def try_scale(s):
        nonlocal best_q, best_err, best_xc, best_cc, best_s, best_k
        k = best_k
        if levels is not None:
            s, k = _snap(levels, group, s)
        q, err, xc, cc = _candidate(x, weight, s, tail, s, quant_type)
        better = (s > 0) & (err < best_err)  # a repeated scale repeats its error: never strictly better
        best_q = torch.where(better.view(-1, 1), q, best_q)
        best_err, best_xc, best_cc = (torch.where(better, a, b) for a, b in ((err, best_err), (xc, best_xc),
                                                                                (cc, best_cc)))
        best_s, best_k = torch.where(better, s, best_s), torch.where(better, k, best_k)

    for fraction in grid.tolist():
        try_scale(absmax * torch.tensor(fraction, dtype=torch.float32))
    for _ in range(steps):
        nxt = (best_xc / best_cc).float()  # C skips a block whose <c, c> is 0; its NaN here is never better
        try_scale(torch.where(nxt < absmax, nxt, absmax))  # as C's ?:, a NaN becomes the cap
    flat = best_q[:, :blocksize].reshape(-1)[: n + n % 2].to(torch.uint8)  # an odd length pads with a coded 0.0
    packed = (flat[::2] << 4) | flat[1::2]
    return packed, best_s, None if levels is None else best_k.to(torch.uint8)


def search_quantize(weight: torch.Tensor, blocksize: int, quant_type: str, double_quant: bool,
                    importance: torch.Tensor | None = None):
    """The pieces `QuantizedWeight` holds, scale-searched: (packed, absmax, nested_absmax, nested_code, offset);
    the last three None without double quantization. `importance`: see `column_weights`."""
    absmax = block_absmax(weight, blocksize)
    weights = column_weights(weight, importance)
    if not double_quant:
        packed, scale, _ = search(weight, blocksize, quant_type, absmax, weights=weights)
        return packed, scale, None, None, None
    # bitsandbytes' nesting of the raw maxima, kept as it is: only the per-block level index changes
    offset = absmax.mean()
    nested_code = codes.dynamic_map()
    qabsmax, nested_absmax = _native.quantize_blockwise(absmax - offset, nested_code, NESTED_BLOCKSIZE)
    levels = nested_levels(nested_absmax, nested_code, offset)
    packed, _, index = search(weight, blocksize, quant_type, absmax, levels, qabsmax, weights=weights)
    return packed, index, nested_absmax, nested_code, offset
