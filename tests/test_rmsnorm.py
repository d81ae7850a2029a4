"""The native RMSNorm (qlora_kit/rmsnorm.py, csrc/rmsnorm.c): transformers' numbers to fp32 rounding, forward and
backward, for the dtype pairs models train in; which modules take it; and every path that must not."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model
from test_loss import assert_one_ulp
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from qlora_kit import rmsnorm

needs_native = pytest.mark.skipif(rmsnorm._RMSNORM is None, reason="the native RMSNorm (_rmsnorm) is not built")


def _norm(d: int, dtype: torch.dtype, seed: int = 0) -> LlamaRMSNorm:
    gen = torch.Generator().manual_seed(seed)
    norm = LlamaRMSNorm(d, eps=1e-5)
    norm.weight.data = (1 + 0.2 * torch.randn(d, generator=gen)).to(dtype)
    return norm.requires_grad_(False)


def _forward_backward(norm: torch.nn.Module, x: torch.Tensor, g: torch.Tensor):
    x = x.clone().requires_grad_(True)
    y = norm(x)
    (gx,) = torch.autograd.grad(y, x, g)
    return y, gx


@needs_native
@pytest.mark.parametrize("dtype,wdtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                          (torch.float16, torch.float16), (torch.float32, torch.float32)])
@pytest.mark.parametrize("d", [7, 64, 576])  # under one 16-lane vector, whole vectors, a real model's width
def test_matches_transformers(dtype, wdtype, d):
    gen = torch.Generator().manual_seed(d)
    x = (torch.randn(3, 41, d, generator=gen) * 3).to(dtype)
    x[0, 0] = 0  # a zero row: 1/rms is 1/sqrt(eps), the gradient finite
    norm = _norm(d, wdtype)
    g = torch.randn(3, 41, d, generator=gen).to(torch.promote_types(dtype, wdtype))
    y_ref, gx_ref = _forward_backward(norm, x, g)
    assert rmsnorm.use_native_rms_norm(norm) == 1 and type(norm).__name__ == "NativeLlamaRMSNorm"
    y, gx = _forward_backward(norm, x, g)
    assert y.dtype == y_ref.dtype and gx.dtype == gx_ref.dtype == dtype and y.shape == y_ref.shape
    if dtype == wdtype != torch.float32:  # one 16-bit rounding after the fp32 math: one ulp, at rare elements
        assert_one_ulp(y, y_ref, share=2e-3)
        assert_one_ulp(gx, gx_ref, share=2e-3)
    else:  # fp32 outputs show the sums' grouping; an fp32 output of a 16-bit normalised value, its rare flips
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(y, y_ref, **tol)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-2 if dtype != torch.float32 else 1e-4,
                                   atol=1e-3 * float(gx_ref.abs().max()))
    assert torch.isfinite(gx[0, 0]).all()


@needs_native
def test_backward_keeps_no_fp32_copy():
    x = torch.randn(64, 576, dtype=torch.bfloat16, requires_grad=True)
    norm = _norm(576, torch.bfloat16)
    rmsnorm.use_native_rms_norm(norm)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        norm(x)
    assert sum(t.numel() * t.element_size() for t in saved) <= x.numel() * 2 + 576 * 2 + 64 * 4


@needs_native
def test_falls_back_where_it_must():
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    norm = _norm(64, torch.bfloat16)
    with torch.no_grad():
        ref = norm(x)
    rmsnorm.use_native_rms_norm(norm)
    with torch.no_grad():  # inference: transformers' own path, bit for bit
        assert torch.equal(norm(x), ref)
    norm.weight.requires_grad_(True)  # a trained norm weight: autograd's path, which gives its gradient
    norm(x).sum().backward()
    assert norm.weight.grad is not None
    norm.weight.requires_grad_(False)
    x16 = torch.randn(5, 64, dtype=torch.float16, requires_grad=True)  # an fp16 input to a bf16 weight
    assert norm(x16).dtype == torch.float32  # torch's promotion, through the module's own forward


@needs_native
@pytest.mark.parametrize("arch,expected", [("llama", 5), ("qwen2", 5), ("mistral", 5), ("phi3", 5), ("gemma", 0),
                                           ("gpt2", 0)])
def test_which_modules(arch, expected):
    """Llama's norm and its copies (2 layers x 2 + the final one); Gemma's 1 + weight norm and GPT-2's LayerNorm
    keep their own."""
    model = make_model(arch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert rmsnorm.use_native_rms_norm(model) == expected
    assert rmsnorm.use_native_rms_norm(model) == 0  # once
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)


@needs_native
def test_training_step_matches_the_torch_norm():
    """A whole bf16 forward and backward of a tiny Llama: the loss and every gradient as with transformers' norm."""
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 24))
    grads = []
    for native in (False, True):
        model = make_model("llama").train()
        model.model.embed_tokens.weight.requires_grad_(False)
        for n, p in model.named_parameters():
            p.requires_grad_("proj" in n)
        if native:
            assert rmsnorm.use_native_rms_norm(model) == 5
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = grads
    torch.testing.assert_close(l1, l0, rtol=1e-2, atol=1e-2)
    assert g0.keys() == g1.keys() and g0
    for n in g0:
        torch.testing.assert_close(g1[n].float(), g0[n].float(), rtol=0.05, atol=0.02 * float(g0[n].abs().max()))
