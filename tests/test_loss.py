"""The loss over trained positions only (qlora_kit.loss) against the plain path it replaces: full logits, an fp32
copy, F.cross_entropy with ignore_index. Same loss (to the order of the fp32 sum), same LoRA gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qlora_kit import loss as loss_mod
from qlora_kit.data import IGNORE_INDEX
from qlora_kit.loader import load_quantized
from qlora_kit.lora import LoraConfig, lora_parameters


def plain_loss_sum(model, batch):
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    logits = model(**inputs, use_cache=False).logits
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def _batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 24), generator=gen)
    labels = ids.clone()
    labels[:, :10] = IGNORE_INDEX  # the prompt
    labels[2, 18:] = IGNORE_INDEX  # padding
    mask = torch.ones_like(ids)
    mask[2, 18:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _grads(model, fn, batch):
    params = lora_parameters(model)
    for p in params.values():
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total = fn(model, batch)
        total = total[0] if isinstance(total, tuple) else total
    (total / 7).backward()
    return total.detach(), {k: p.grad.clone() for k, p in params.items()}


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])  # gemma2: logit soft-capping after the head
def test_loss_and_gradients_equal_the_plain_path(checkpoints, arch, monkeypatch):
    torch.manual_seed(0)
    model = load_quantized(checkpoints[arch], lora=LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for key, p in lora_parameters(model).items():
            p.normal_(0, 0.1)
    model.train()
    batch = _batch(model.config.vocab_size)
    ref_loss, ref_grads = _grads(model, plain_loss_sum, batch)
    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 5 * model.config.vocab_size)  # several chunks
    new_loss, new_grads = _grads(model, loss_mod.token_loss_sum, batch)
    assert torch.allclose(new_loss, ref_loss, rtol=1e-6, atol=0)
    for k in ref_grads:
        assert torch.equal(new_grads[k], ref_grads[k]), k
    _, n = loss_mod.token_loss_sum(model, batch)
    assert n == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def test_chunked_cross_entropy_saves_the_low_precision_logits():
    logits = torch.randn(50, 33, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 33, (50,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        total = loss_mod.cross_entropy_sum(logits, targets)
    assert all(t.dtype != torch.float32 or t.numel() <= 1 for t in saved if t.is_floating_point())
    total.backward()
    ref = logits.detach().clone().requires_grad_(True)
    F.cross_entropy(ref.float(), targets, reduction="sum").backward()
    assert torch.equal(logits.grad, ref.grad)


def test_lora_input_skips_the_fp32_round_trip_bit_for_bit():
    """Under autocast the adapter's fp32 input would be cast straight back to bf16: skipping it changes nothing."""
    from qlora_kit.lora import QLinear
    from qlora_kit.quant import QuantizedWeight

    torch.manual_seed(0)
    layer = QLinear(QuantizedWeight.quantize(torch.randn(64, 96, dtype=torch.bfloat16)))
    layer.add_adapter("a", LoraConfig(r=4))
    torch.nn.init.normal_(layer.lora_B["a"].weight)
    x = torch.randn(2, 5, 96, dtype=torch.bfloat16, requires_grad=True)
    a, b = layer.lora_A["a"], layer.lora_B["a"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = layer.lora_delta(x, "a")
        ref = b(a(x.to(torch.float32))) * layer.scaling["a"]
    assert fast.dtype == ref.dtype and torch.equal(fast, ref)
    (g_fast,) = torch.autograd.grad(fast.sum(), a.weight)
    (g_ref,) = torch.autograd.grad(ref.sum(), a.weight)
    assert torch.equal(g_fast, g_ref)
