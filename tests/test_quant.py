"""QuantizedWeight against bitsandbytes: same bits, same values, same serialized layout."""

import pytest
import torch
from bitsandbytes import functional as bnbf
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

from qlora_kit.errors import CheckpointError, ConfigError
from qlora_kit.quant import QuantConfig, QuantizedWeight, code_table

SHAPES = [(64, 64), (96, 33), (1, 7), (3,), (300, 129), (1024, 70), (48, 80)]


def bnb_reference_dequant(packed, state, dtype):
    """bitsandbytes' reference dequantize. Its public CPU function (0.50.2, AVX-512) reads the wrong absmax when
    the last dim is a multiple of 16 but not of the blocksize (see test_bitsandbytes_cpu_dequant_bug)."""
    absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    code = bnbf.get_4bit_type(state.quant_type, device="cpu")
    return _dequantize_4bit_compute(packed.reshape(-1), absmax, code, state.blocksize, state.shape, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", SHAPES)
def test_double_quant_bit_identical_to_bitsandbytes(shape, quant_type, dtype):
    torch.manual_seed(hash((shape, quant_type)) % 1000)
    w = (torch.randn(shape) * 0.7).to(dtype)
    ours = QuantizedWeight.quantize(w, QuantConfig(quant_type, True, 64))
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
    assert torch.equal(ours.packed, packed.reshape(-1))
    assert torch.equal(ours.absmax, state.absmax)
    assert torch.equal(ours.nested_absmax, state.state2.absmax)
    assert torch.equal(ours.nested_code, state.state2.code)
    assert torch.equal(ours.offset, state.offset)
    assert torch.equal(ours.dequantize(), bnb_reference_dequant(packed, state, dtype))
    if shape[-1] % 64 == 0 or shape[-1] % 16:
        assert torch.equal(ours.dequantize().reshape(-1), bnbf.dequantize_4bit(packed, state).reshape(-1))


def test_bitsandbytes_cpu_dequant_bug():
    """Where bitsandbytes' public CPU dequantize is wrong, ours stays at NF4's usual error (~9% relative)."""
    w = torch.randn(48, 80)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    rel = lambda d: ((d.float() - w).norm() / w.norm()).item()  # noqa: E731
    ours = QuantizedWeight.quantize(w, QuantConfig(double_quant=False)).dequantize()
    assert rel(ours) < 0.12
    assert torch.equal(ours, bnb_reference_dequant(packed, state, torch.float32))
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert rel(bnbf.dequantize_4bit(packed, state)) > 0.15


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_plain_absmax_every_blocksize(blocksize):
    w = torch.randn(37, 129, dtype=torch.bfloat16)
    ours = QuantizedWeight.quantize(w, QuantConfig("nf4", False, blocksize))
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    assert ours.nested_absmax is None
    assert torch.equal(ours.packed, packed.reshape(-1)) and torch.equal(ours.absmax, state.absmax)
    assert torch.equal(ours.dequantize(), bnb_reference_dequant(packed, state, torch.bfloat16))


def test_bits_per_param():
    assert QuantConfig().bits_per_param() == pytest.approx(4.127, abs=5e-4)
    assert QuantConfig(double_quant=False).bits_per_param() == 4.5
    qw = QuantizedWeight.quantize(torch.randn(4096, 4096, dtype=torch.bfloat16))
    assert qw.bits_per_param() == pytest.approx(QuantConfig().bits_per_param(), rel=1e-3)


def test_roundtrip_error_is_bounded():
    """Each element lands within half the widest gap between NF4 levels (times its block's absmax)."""
    w = torch.randn(256, 256)
    qw = QuantizedWeight.quantize(w, QuantConfig(double_quant=False))
    half_gap = (code_table("nf4").diff().max() / 2).item()
    err = (qw.dequantize() - w).abs().reshape(-1, 64).amax(1)
    scale = w.abs().reshape(-1, 64).amax(1)
    assert (err <= half_gap * scale * (1 + 1e-6)).all()
    assert ((qw.dequantize() - w).pow(2).mean() / w.pow(2).mean()) < 0.012


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_roundtrip_and_bitsandbytes_reads_it(double_quant):
    w = torch.randn(48, 128, dtype=torch.bfloat16)
    qw = QuantizedWeight.quantize(w, QuantConfig(double_quant=double_quant))
    sd = qw.state_dict("weight")
    again = QuantizedWeight.from_state_dict(sd)
    assert torch.equal(again.dequantize(), qw.dequantize())
    state = bnbf.QuantState.from_dict({k: v for k, v in sd.items() if k != "weight"}, device="cpu")
    assert torch.equal(bnbf.dequantize_4bit(sd["weight"], state), qw.dequantize())


def test_to_moves_without_requantizing():
    qw = QuantizedWeight.quantize(torch.randn(16, 64))
    moved = qw.to("cpu")
    assert moved is not qw and torch.equal(moved.packed, qw.packed) and moved.shape == qw.shape


@pytest.mark.parametrize("device", ["meta", *(["cuda"] if torch.cuda.is_available() else [])])
def test_to_another_device_type_moves_every_tensor_as_it_is(device):
    qw = QuantizedWeight.quantize(torch.randn(16, 64))
    moved = qw.to(device)
    tensors = ("packed", "absmax", "nested_absmax", "nested_code", "offset")
    assert moved.device.type == device and all(getattr(moved, t).device.type == device for t in tensors)
    assert all(getattr(moved, t).shape == getattr(qw, t).shape and getattr(moved, t).dtype == getattr(qw, t).dtype
               for t in tensors)
    assert (moved.shape, moved.dtype, moved.blocksize, moved.quant_type) == (qw.shape, qw.dtype, 64, "nf4")
    assert qw.device.type == "cpu"  # the original stays where it was
    if device != "meta":
        back = moved.to("cpu")
        assert all(torch.equal(getattr(back, t), getattr(qw, t)) for t in tensors)


def test_inconsistent_state_is_a_checkpoint_error():
    sd = QuantizedWeight.quantize(torch.randn(16, 64)).state_dict()
    sd["weight"] = sd["weight"][:-3]
    with pytest.raises(CheckpointError, match="do not match shape"):
        QuantizedWeight.from_state_dict(sd)


@pytest.mark.parametrize("kwargs", [{"type": "int4"}, {"blocksize": 48}, {"blocksize": 8192}, {"double_quant": 1}])
def test_bad_quant_config(kwargs):
    with pytest.raises(ConfigError):
        QuantConfig(**kwargs)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_code_tables_are_bitsandbytes_bit_for_bit(quant_type):
    """qlora_kit.codes rebuilds bitsandbytes' tables so CPU work never imports it; they must not drift apart."""
    from qlora_kit import codes

    theirs = bnbf.get_4bit_type(quant_type, device="cpu")
    assert torch.equal(code_table(quant_type).view(torch.int32), theirs.view(torch.int32))  # -0.0 included
    assert torch.equal(codes.dynamic_map().view(torch.int32), bnbf.create_dynamic_map(signed=True).view(torch.int32))


def test_cpu_work_never_imports_bitsandbytes():
    """Its import costs ~3 s (torch._dynamo); quantize, export, plan and CPU training don't need it."""
    import subprocess
    import sys

    code = ("import sys, torch, qlora_kit.cli, qlora_kit.export, qlora_kit.plan, qlora_kit.train, qlora_kit.generate\n"
            "from qlora_kit.quant import QuantizedWeight\n"
            "q = QuantizedWeight.quantize(torch.randn(64, 96).bfloat16()); q.dequantize(); q.state_dict()\n"
            "print('bitsandbytes' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
