"""Per-example attention and padding-free batches: the same attention, loss and gradients as the masked row and
the padded batch, on every architecture the kit trains, and no row-wide mask built for a packed row."""

from __future__ import annotations

import pytest
import torch
from conftest import CAUSAL, make_model

from qlora_kit import attention
from qlora_kit.attention import PER_EXAMPLE, example_spans, packed_rows, span_mask, use_per_example_attention
from qlora_kit.batching import collate, collate_packed, packed_attention_mask
from qlora_kit.data import Example
from qlora_kit.loss import token_loss_sum


def examples(lengths, seed=0) -> list[Example]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(4, 128, (n,), generator=gen).tolist()
        out.append(Example(ids, [-100] * (n // 3) + ids[n // 3:]))  # a prompt part, then trained tokens
    return out


def loss_and_grads(model, batch):
    model.zero_grad()
    loss, n = token_loss_sum(model, batch)
    loss.backward()
    return loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def fp32_model(arch: str):
    model = make_model(arch, dtype=torch.float32).train()
    with torch.no_grad():  # conftest's wide init saturates softmax; attention must matter for the check to bite
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(0.1)
    return model


@pytest.mark.parametrize("arch", CAUSAL)
def test_padding_free_batch_trains_what_the_padded_batch_trains(arch):
    """Same loss, same token count, gradients equal to rounding, with per-example attention where the model
    runs sdpa and transformers' own packed mask elsewhere."""
    model = fp32_model(arch)
    exs = examples([7, 19, 3, 12])
    ref_loss, ref_n, ref_grads = loss_and_grads(model, collate(exs, pad_id=0))
    use_per_example_attention(model)
    loss, n, grads = loss_and_grads(model, collate_packed([exs], pad_id=0))
    assert n == ref_n
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "phi3", "gemma", "gpt2"])
def test_per_example_attention_equals_the_row_mask(arch):
    model = fp32_model(arch)
    model.set_attn_implementation("sdpa")
    batch = collate_packed([examples([5, 9, 3]), examples([12, 5], seed=1)], pad_id=0)  # 5: one call, two rows
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    masked = model(**inputs).logits
    assert use_per_example_attention(model) and model.config._attn_implementation == PER_EXAMPLE
    with packed_rows():
        split = model(**inputs).logits
    torch.testing.assert_close(split, masked, rtol=1e-5, atol=1e-5)


def test_a_packed_row_builds_no_mask_and_a_padded_batch_keeps_its_own(monkeypatch):
    model = fp32_model("llama")
    use_per_example_attention(model)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, attn_mask=None, **kw: seen.append((q.shape[2], attn_mask)) or sdpa(
                            q, *a, attn_mask=attn_mask, **kw))
    exs = examples([5, 9, 3, 5])
    with torch.no_grad():
        token_loss_sum(model, collate_packed([exs], pad_id=0))
    assert sorted(n for n, _ in seen) == [3, 3, 5, 5, 9, 9] and all(m is None for _, m in seen)  # per length
    seen.clear()
    with torch.no_grad():
        token_loss_sum(model, collate(exs, pad_id=0))
    assert {n for n, _ in seen} == {9} and all(m is not None for _, m in seen)  # the padded batch: sdpa's mask


def test_a_window_shorter_than_an_example_keeps_the_masked_path():
    """Mistral with a 4-token window: the per-example kernel would see too far back, so sdpa's own sliding mask
    runs, and the result is the masked row's."""
    model = make_model("mistral", dtype=torch.float32)
    model.config.sliding_window = 4
    batch = collate_packed([examples([9, 6])], pad_id=0)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    with torch.no_grad():
        masked = model(**inputs).logits
        use_per_example_attention(model)
        with packed_rows():
            split = model(**inputs).logits
    torch.testing.assert_close(split, masked, rtol=1e-5, atol=1e-5)


def test_spans_and_their_mask():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 0, 1]])
    spans = example_spans(positions)
    assert spans == [[(0, 3), (3, 5), (5, 9)], [(0, 7), (7, 9)]]
    assert example_spans(torch.arange(6)[None].expand(2, 6)) is None
    seq = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [0] * 7 + [1, 1]])
    assert torch.equal(span_mask(spans, 9, torch.device("cpu")), packed_attention_mask(seq))
    windowed = span_mask(spans, 9, torch.device("cpu"), window=2)[0, 0]
    assert windowed[8].tolist() == [False] * 7 + [True, True]  # the last query sees itself and one key back


def test_unsupported_layers_fall_back_to_the_span_mask(monkeypatch):
    """A layer with sinks or a position bias gets sdpa over the spans' mask, never the unmasked split."""
    calls = []
    monkeypatch.setattr(attention, "sdpa_attention_forward",
                        lambda m, q, k, v, mask, **kw: calls.append(mask) or (q.transpose(1, 2), None))
    q = torch.randn(1, 2, 6, 8)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]])
    attention.per_example_sdpa(torch.nn.Module(), q, q, q, None, position_ids=positions, s_aux=torch.zeros(2))
    assert len(calls) == 1 and torch.equal(calls[0], span_mask([[(0, 3), (3, 6)]], 6, q.device))
    calls.clear()
    attention.per_example_sdpa(torch.nn.Module(), q, q, q, None, position_ids=positions)
    assert calls == [None]  # splittable, and both examples 3 long: one unmasked call for the two
    calls.clear()
    attention.per_example_sdpa(torch.nn.Module(), q, q, q, None, position_ids=torch.tensor([[0, 1, 0, 1, 2, 3]]))
    assert calls == [None, None]  # one per length


def test_models_off_sdpa_are_left_alone():
    model = make_model("llama", dtype=torch.float32)
    model.set_attn_implementation("eager")
    assert not use_per_example_attention(model) and model.config._attn_implementation == "eager"


def _fp64_reference(q, k, v, grad):
    rep = q.shape[1] // k.shape[1]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(
        q64, k64.repeat_interleave(rep, 1), v64.repeat_interleave(rep, 1), is_causal=True)
    return (out, *torch.autograd.grad(out, (q64, k64, v64), grad.double()))


@pytest.mark.parametrize("n, heads, groups, length", [(3, 4, 2, 37), (2, 6, 6, 9), (1, 9, 3, 1), (2, 8, 1, 64)])
def test_short_causal_attention_is_as_accurate_as_the_flash_kernel(n, heads, groups, length):
    """Against fp64: output and q/k/v gradients off (in norm) by no more than torch's own bf16 flash kernel, to a
    tenth of its error (bf16 rounding of the same products in another order), grouped-query heads included."""
    gen = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(n, h, length, 16, generator=gen).bfloat16().requires_grad_()
               for h in (heads, groups, groups))
    grad = torch.randn(n, heads, length, 16, generator=gen).bfloat16()
    exact = _fp64_reference(q, k, v, grad)
    flash_out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    flash = (flash_out, *torch.autograd.grad(flash_out, (q, k, v), grad))
    short_out = attention._ShortCausal.apply(q, k, v, 16 ** -0.5)
    short = (short_out, *torch.autograd.grad(short_out, (q, k, v), grad))
    for name, ours, theirs, ref in zip(("out", "dq", "dk", "dv"), short, flash, exact):
        assert ours.dtype == torch.bfloat16 and ours.shape == ref.shape, name
        err, bound = (ours.double() - ref).norm(), (theirs.double() - ref).norm()
        assert err <= 1.1 * bound + 1e-6, (name, float(err), float(bound))


def test_training_step_takes_the_short_kernel_under_checkpointing(monkeypatch):
    """bf16 autocast, non-reentrant checkpointing, a padding-free row: the short kernel runs (forward and the
    recomputation), and the LoRA-free model's gradients match the flash kernel's to bf16 rounding."""
    model = fp32_model("llama").bfloat16()  # the kit's models compute in bf16: q, k and v arrive in it
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    use_per_example_attention(model)
    batch = collate_packed([examples([7, 19, 3, 12])], pad_id=0)
    calls = []
    apply = attention._ShortCausal.apply
    monkeypatch.setattr(attention._ShortCausal, "apply", lambda *a: calls.append(a[0].shape) or apply(*a))

    def grads(short: int):
        monkeypatch.setattr(attention, "SHORT", short)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _, g = loss_and_grads(model, batch)
        return loss, g

    ref_loss, ref = grads(0)
    assert calls == []
    loss, ours = grads(191)
    assert len(calls) == 2 * 2 * 4  # two layers, forward and recomputation, four lengths
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=0)
    for k in ref:
        assert (ours[k] - ref[k]).norm() <= 0.05 * ref[k].norm() + 1e-6, k


def test_an_attention_without_position_ids_is_refused_inside_a_packed_row():
    """Without position_ids the examples of a packed row cannot be found: one clear error, not attention across
    examples."""
    q = torch.randn(1, 2, 6, 8)
    with packed_rows(), pytest.raises(attention.ConfigError, match="packing: false and padding_free: false"):
        attention.per_example_sdpa(torch.nn.Module(), q, q, q, None)
    out, _ = attention.per_example_sdpa(torch.nn.Module(), q, q, q, None)  # outside: a plain causal row
    assert out.shape == (1, 6, 2, 8)
