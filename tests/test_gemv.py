"""The decode kernel (csrc/gemv4.c): x Wᵀ straight from the 4-bit codes, against F.linear(x, dequantize(W)).

Tolerance: each weight is exactly the dequantized one, so the two results differ only by the order of the fp32
additions: |y - ref| <= one ulp of the output dtype at |ref| + 2·k·2⁻²⁴·Σ|x||w| (each side's accumulation error
bound). Where the fp32 sums are exact (small-integer activations), the results are equal bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qlora_kit import _native
from qlora_kit.lora import LoraConfig, QLinear, linear_4bit, route_rows
from qlora_kit.quant import QuantConfig, QuantizedWeight

pytestmark = pytest.mark.skipif(not _native.HAVE_GEMV, reason="native decode kernel not built")
ISAS = [isa for isa in (3, 2, 1, 0) if isa <= _native.GEMV_ISA]


def _ulp(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mant = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}[dtype]
    tiny = torch.finfo(dtype).tiny
    return torch.exp2(torch.floor(torch.log2(t.abs().clamp(min=tiny))) - (mant - 1))


def _case(n, k, m, dtype, config, bias, seed=0, integer_x=False):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen).to(dtype)
    qw = QuantizedWeight.quantize(w, config)
    x = (torch.randint(-3, 4, (m, k), generator=gen).float() if integer_x else torch.randn(m, k, generator=gen))
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    return qw, x.to(dtype), b


def _decode(qw, x, b, isa):
    return _native.gemm_4bit(x, qw.gemv_args(), b, isa=isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "n,k,m,config,bias",
    [
        (96, 64, 1, QuantConfig("nf4", True, 64), False),
        (70, 160, 3, QuantConfig("fp4", False, 32), True),
        (130, 96, 8, QuantConfig("nf4", True, 64), True),  # blocks straddle rows: 96 % 64 != 0
        (64, 256, 16, QuantConfig("nf4", False, 128), False),
        (33, 512, 5, QuantConfig("fp4", True, 256), False),
    ],
)
def test_decode_matmul_within_accumulation_tolerance(isa, dtype, n, k, m, config, bias):
    qw, x, b = _case(n, k, m, dtype, config, bias)
    wd = qw.dequantize(dtype)
    ref = F.linear(x, wd, b)
    y = _decode(qw, x, b, isa)
    assert y.dtype == dtype and y.shape == (m, n)
    scale = F.linear(x.double().abs(), wd.double().abs()) + (0 if b is None else b.double().abs())
    bound = _ulp(ref.double(), dtype) + 2 * k * 2.0**-24 * scale
    assert bool(((y.double() - ref.double()).abs() <= bound).all())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_matmul_bit_for_bit_when_sums_are_exact(isa, dtype):
    # small-integer x times weights with an 8/11-bit mantissa: every fp32 partial sum is exact in any order
    qw, x, _ = _case(48, 128, 4, dtype, QuantConfig("nf4", True, 64), False, integer_x=True)
    qw.nested_absmax = None  # plain fp32 absmax of exactly 1: weights are the code levels themselves
    qw.absmax = torch.ones(qw.absmax.numel())  # new tensors: gemv_args rebuilds its cached arguments
    assert torch.equal(_decode(qw, x, None, isa), F.linear(x, qw.dequantize(dtype)))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 16])
@pytest.mark.parametrize("n,k,blocksize", [(13, 2048, 64), (6, 192, 64), (7, 1024, 256), (5, 640, 128)])
def test_decode_matmul_bit_for_bit_with_real_scales(isa, m, n, k, blocksize):
    """Every weight the dequantized one, rounding of code * absmax to bf16 included: with absmax in [0.5, 1) the
    bf16 weights are multiples of 2^-12 below 1, so small-integer x gives exact fp32 sums in any order. The
    shapes walk the multi-row kernel's tails: output rows left over from passes of four or two, a row's last
    absmax chunk shorter than 16 blocks (192 / 64, 640 / 128) or exactly 16 and more (2048 / 64), and every
    count of x rows it splits into passes."""
    gen = torch.Generator().manual_seed(n * k + m)
    qw, x, _ = _case(n, k, m, torch.bfloat16, QuantConfig("nf4", False, blocksize), False, integer_x=True)
    qw.absmax = 0.5 + 0.5 * torch.rand(qw.absmax.numel(), generator=gen)
    assert torch.equal(_decode(qw, x, None, isa), F.linear(x, qw.dequantize(torch.bfloat16)))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("blocksize", [32, 64])  # at isa 3: the one-row kernel, then the multi-row one
def test_decode_matmul_with_denormal_weights(isa, blocksize):
    """A row scaled so small that its weights are denormals. vdpbf16ps (isa 3) reads denormal inputs as zero, in
    the one-row and the multi-row kernel alike (the latter's table conversion flushes them already): that row
    gives 0, within k * 2^-126 * max|x| of the reference. The other kernels keep them; other rows are exact."""
    qw, x, _ = _case(8, 128, 1, torch.bfloat16, QuantConfig("nf4", False, blocksize), False, integer_x=True)
    qw.absmax = torch.ones(qw.absmax.numel())
    per_row = 128 // blocksize
    qw.absmax[per_row:2 * per_row] = 2.0**-127  # all of row 1
    wd = qw.dequantize(torch.bfloat16)
    assert wd[1].float().abs().max() < torch.finfo(torch.float32).tiny and bool((wd[1] != 0).any())
    x = x * 2.0**100  # the tiny products near fp32's normal range; the sums exact
    ref, y = F.linear(x, wd), _decode(qw, x, None, isa)
    rows = [0] + list(range(2, 8))
    assert torch.equal(y[:, rows], ref[:, rows])
    if isa == 3:
        assert y[0, 1] == 0 and (ref[0, 1] - y[0, 1]).abs() <= 128 * 2.0**-126 * x.float().abs().max()
    else:
        assert torch.equal(y, ref)


def test_decode_matmul_refuses_what_it_cannot_tile():
    qw, x, _ = _case(8, 48, 1, torch.bfloat16, QuantConfig(), False)  # 48 % 32 != 0
    assert qw.decode_matmul(x) is None
    qw, x, _ = _case(8, 64, 17, torch.bfloat16, QuantConfig(), False)  # more rows than the kernel holds
    assert qw.decode_matmul(x) is None


def test_linear_4bit_decodes_without_grad_and_keeps_autograd_with_it(monkeypatch):
    qw, x, b = _case(64, 128, 2, torch.bfloat16, QuantConfig(), True)
    calls = []
    real = _native.gemm_4bit
    monkeypatch.setattr(_native, "gemm_4bit", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        fast = linear_4bit(x, qw, b)
    assert calls == [1]
    xg = x.clone().requires_grad_(True)
    slow = linear_4bit(xg, qw, b)
    slow.sum().backward()
    assert calls == [1] and xg.grad is not None  # the training path never takes the kernel
    scale = F.linear(x.double().abs(), qw.dequantize(torch.bfloat16).double().abs()) + b.double().abs()
    assert bool(((fast.double() - slow.double()).abs() <= _ulp(slow.double(), torch.bfloat16) + 2**-18 * scale).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_lora_decode_equals_the_unfused_path(dtype):
    """Base matmul plus each row's LoRA delta in one call (QLinear._decode) against QLinear's own unfused path
    (the same kernel for the base, torch for the adapters): the same roundings, sums in another order."""
    torch.manual_seed(0)
    qw, _, b = _case(160, 128, 1, dtype, QuantConfig(), True)
    layer = QLinear(qw, b, compute_dtype=dtype)
    for name in ("a", "b"):
        layer.add_adapter(name, LoraConfig(r=8, alpha=16))
        torch.nn.init.normal_(layer.lora_B[name].weight, std=0.5)
    x = torch.randn(5, 2, 128).to(dtype)  # five sequences of two tokens
    with torch.no_grad(), route_rows([layer], {"a": torch.tensor([0, 3]), "b": torch.tensor([1])}):
        fused = layer(x)
        layer._decode = lambda x: None  # the unfused path, as before the fusion
        unfused = layer(x)
    assert fused.dtype == dtype
    tol = 2**-7 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(fused.float(), unfused.float(), rtol=tol, atol=tol)
    assert torch.equal(fused[[2, 4]], unfused[[2, 4]])  # rows without an adapter: the same kernel call


def test_fused_lora_decode_is_the_same_on_any_thread_count():
    """Big enough for the kernel to split the outputs over threads, adapters' part included (A x by (row, rank),
    B (A x) by each thread's outputs): every value is computed the same way whatever the split, so the bits
    equal one thread's -- and the unfused path's within rounding."""
    torch.manual_seed(0)
    qw, _, b = _case(1030, 512, 1, torch.bfloat16, QuantConfig(), True)  # 1030: a pass's rows left over
    layer = QLinear(qw, b)
    for name in ("a", "b"):
        layer.add_adapter(name, LoraConfig(r=8, alpha=16))
        torch.nn.init.normal_(layer.lora_B[name].weight, std=0.5)
    x = torch.randn(3, 1, 512).to(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        with torch.no_grad(), route_rows([layer], {"a": torch.tensor([0]), "b": torch.tensor([2])}):
            torch.set_num_threads(1)
            one = layer(x)
            torch.set_num_threads(2)
            two = layer(x)
            layer._decode = lambda x: None
            unfused = layer(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert torch.allclose(two.float(), unfused.float(), rtol=2**-7, atol=2**-7)


def test_qlinear_decode_with_adapters_matches_the_prefill_path():
    torch.manual_seed(0)
    qw, x, _ = _case(96, 128, 3, torch.bfloat16, QuantConfig(), False)
    layer = QLinear(qw)
    layer.add_adapter("a", LoraConfig(r=4))
    torch.nn.init.normal_(layer.lora_B["a"].weight)
    xs = x.reshape(3, 1, 128)  # three decode rows of one token each
    with torch.no_grad():
        fast = layer(xs)
        with route_rows([layer], {"a": torch.tensor([0, 2])}):
            mixed = layer(xs)
    slow = layer(xs.clone().requires_grad_(True)).detach()
    assert torch.allclose(fast.float(), slow.float(), rtol=2e-2, atol=2e-2)
    base = linear_4bit(xs[1:2], qw).detach()
    assert torch.allclose(mixed[0].float(), fast[0].float(), atol=1e-2) and torch.equal(mixed[1:2], base)


def test_fused_decode_sees_adapters_changed_in_place_between_calls():
    """The kernel's arguments are cached per batch composition; an adapter trained in place (same storage, as an
    optimizer step leaves it) must not be served from a stale copy."""
    torch.manual_seed(0)
    qw, _, _ = _case(64, 128, 1, torch.bfloat16, QuantConfig(), False)
    layer = QLinear(qw)
    layer.add_adapter("a", LoraConfig(r=4))
    x = torch.randn(2, 1, 128).to(torch.bfloat16)
    with torch.no_grad():
        before = layer(x)
        layer.lora_B["a"].weight.normal_()  # in place: same data_ptr, new version
        after = layer(x)
        layer._decode = lambda x: None
        unfused = layer(x)
    assert not torch.equal(before, after)
    assert torch.allclose(after.float(), unfused.float(), rtol=2**-7, atol=2**-7)


def test_dense_decode_head_matches_f_linear():
    from qlora_kit.lora import DecodeLinear

    torch.manual_seed(0)
    head = torch.nn.Linear(96, 200, bias=True).to(torch.bfloat16)
    ref_w, ref_b = head.weight.clone(), head.bias.clone()
    head.__class__ = DecodeLinear
    for m in (1, 3, 16):
        x = torch.randn(m, 96).to(torch.bfloat16)
        with torch.no_grad():
            y = head(x)
        ref = F.linear(x, ref_w, ref_b)
        scale = F.linear(x.double().abs(), ref_w.double().abs()) + ref_b.double().abs()
        bound = _ulp(ref.double(), torch.bfloat16) + 2 * 96 * 2.0**-24 * scale
        assert bool(((y.double() - ref.double()).abs() <= bound).all())
        for isa in ISAS:  # every kernel this machine has, the portable one included
            yi = _native.dense_gemm(x, ref_w, ref_b, isa=isa)
            assert bool(((yi.double() - ref.double()).abs() <= bound).all())
    xg = torch.randn(2, 96).to(torch.bfloat16).requires_grad_(True)
    head(xg).sum().backward()  # training: nn.Linear's own path, differentiable
    assert xg.grad is not None


def test_decode_reuses_its_kernel_arguments_across_steps_of_one_batch(monkeypatch):
    """A server enters per_row_adapters anew for every decode step; the same composition must not rebuild the
    kernel's LoRA arguments (B transposed) in every layer at every step, and a new composition must."""
    from qlora_kit.lora import RowGroups

    torch.manual_seed(0)
    qw, _, _ = _case(64, 128, 1, torch.bfloat16, QuantConfig(), False)
    layer = QLinear(qw)
    for name in ("a", "b"):
        layer.add_adapter(name, LoraConfig(r=4))
    built = []
    real = _native.lora_args
    monkeypatch.setattr(_native, "lora_args", lambda *a: built.append(1) or real(*a))
    x = torch.randn(3, 1, 128).to(torch.bfloat16)
    with torch.no_grad():
        for names in (["a", "b", None], ["a", "b", None], ["b", "b", None]):
            with route_rows([layer], RowGroups(names)):
                layer(x)
    assert len(built) == 2
