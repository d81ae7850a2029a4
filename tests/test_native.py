"""_native against bitsandbytes: the same packed codes, absmax and dequantized values, bit for bit.

Each test runs twice: on the C kernels and on the torch fallback (the library hidden), which must agree too.
References are bitsandbytes' CPU ops: for 4 bits its torch quantize kernel, and for dequantize both the public
`dequantize_4bit` and the reference kernel its CPU backend falls back to (`_dequantize_4bit_compute`, called
eagerly to skip a torch.compile per shape); for 8 bits the public quantize_blockwise / dequantize_blockwise,
which on CPU run its C kernels (a table lookup, not the nearest-code search of its torch kernel).
"""

import math

import pytest
import torch
from bitsandbytes import functional as bnbf
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute, _get_4bit_quantize_bounds

from qlora_kit import _native

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
QUANT_TYPES = ["nf4", "fp4"]
SHAPES = [(1,), (7,), (2, 64), (33, 65), (3, 1000), (5000,), (2, 4097)]  # tails, odd numel, 1 element
TINY = {torch.bfloat16: 1e-40, torch.float16: 6e-8, torch.float32: 1e-45}  # subnormals of each dtype
HUGE = {torch.bfloat16: 3e38, torch.float16: 6.5e4, torch.float32: 3e38}
DECADES = {torch.bfloat16: 38, torch.float16: 4, torch.float32: 38}  # largest power of ten that stays finite


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # bitsandbytes' reference is a chain of small torch ops; on a busy machine every thread hand-off can
    # cost a scheduler time slice. Results do not depend on it (threads are tested on their own below).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["native", "torch"])
def backend(request, monkeypatch):
    if request.param == "native" and not _native.HAVE_NATIVE:
        pytest.skip("qlora_kit._quant4 was not built")
    if request.param == "torch":
        monkeypatch.setattr(_native, "_LIB", None)
    return request.param


def reference_quantize(A, blocksize, quant_type):
    packed, absmax = torch.ops.bitsandbytes.quantize_4bit.default(A, blocksize, quant_type, torch.uint8)
    return packed.reshape(-1), absmax


def reference_dequantize(packed, absmax, blocksize, quant_type, shape, dtype):
    code = bnbf.get_4bit_type(quant_type, device="cpu")
    return _dequantize_4bit_compute.__wrapped__(packed, absmax, code, blocksize, shape, dtype).reshape(shape)


def same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def assert_quantize_matches(A, blocksize, quant_type):
    packed, absmax = _native.quantize_4bit(A, blocksize, quant_type)
    ref_packed, ref_absmax = reference_quantize(A, blocksize, quant_type)
    assert torch.equal(packed, ref_packed), f"codes differ for {tuple(A.shape)} {A.dtype} bs={blocksize}"
    assert same_bits(absmax, ref_absmax), f"absmax differs for {tuple(A.shape)} {A.dtype} bs={blocksize}"


def weights(shape, dtype, seed=0):
    """Magnitudes over many decades across a row (finite in `dtype`), and every seventh block of 32 all zero."""
    torch.manual_seed(seed)
    w = torch.randn(shape) * torch.logspace(-6, min(6, DECADES[dtype] - 1), shape[-1])
    w.view(-1)[: (w.numel() // 32) * 32].view(-1, 32)[::7] = 0
    return w.to(dtype)


def test_tables_are_bitsandbytes_tables():
    for quant_type in QUANT_TYPES:
        bounds, order, code = _native._tables(quant_type)
        ref_bounds, ref_order = _get_4bit_quantize_bounds(quant_type, torch.device("cpu"))
        assert same_bits(bounds, ref_bounds) and torch.equal(order, ref_order)
        assert same_bits(code, bnbf.get_4bit_type(quant_type, device="cpu"))


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_bit_identical(backend, dtype, quant_type, blocksize):
    for seed, shape in enumerate(SHAPES):
        assert_quantize_matches(weights(shape, dtype, seed), blocksize, quant_type)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_extreme_values(backend, dtype, quant_type):
    torch.manual_seed(1)
    n = 3 * 64 + 5
    sign = torch.randn(n).sign()
    cases = {
        "zeros": torch.zeros(n),
        "negative zeros": -torch.zeros(n),
        "huge": sign * HUGE[dtype] * torch.rand(n),
        "subnormal": sign * TINY[dtype] * torch.randint(0, 4, (n,)),
        "all decades": torch.randn(n) * torch.logspace(-40, DECADES[dtype], n),
    }
    for name, A in cases.items():
        for blocksize in (32, 64, 4096):
            assert_quantize_matches(A.to(dtype), blocksize, quant_type)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_values_exactly_on_midpoints(backend, quant_type):
    """x * (1/absmax) lands exactly on a bound, and one ulp either side, in full blocks and in the tail."""
    bounds = _native._tables(quant_type)[0]
    up, down = torch.nextafter(bounds, torch.tensor(2.0)), torch.nextafter(bounds, torch.tensor(-2.0))
    row = torch.cat([torch.tensor([1.0]), bounds, up, down, -bounds, torch.tensor([0.0, -0.0, -1.0])])
    A = torch.cat([row.repeat(5), row[:41]])  # 64 a row: every block of 32 or 64 holds a +-1; odd tail
    for scale in (1.0, 2.0**-100, 2.0**100):  # powers of two keep the products exact
        for blocksize in (32, 64):
            assert_quantize_matches(A * scale, blocksize, quant_type)
    for dtype in (torch.bfloat16, torch.float16):  # rounded near the bounds rather than on them
        assert_quantize_matches(A.to(dtype), 64, quant_type)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_scales_full_blocks_by_reciprocal_and_the_tail_by_division(backend, quant_type):
    """Values a few ulps from bound * absmax whose bucket depends on which of the two roundings is used."""
    bounds = _native._tables(quant_type)[0]
    for absmax in map(torch.tensor, (3.0, 7.0, 11.0)):
        near, up, down = [bounds * absmax], bounds * absmax, bounds * absmax
        for _ in range(4):
            up, down = torch.nextafter(up, torch.tensor(2e38)), torch.nextafter(down, torch.tensor(-2e38))
            near += [up, down]
        near = torch.cat(near)
        split = torch.bucketize(near / absmax, bounds) != torch.bucketize(near * (1.0 / absmax), bounds)
        block = torch.cat([absmax.view(1), near[split]])
        assert 2 < block.numel() < 64
        A = torch.cat([block, torch.zeros(64 - block.numel()), block])  # one full block, then the tail
        assert_quantize_matches(A, 64, quant_type)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_nan_and_inf_codes(backend, quant_type):
    """Outside the contract, but defined: same codes; an absmax NaN may differ only in its payload."""
    A = torch.randn(200)
    A[[3, 199]], A[[70, 130]], A[150] = float("nan"), float("inf"), -float("inf")
    packed, absmax = _native.quantize_4bit(A, 64, quant_type)
    ref_packed, ref_absmax = reference_quantize(A, 64, quant_type)
    assert torch.equal(packed, ref_packed)
    torch.testing.assert_close(absmax, ref_absmax, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_bit_identical(backend, dtype, quant_type, blocksize):
    torch.manual_seed(blocksize)
    for shape in SHAPES:
        n = math.prod(shape)
        packed = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8)
        # scales spanning fp16 overflow and bf16/fp16 subnormals, so the final rounding is exercised
        absmax = torch.logspace(-42, 38, -(-n // blocksize))[torch.randperm(-(-n // blocksize))]
        out = _native.dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype)
        assert same_bits(out, reference_dequantize(packed, absmax, blocksize, quant_type, shape, dtype))


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_rounds_ties_to_even(backend, dtype, quant_type):
    """Scales that put code 1.0 * absmax exactly halfway between two bf16 / fp16 values, normal,
    subnormal and at the overflow threshold."""
    ties = [1 + 2**-8, 1 + 3 * 2**-8, 3 * 2**-134, 1 + 2**-11, 1 + 3 * 2**-11, 0.5 * 2**-24, 1.5 * 2**-24, 65520.0]
    absmax = torch.tensor(ties)
    packed = torch.arange(16 * len(ties), dtype=torch.uint8)  # blocks of 32: every code in every block
    shape = (32 * len(ties),)
    out = _native.dequantize_4bit(packed, absmax, 32, quant_type, shape, dtype)
    assert same_bits(out, reference_dequantize(packed, absmax, 32, quant_type, shape, dtype))


# bitsandbytes' public CPU dequantize runs its C kernels for these. Left out: odd last dims (they take the
# reference kernel, checked above, through a slow torch.compile), and last dims that are a multiple of 16
# but not of the blocksize, where bitsandbytes 0.50's AVX-512 kernel reads the wrong absmax for blocks that
# straddle rows (e.g. (48, 80) at blocksize 64) -- there we match its reference kernel instead.
# Compared by value: its scalar C kernel writes FP4 code 8 as -0.0, its other kernels and ours as +0.0.
PUBLIC_CASES = [((64, 256), 64), ((64, 256), 256), ((3, 1000), 128), ((5, 70), 64), ((2, 4096), 1024), ((96,), 32)]


@pytest.mark.parametrize("shape,blocksize", PUBLIC_CASES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip_matches_public_bitsandbytes(backend, dtype, quant_type, shape, blocksize):
    A = weights(shape, dtype)
    packed, absmax = _native.quantize_4bit(A, blocksize, quant_type)
    ref_packed, state = bnbf.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type)
    assert torch.equal(packed, ref_packed.reshape(-1)) and same_bits(absmax, state.absmax)
    out = _native.dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype)
    assert torch.equal(out, bnbf.dequantize_4bit(ref_packed, state).reshape(shape))


@pytest.mark.skipif(not _native.HAVE_NATIVE, reason="qlora_kit._quant4 was not built")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_equals_fallback_on_a_large_tensor_any_thread_count(threads, monkeypatch):
    A = weights((1031, 1031), torch.bfloat16)  # blocks that straddle rows, a tail, work split unevenly
    assert A.numel() // _min_per_thread("Q4_MIN_PER_THREAD") >= threads  # every thread given is woken
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    native = _native.quantize_4bit(A, 64, "nf4")
    native_out = _native.dequantize_4bit(*native, 64, "nf4", A.shape, torch.bfloat16)
    monkeypatch.setattr(_native, "_LIB", None)
    fallback = _native.quantize_4bit(A, 64, "nf4")
    assert torch.equal(native[0], fallback[0]) and same_bits(native[1], fallback[1])
    assert same_bits(native_out, _native.dequantize_4bit(*fallback, 64, "nf4", A.shape, torch.bfloat16))


def test_empty_tensor(backend):
    packed, absmax = _native.quantize_4bit(torch.empty(0, 16), 64, "nf4")
    assert packed.shape == (0,) and absmax.shape == (0,)
    assert _native.dequantize_4bit(packed, absmax, 64, "nf4", (0, 16), torch.bfloat16).shape == (0, 16)


def test_rejects_what_it_cannot_do():
    A = torch.randn(64)
    with pytest.raises(ValueError, match="quant_type"):
        _native.quantize_4bit(A, 64, "int4")
    with pytest.raises(ValueError, match="blocksize"):
        _native.quantize_4bit(A, 63, "nf4")
    with pytest.raises(ValueError, match="bf16/fp16/fp32"):
        _native.quantize_4bit(A.double(), 64, "nf4")
    with pytest.raises(ValueError, match="CPU"):
        _native.quantize_4bit(A.to("meta"), 64, "nf4")
    packed, absmax = _native.quantize_4bit(A, 64, "nf4")
    with pytest.raises(ValueError, match="too few"):
        _native.dequantize_4bit(packed, absmax, 64, "nf4", (2, 64), torch.float32)


# ---- 8-bit blockwise (the nested absmax stage) against bitsandbytes' CPU C kernels ----

CODE8 = bnbf.create_dynamic_map(signed=True)
BLOCKSIZES8 = [32, 64, 256, 4096, 100]  # bitsandbytes' CPU kernel takes any blocksize, so do we
SHAPES8 = [(1,), (255,), (256,), (3, 300), (70001,)]  # one element, tails, several blocks


def assert_quantize8_matches(A, blocksize=256):
    codes, absmax = _native.quantize_blockwise(A, CODE8, blocksize)
    ref_codes, state = bnbf.quantize_blockwise(A, code=CODE8, blocksize=blocksize)
    assert torch.equal(codes, ref_codes), f"codes differ for {tuple(A.shape)} bs={blocksize}"
    assert same_bits(absmax, state.absmax), f"absmax differs for {tuple(A.shape)} bs={blocksize}"
    return codes, absmax


def unit_blocks(values):
    """`values` in blocks of 256 whose absmax is exactly 1, so each value is itself the scaled value."""
    rows = -(-values.numel() // 255)
    values = torch.nn.functional.pad(values, (0, rows * 255 - values.numel())).view(rows, 255)
    return torch.cat([torch.ones(rows, 1), values], dim=1).reshape(-1)


def test_lut8_is_bitsandbytes_table_either_way(monkeypatch):
    if not _native.HAVE_NATIVE:
        pytest.skip("qlora_kit._quant4 was not built")
    key = CODE8.numpy().tobytes()
    native = _native._lut8.__wrapped__(key)
    monkeypatch.setattr(_native, "_LIB", None)
    assert torch.equal(native, _native._lut8.__wrapped__(key))


@pytest.mark.parametrize("blocksize", BLOCKSIZES8)
def test_quantize8_bit_identical(backend, blocksize):
    for seed, shape in enumerate(SHAPES8):
        A = weights(shape, torch.float32, seed)  # many decades, every seventh block of 32 all zero
        assert_quantize8_matches(A - A.mean(), blocksize)  # centred, as the nested stage is


def test_quantize8_on_every_table_step_code_and_midpoint(backend):
    """Scaled values v on both sides of every step of bitsandbytes' table index, and the 256 codes and 255
    midpoints with two ulps either side. The index is a function of t = (v + 1) / 2, which lies on a grid of
    2^-25 (below 1/2) or 2^-24, so the steps are approached on that grid: ulps of v near 0 are far finer and
    would all land on one t. (A sweep of all 2^31 floats in [-1, 1], too slow to keep here, matched too.)"""
    t_step = (torch.arange(65537, dtype=torch.float64) - 0.5) / 65535  # t * 65535 + 0.5 is an integer
    grid = torch.where(t_step < 0.5, 2.0**-25, 2.0**-24)
    t = torch.cat([(torch.floor(t_step / grid) + j) * grid for j in (-1, 0, 1, 2)])
    steps = (2 * t - 1).clamp(-1, 1).float()  # exact: v + 1 == 2t in fp32 too
    near = torch.cat([CODE8, (CODE8[:-1] + CODE8[1:]) * 0.5])
    up, down, values = near, near, [steps, near]
    for _ in range(2):
        up, down = torch.nextafter(up, torch.tensor(2.0)), torch.nextafter(down, torch.tensor(-2.0))
        values += [up, down]
    assert_quantize8_matches(unit_blocks(torch.cat(values).clamp(-1, 1)))


def test_quantize8_extreme_values(backend):
    torch.manual_seed(2)
    n = 3 * 256 + 17
    sign = torch.randn(n).sign()
    cases = {
        "zeros": torch.zeros(n),
        "negative zeros": -torch.zeros(n),
        "huge": sign * 3e38 * torch.rand(n),
        "subnormal": sign * 1e-45 * torch.randint(0, 4, (n,)),  # 1/absmax overflows to inf
        "tiny normal": sign * 2e-38 * torch.rand(n),
        "all decades": torch.randn(n) * torch.logspace(-45, 38, n),
        "equal magnitudes": sign * 0.75,  # x * (1/absmax) rounds past 1 for some absmax: the clamp
        "thirds": sign * 3.0 * torch.randint(0, 4, (n,)),
    }
    for name, A in cases.items():
        for blocksize in (64, 256):
            assert_quantize8_matches(A, blocksize)


def test_quantize8_nan_and_inf(backend):
    """NaN never becomes the absmax and gets code 0; an inf absmax scales everything to 0 or NaN."""
    A = torch.randn(1000)
    A[[3, 300]], A[600], A[[700, 701]] = float("nan"), float("inf"), -float("inf")
    A[256:512][::2] = float("nan")
    A[512:768] = float("nan")  # a block of nothing but NaN: absmax 0, codes 0
    assert_quantize8_matches(A)


@pytest.mark.parametrize("blocksize", BLOCKSIZES8)
def test_dequantize8_bit_identical(backend, blocksize):
    torch.manual_seed(blocksize)
    for shape in SHAPES8:
        n = math.prod(shape)
        codes = torch.randint(0, 256, shape, dtype=torch.uint8)
        nblocks = -(-n // blocksize)
        absmax = torch.logspace(-45, 38, nblocks)[torch.randperm(nblocks)]
        absmax[::5] = 0
        ref = bnbf.dequantize_blockwise(codes, absmax=absmax, code=CODE8, blocksize=blocksize)
        assert same_bits(_native.dequantize_blockwise(codes, absmax, CODE8, blocksize), ref)
        for offset in (torch.tensor(0.0123), torch.tensor(-3e-5), torch.tensor(0.0)):
            out = _native.dequantize_blockwise(codes, absmax, CODE8, blocksize, offset=offset)
            assert same_bits(out, ref + offset)


def test_roundtrip8_nested_absmax_as_bitsandbytes_stores_it(backend):
    """The nested stage itself: absmax minus its mean, 8 bits in blocks of 256, back with the mean added."""
    absmax = weights((5000,), torch.float32).abs() + 0.01
    offset = absmax.mean()
    codes, nested = assert_quantize8_matches(absmax - offset)
    ref = bnbf.dequantize_blockwise(codes, absmax=nested, code=CODE8, blocksize=256) + offset
    assert same_bits(_native.dequantize_blockwise(codes, nested, CODE8, 256, offset=offset), ref)


def _min_per_thread(name: str) -> int:
    """A kernel's minimum elements per OpenMP thread, read from csrc/quant4.c (`enum { NAME = 1 << k };`)."""
    import re
    from pathlib import Path

    text = (Path(_native.__file__).parent / "csrc" / "quant4.c").read_text()
    return 1 << int(re.search(rf"{name} = 1 << (\d+)", text)[1])


@pytest.mark.skipif(not _native.HAVE_NATIVE, reason="qlora_kit._quant4 was not built")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native8_equals_fallback_on_a_large_tensor_any_thread_count(threads, monkeypatch):
    # enough values that the kernel wakes every thread it is given (it keeps one per Q8_MIN_PER_THREAD), split
    # unevenly, with a tail block
    n = 3 * _min_per_thread("Q8_MIN_PER_THREAD") + 1031
    A = weights((n,), torch.float32)
    assert n // _min_per_thread("Q8_MIN_PER_THREAD") >= threads
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    native = _native.quantize_blockwise(A, CODE8, 256)
    native_out = _native.dequantize_blockwise(*native, CODE8, 256, offset=0.5)
    monkeypatch.setattr(_native, "_LIB", None)
    fallback = _native.quantize_blockwise(A, CODE8, 256)
    assert torch.equal(native[0], fallback[0]) and same_bits(native[1], fallback[1])
    assert same_bits(native_out, _native.dequantize_blockwise(*fallback, CODE8, 256, offset=0.5))


def test_empty_tensor8(backend):
    codes, absmax = _native.quantize_blockwise(torch.empty(0), CODE8, 256)
    assert codes.shape == (0,) and absmax.shape == (0,)
    assert _native.dequantize_blockwise(codes, absmax, CODE8, 256).shape == (0,)


def test_rejects_what_it_cannot_do8():
    A = torch.randn(300)
    with pytest.raises(ValueError, match="fp32"):
        _native.quantize_blockwise(A.bfloat16(), CODE8, 256)
    with pytest.raises(ValueError, match="256 fp32"):
        _native.quantize_blockwise(A, CODE8[:16], 256)
    with pytest.raises(ValueError, match="sorted"):
        _native.quantize_blockwise(A, CODE8.flip(0), 256)
    with pytest.raises(ValueError, match="blocksize"):
        _native.quantize_blockwise(A, CODE8, 0)
    with pytest.raises(ValueError, match="CPU"):
        _native.quantize_blockwise(A.to("meta"), CODE8, 256)
    codes, absmax = _native.quantize_blockwise(A, CODE8, 256)
    with pytest.raises(ValueError, match="too few"):
        _native.dequantize_blockwise(codes, absmax[:1], CODE8, 256)


# --- the build: present when required, checked at load, honest when absent ---------------------------------


def test_native_kernels_are_built_where_required():
    """`make test` (CI) sets QLORA_KIT_REQUIRE_NATIVE=1: a missing or stale build fails here instead of letting
    every native test skip."""
    import os

    if os.environ.get("QLORA_KIT_REQUIRE_NATIVE") != "1":
        pytest.skip("QLORA_KIT_REQUIRE_NATIVE is not set (make test sets it)")
    assert _native.HAVE_NATIVE, _native.UNAVAILABLE
    assert _native.HAVE_GEMV, _native.load_library("_gemv4", "g4_abi_version", _native.GEMV_ABI_VERSION)[1]
    from qlora_kit import loss

    assert loss._XENT is not None, _native.load_library("_xent", "xe_abi_version", loss.XENT_ABI_VERSION)[1]
    from qlora_kit import rmsnorm

    why = _native.load_library("_rmsnorm", "rn_abi_version", rmsnorm.RMSNORM_ABI_VERSION)[1]
    assert rmsnorm._RMSNORM is not None, why


def _build(tmp_path, source: str, *flags: str):
    """A shared library from C source text or a file, with the flags setup.py uses; None without gcc."""
    import shutil
    import subprocess

    if shutil.which("gcc") is None:
        pytest.skip("no gcc")
    src = source if source.endswith(".c") else str(tmp_path / "lib.c")
    if src != source:
        (tmp_path / "lib.c").write_text(source)
    out = tmp_path / "lib.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-fopenmp", "-ffp-contract=off", "-fno-fast-math",
                    "-std=gnu11", *flags, src, "-o", str(out)], check=True, capture_output=True, timeout=120)
    return out


def _load_from(path, monkeypatch):
    import importlib.util
    from importlib.machinery import ModuleSpec

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: ModuleSpec(name, None, origin=str(path))
                        if name.endswith("._quant4") else real(name, *a))
    return _native._load()


@pytest.mark.parametrize("source, version", [("int q4_abi_version(void) { return 0; }\n", 0),
                                             ("int q4_quantize(void) { return 0; }\n", 0)])
def test_a_stale_build_is_never_called(tmp_path, monkeypatch, source, version):
    lib, why = _load_from(_build(tmp_path, source), monkeypatch)
    assert lib is None
    assert f"is a stale build (ABI version {version}, this code needs {_native.ABI_VERSION})" in why
    assert "build_ext --inplace" in why


def test_a_stale_decode_kernel_is_never_called(tmp_path, monkeypatch):
    """gemv4.c changed meaning once (LoRA B now comes transposed): a build from before must not be called with
    the new arguments, however well its symbols line up."""
    import importlib.util
    from importlib.machinery import ModuleSpec

    path = _build(tmp_path, "int g4_gemm(void) { return 0; }\nint g4_dense(void) { return 0; }\n"
                            "int g4_isa(void) { return 2; }\n")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: ModuleSpec(name, None, origin=str(path))
                        if name.endswith("._gemv4") else real(name, *a))
    assert _native._load_gemv() is None
    lib, why = _native.load_library("_gemv4", "g4_abi_version", _native.GEMV_ABI_VERSION)
    assert lib is None and f"(ABI version 0, this code needs {_native.GEMV_ABI_VERSION})" in why


def test_kernels_built_without_target_clones_give_the_same_bits(tmp_path, monkeypatch):
    """The guard for compilers without target_clones("arch=x86-64-v4"): Q4_NO_CLONES builds the baseline only."""
    from pathlib import Path

    csrc = Path(_native.__file__).parent / "csrc" / "quant4.c"
    lib, why = _load_from(_build(tmp_path, str(csrc), "-DQ4_NO_CLONES"), monkeypatch)
    assert lib is not None, why
    A = weights((33, 65), torch.bfloat16)
    expected = _native.quantize_4bit(A, 64, "nf4")
    monkeypatch.setattr(_native, "_LIB", lib)
    got = _native.quantize_4bit(A, 64, "nf4")
    assert torch.equal(got[0], expected[0]) and same_bits(got[1], expected[1])


def test_the_torch_fallback_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(_native, "_LIB", None)
    monkeypatch.setattr(_native, "UNAVAILABLE", "the native kernels (qlora_kit._quant4) were not built")
    _native._note_fallback.cache_clear()
    with caplog.at_level("WARNING", logger="qlora_kit._native"):
        for _ in range(3):
            packed, absmax = _native.quantize_4bit(weights((64,), torch.float32), 64, "nf4")
            _native.dequantize_4bit(packed, absmax, 64, "nf4", (64,), torch.float32)
    _native._note_fallback.cache_clear()
    assert [r.getMessage() for r in caplog.records] == [
        "the native kernels (qlora_kit._quant4) were not built; quantizing on the pure-torch path instead: "
        "same bits, several times slower"]
