"""QLinear's fused training path (`_LoraTrainLinear`) against the unfused one it replaces: the same loss and the
same LoRA gradients bit for bit, with and without gradient checkpointing, for folded and unfolded scales; and
two dequantizes per layer per step under checkpointing instead of three."""

from __future__ import annotations

import pytest
import torch

from qlora_kit import lora as lora_mod
from qlora_kit.loader import load_quantized
from qlora_kit.lora import LoraConfig, QLinear, lora_parameters
from qlora_kit.loss import token_loss_sum
from qlora_kit.quant import QuantizedWeight

from test_loss import _batch


def _step(model, batch):
    params = lora_parameters(model)
    for p in params.values():
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = token_loss_sum(model, batch)
    total.backward()
    return total.detach(), {k: p.grad.clone() for k, p in params.items()}


@pytest.mark.parametrize("alpha", [8.0, 6.0, 2.0])  # scale 2 (folded), 1.5 and 0.5 (multiplied)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_training_path_equals_the_unfused_one_bit_for_bit(checkpoints, alpha, checkpointing, monkeypatch):
    torch.manual_seed(0)
    model = load_quantized(checkpoints["llama"], lora=LoraConfig(r=4, alpha=alpha))
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.normal_(0, 0.1)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = _batch(model.config.vocab_size)
    calls = []
    monkeypatch.setattr(lora_mod._LoraTrainLinear, "apply", _counting(lora_mod._LoraTrainLinear.apply, calls))
    new_loss, new_grads = _step(model, batch)
    assert calls, "the fused path did not run"
    monkeypatch.setattr(QLinear, "_fused_training", lambda self, x: False)
    ref_loss, ref_grads = _step(model, batch)
    assert torch.equal(new_loss, ref_loss)
    for k in ref_grads:
        assert torch.equal(new_grads[k], ref_grads[k]), k


def _counting(fn, calls):
    def wrapped(*args):
        calls.append(1)
        return fn(*args)
    return wrapped


def test_checkpointed_step_dequantizes_each_layer_twice(checkpoints, monkeypatch):
    model = load_quantized(checkpoints["llama"], lora=LoraConfig(r=4, alpha=8))
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = sum(isinstance(m, QLinear) for m in model.modules())
    count = []
    dequantize = QuantizedWeight.dequantize
    monkeypatch.setattr(QuantizedWeight, "dequantize", lambda self, *a, **k: count.append(1) or dequantize(self, *a, **k))
    _step(model, _batch(model.config.vocab_size))
    assert len(count) == 2 * layers
