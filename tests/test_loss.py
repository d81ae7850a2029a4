"""The loss over trained positions only (qlora_kit.loss) against the plain path it replaces: full logits, an fp32
copy, F.cross_entropy with ignore_index. Same loss (to the order of the fp32 sum), same LoRA gradients: bit for
bit on the chunked torch path, to fp32 rounding on the native kernel (csrc/xent.c)."""

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


needs_native = pytest.mark.skipif(loss_mod._XENT is None, reason="the native cross-entropy (_xent) is not built")


@pytest.fixture(params=["native", "chunked"])
def xent_path(request, monkeypatch):
    """Each test below runs on the native kernel and on torch's chunked cross-entropy (its fallback)."""
    if request.param == "native" and loss_mod._XENT is None:
        pytest.skip("the native cross-entropy (qlora_kit._xent) is not built")
    if request.param == "chunked":
        monkeypatch.setattr(loss_mod, "_XENT", None)
    return request.param


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])  # gemma2: logit soft-capping after the head
def test_loss_and_gradients_equal_the_plain_path(checkpoints, arch, monkeypatch, xent_path):
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
        if xent_path == "chunked":
            assert torch.equal(new_grads[k], ref_grads[k]), k
        else:  # a logit gradient may round to the neighbouring bf16 value (see test_native_cross_entropy_*)
            scale = float(ref_grads[k].abs().max())
            torch.testing.assert_close(new_grads[k], ref_grads[k], rtol=1e-2, atol=1e-2 * scale)
    _, n = loss_mod.token_loss_sum(model, batch)
    assert n == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def test_cross_entropy_saves_the_low_precision_logits(xent_path):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 33, generator=gen).bfloat16().requires_grad_(True)
    targets = torch.randint(0, 33, (50,), generator=gen)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        total = loss_mod.cross_entropy_sum(logits, targets)
    # the native path keeps each row's max and log-sum-exp: two floats a row, never a row of the vocabulary
    assert all(t.dtype != torch.float32 or t.numel() <= 2 * logits.shape[0] for t in saved if t.is_floating_point())
    total.backward()
    ref = logits.detach().clone().requires_grad_(True)
    F.cross_entropy(ref.float(), targets, reduction="sum").backward()
    if xent_path == "chunked":
        assert torch.equal(logits.grad, ref.grad)
    else:
        assert_one_ulp(logits.grad, ref.grad, share=5e-3)


def assert_one_ulp(got: torch.Tensor, ref: torch.Tensor, share: float = 1e-3) -> None:
    """got equals ref but at a few elements (under `share` of them), which are one unit in ref's last place off."""
    diff = got != ref
    assert float(diff.float().mean()) <= share, f"{int(diff.sum())} of {diff.numel()} elements differ"
    ulp = (ref.float().abs() * torch.finfo(ref.dtype).eps).clamp_min(torch.finfo(ref.dtype).tiny)
    assert bool(((got.float() - ref.float()).abs() <= ulp)[diff].all())


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("vocab", [1, 17, 4099])  # below one 16-lane vector, with a tail, many vectors
def test_native_cross_entropy_matches_torch(dtype, vocab):
    gen = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(37, vocab, generator=gen) * 4).to(dtype)
    logits[3, : vocab // 2] = float("-inf")  # a masked part of the vocabulary: probability 0, gradient 0
    logits[5] += 60  # far from 0: the max is subtracted before exp
    targets = torch.randint(0, vocab, (37,), generator=gen)
    targets[3] = vocab - 1
    ref_in = logits.float().requires_grad_(True)
    ref = F.cross_entropy(ref_in, targets, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref * 0.3, ref_in)
    x = logits.clone().requires_grad_(True)
    total = loss_mod.cross_entropy_sum(x, targets)
    (grad,) = torch.autograd.grad(total * 0.3, x)
    assert total.dtype == torch.float32 and torch.allclose(total, ref, rtol=1e-6, atol=1e-6)
    assert grad.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
    else:
        assert_one_ulp(grad, ref_grad.to(dtype), share=2e-2)


@needs_native
def test_native_cross_entropy_refuses_a_target_outside_the_vocabulary():
    with pytest.raises(IndexError, match="outside"):
        loss_mod.cross_entropy_sum(torch.zeros(2, 5, requires_grad=True), torch.tensor([1, 5]))
    total = loss_mod.cross_entropy_sum(torch.zeros(0, 5, requires_grad=True), torch.zeros(0, dtype=torch.long))
    assert float(total.detach()) == 0.0


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
