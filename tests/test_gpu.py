"""CUDA checks (`pytest -m gpu`, run by `tools/bench.py --gpu`): the decode path and a training step on the GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qlora_kit.lora import linear_4bit
from qlora_kit.quant import QuantConfig, QuantizedWeight

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("config", [QuantConfig("nf4", True, 64), QuantConfig("fp4", False, 128)])
def test_gemv_4bit_equals_dequantize_and_matmul(dtype, config):
    gen = torch.Generator("cuda").manual_seed(0)
    w = torch.randn(1024, 2048, device="cuda", generator=gen).to(dtype)
    qw = QuantizedWeight.quantize(w, config)
    x = torch.randn(1, 1, 2048, device="cuda", generator=gen).to(dtype)
    bias = torch.randn(1024, device="cuda", generator=gen).to(dtype)
    fast = qw.decode_matmul(x, bias)
    assert fast is not None and fast.shape == (1, 1, 1024) and fast.dtype == dtype
    wd = qw.dequantize(dtype)
    ref = F.linear(x, wd, bias)
    # each weight is the dequantized one; bitsandbytes' kernel sums in its own order (fp32 accumulators)
    scale = F.linear(x.double().abs(), wd.double().abs()) + bias.double().abs()
    eps = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 2**-23}[dtype]
    assert bool(((fast.double() - ref.double()).abs() <= eps * (ref.double().abs() + 1e-3 * scale)).all())
    with torch.no_grad():  # and linear_4bit takes it for one row without grad, never for more
        assert torch.equal(linear_4bit(x, qw, bias), fast)
    assert qw.decode_matmul(torch.cat([x, x], dim=1)) is None


def test_training_step_on_cuda_learns_and_matches_the_plain_loss(checkpoints, tmp_path):
    from qlora_kit.loader import load_quantized
    from qlora_kit.loss import token_loss_sum
    from qlora_kit.lora import LoraConfig, lora_parameters

    from test_loss import _batch, plain_loss_sum

    torch.manual_seed(0)
    model = load_quantized(checkpoints["llama"], lora=LoraConfig(r=4, alpha=8), device="cuda")
    params = lora_parameters(model)
    assert all(p.device.type == "cuda" for p in params.values())
    batch = {k: v.cuda() for k, v in _batch(model.config.vocab_size).items()}
    model.train()
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    losses = []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, n = token_loss_sum(model, batch)
            ref = plain_loss_sum(model, batch)
        assert torch.allclose(loss, ref, rtol=1e-5)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item() / n)
    assert losses[-1] < losses[0]
