"""Attention within each example of a packed row, at the cost of the examples alone.

A packed row (several examples one after another, position_ids restarting at 0 for each) is correct under
transformers' sdpa: it finds the examples from the position_ids and builds a block-diagonal mask over the whole
row. That mask is rows x T x T booleans (a gigabyte for one padding-free row of 32k tokens), and SDPA on a mask
computes every query against every key of the row and throws most of it away: a 512-token row of three examples
pays for 512² scores where the examples need 3 x 171². `per_example_sdpa` runs SDPA once per example instead,
causal and unmasked, exactly as a row holding that example alone would run it.

It is registered with transformers as one more attention implementation (`PER_EXAMPLE`). Its mask function is
sdpa's, except inside `packed_rows()`, which the training loss enters for packed batches: there a causal mask with
no padding, and no window shorter than the row, is not built (None), and the attention function finds the
examples from the position_ids it is passed -- in forward and again in checkpointing's recompute, which runs
outside the context but reuses the forward's None. Everything else -- a padded batch, eval, a sliding or chunked
window -- gets sdpa with sdpa's mask: the same result as before, bit for bit. A packed row's result is the same
attention, the softmax over the same keys, with the kernel's blocks grouped otherwise (and short examples'
through `_ShortCausal`): equal to the masked one to rounding (tests hold it so).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from qlora_kit.batching import packed_attention_mask
from qlora_kit.errors import ConfigError
from qlora_kit.lora import saves_under_checkpoint

PER_EXAMPLE = "qlora_kit_per_example_sdpa"
"""The attention implementation's name in transformers' registries."""


def example_spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """[b, T] position_ids -> each row's [start, end) spans, one per example (transformers' rule: an example starts
    wherever the position does not follow on from the one before); None when no row holds more than one."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if not bool(starts[:, 1:].any()):
        return None
    length = position_ids.shape[1]
    spans = []
    for row in starts:
        cuts = row.nonzero().flatten().tolist() + [length]
        spans.append(list(zip(cuts[:-1], cuts[1:])))
    return spans


def _splittable(module: nn.Module, spans: list[list[tuple[int, int]]], kwargs: dict) -> bool:
    """Whether causal SDPA per example is all this layer's attention is: no position bias or sinks, and no
    sliding window shorter than an example."""
    if not getattr(module, "is_causal", True) or any(kwargs.get(k) is not None for k in ("position_bias", "s_aux")):
        return False
    window = kwargs.get("sliding_window")
    return not window or all(end - start <= window for row in spans for start, end in row)


def span_mask(spans: list[list[tuple[int, int]]], length: int, device: torch.device,
              window: int | None = None) -> torch.Tensor:
    """[b, 1, T, T] boolean block-diagonal causal mask over the spans (and within `window` keys of the query, if
    given): True where a query may see a key."""
    seq = torch.empty(len(spans), length, dtype=torch.long)
    for b, row in enumerate(spans):
        for k, (start, end) in enumerate(row):
            seq[b, start:end] = k
    mask = packed_attention_mask(seq.to(device))
    return mask & torch.ones(length, length, dtype=torch.bool, device=device).triu(1 - window) if window else mask


def per_example_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature ([b, heads, T, d] query/key/value); output [b, T, heads, d]."""
    position_ids = kwargs.get("position_ids")
    if position_ids is None and attention_mask is None and _PACKED.get():
        raise ConfigError(f"{type(module).__name__} does not pass position_ids to its attention, so the examples of a "
                          "packed row cannot be kept apart; train it with packing: false and padding_free: false")
    packed = attention_mask is None and position_ids is not None and query.shape[2] == key.shape[2] > 1
    spans = example_spans(position_ids) if packed else None
    if spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if not _splittable(module, spans, kwargs):
        mask = span_mask(spans, query.shape[2], query.device, kwargs.get("sliding_window"))
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    return _attend_per_example(module, query, key, value, spans, kwargs), None


SHORT = 191
"""Examples up to this many tokens take `_ShortCausal` on the CPU (in checkpointed blocks, with gradients). torch
2.13's CPU flash kernel is at its slowest below 192 tokens (its query blocks grow there): at SmolLM2's 9 heads of
64, forward and backward of 4 examples took 7.6 ms here against its 17.7 at 171 tokens, 1.6 against 4.3 at 64.
With the Trainer's allocator limits (`device.keep_freed_memory`) it stays ahead to 512 tokens (14.6 against 20.1
ms at 256, 56.7 against 69.5 at 512: `python tools/bench_attention.py`), but its saved P grows as heads x L² fp32
per example (a 32-head model's 512-token example: 32 MiB, per block being recomputed), where the flash kernel
saves only its output; the gain is largest, and P smallest, below 192."""

SHORT_CHUNK_BYTES = 64 << 20
"""Examples go through `_ShortCausal` in chunks whose fp32 probabilities (heads x L² each) stay under this."""


class _ShortCausal(torch.autograd.Function):
    """Causal attention of short examples as plain batched matmuls, [n, heads, L, d] in and out.

    torch's CPU flash kernel works in blocks of up to 512 keys, so below that it computes the whole square and
    pays its blocking overhead for little work; its backward is the larger part of a short-example training
    step's attention. Here the scores are one fp32 matmul per key head (grouped query heads ride along as rows:
    no repeat of k and v), softmax and P·V in fp32, and P is saved for backward, whose five products round P and
    dS to bf16 for dV, dQ and dK -- as the flash kernel does -- and keep the scores' gradient dP in fp32. Against
    an fp64 reference its errors are the flash kernel's to within a tenth (dQ) and smaller for the output, dK and
    dV (tests/test_attention.py). Saving P (fp32, heads x L² per example) is what limits it to short examples and
    to checkpointed blocks, where only the block being recomputed holds it."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        n, heads, length, dim = q.shape
        groups = k.shape[1]
        rows = (n, groups, heads // groups * length, dim)
        above = torch.full((length, length), float("-inf"), device=q.device).triu_(1).repeat(rows[2] // length, 1)
        with torch.autocast(q.device.type, enabled=False):
            s = torch.baddbmm(above, q.reshape(rows).flatten(0, 1).float(), k.float().flatten(0, 1).transpose(-1, -2),
                              alpha=scale)  # scale x scores, -inf above the diagonal: one call
            p = torch.softmax(s, dim=-1).view(n, groups, -1, length)
            out = torch.matmul(p, v.float()).to(q.dtype)
        ctx.save_for_backward(q, k, v, p, out)
        ctx.scale = scale
        return out.view(n, heads, length, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, p, out = ctx.saved_tensors
        rows = out.shape
        g = grad.reshape(rows)
        p16 = p.to(q.dtype)
        dv = torch.matmul(p16.transpose(-1, -2), g)
        dp = torch.matmul(g.float(), v.float().transpose(-1, -2))
        dp.sub_((g.float() * out.float()).sum(-1, keepdim=True)).mul_(p).mul_(ctx.scale)
        ds = dp.to(q.dtype)
        dq = torch.matmul(ds, k).view(q.shape)
        dk = torch.matmul(ds.transpose(-1, -2), q.reshape(rows))
        return dq, dk, dv, None


def _short_causal_applies(query: torch.Tensor, kwargs: dict) -> bool:
    return (query.device.type == "cpu" and query.shape[2] <= SHORT and not kwargs.get("dropout")
            and query.dtype in (torch.bfloat16, torch.float16, torch.float32) and torch.is_grad_enabled()
            and query.requires_grad and saves_under_checkpoint())


def _causal(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            kwargs: dict) -> torch.Tensor:
    """Causal attention of [n, heads, L, d] examples of one length L -> [n, L, heads, d]."""
    if _short_causal_applies(query, kwargs):
        scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
        per = max(1, SHORT_CHUNK_BYTES // (4 * query.shape[1] * query.shape[2] ** 2))
        outs = [_ShortCausal.apply(query[i:i + per], key[i:i + per], value[i:i + per], scale)
                for i in range(0, query.shape[0], per)]
        return (outs[0] if len(outs) == 1 else torch.cat(outs)).transpose(1, 2).contiguous()
    rest = {k: v for k, v in kwargs.items() if k != "is_causal"}
    return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **rest)[0]


def _attend_per_example(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        spans: list[list[tuple[int, int]]], kwargs: dict) -> torch.Tensor:
    """Causal SDPA per example, the examples of one length stacked into one call (uniform data: one call in all,
    as its padded batch would make), reassembled in row order: [b, T, heads, d]."""
    examples = [(b, s, e) for b, row in enumerate(spans) for s, e in row]
    by_length: dict[int, list[int]] = {}
    for i, (_, s, e) in enumerate(examples):
        by_length.setdefault(e - s, []).append(i)
    parts: list[torch.Tensor] = [query] * len(examples)  # every entry is replaced below

    def stacked(t: torch.Tensor, members: list[int]) -> torch.Tensor:
        views = [t[b:b + 1, :, s:e] for b, s, e in (examples[i] for i in members)]
        return views[0] if len(views) == 1 else torch.cat(views)

    for members in by_length.values():
        out = _causal(module, stacked(query, members), stacked(key, members), stacked(value, members), kwargs)
        for j, i in enumerate(members):
            parts[i] = out[j:j + 1]
    rows = [torch.cat([p for p, (b, _, _) in zip(parts, examples) if b == row], dim=1) for row in range(len(spans))]
    return torch.cat(rows) if len(rows) > 1 else rows[0]


_PACKED = contextvars.ContextVar("qlora_kit_packed_rows", default=False)


@contextlib.contextmanager
def packed_rows() -> Iterator[None]:
    """A forward over packed rows: the per-example attention finds the examples, so no row-wide mask is built."""
    token = _PACKED.set(True)
    try:
        yield
    finally:
        _PACKED.reset(token)


def _mask(*, q_length: int, attention_mask: torch.Tensor | None = None, local_size: int | None = None, **kwargs):
    """sdpa's mask, but none for a packed row without padding whose window (sliding or chunked), if any, spans the
    whole row: the attention function keeps its examples apart."""
    if _PACKED.get() and attention_mask is None and (local_size is None or local_size >= q_length):
        return None
    return sdpa_mask(q_length=q_length, attention_mask=attention_mask, local_size=local_size, **kwargs)


AttentionInterface.register(PER_EXAMPLE, per_example_sdpa)
AttentionMaskInterface.register(PER_EXAMPLE, _mask)


def use_per_example_attention(model: nn.Module) -> bool:
    """Switch a model that runs transformers' sdpa to `PER_EXAMPLE`; True if it did. Models on eager, flash or a
    kernel of their own, and models whose attention does not go through transformers' registry, are left as
    they are (packed rows stay correct there: their mask keeps the examples apart)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if not getattr(model, "_supports_attention_backend", False):
        return False
    model.set_attn_implementation(PER_EXAMPLE)
    return model.config._attn_implementation == PER_EXAMPLE
