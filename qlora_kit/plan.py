"""Memory arithmetic from a config alone: what one training step holds at its peak, before any weight exists.

The model is built on the meta device (`loader.build_empty`) only to read its shapes: which linears are held in
4 bits (`loader.quant_targets`, the loader's own choice), which of them get adapters (`LoraConfig.targets`), how
many blocks and norms there are. Everything else is arithmetic on batch, sequence length, hidden, intermediate,
heads, kv heads and vocab, term by term as train.py runs a step; tests/test_plan.py checks the weights byte for
byte against a loaded model and the peak against measured peaks of real steps.

A step (train.py) holds, besides the frozen weights, the fp32 LoRA masters and optimizer states:
  forward    autocast in the compute dtype; each block saves what its backward needs (or, with gradient
             checkpointing, only its input); the autocast cache keeps a compute-dtype copy of every LoRA weight
  loss       logits in the compute dtype, an fp32 copy, log-softmax in fp32 (train.token_loss_sum)
  backward   saved tensors are freed block by block (a checkpointed block is first recomputed) while fp32
             gradients accumulate; the peak is at its start, at the top block, or at its end
  step       all gradients plus the optimizer's temporaries
The planned peak is the frozen weights + adapters + optimizer states + the largest of those phases + overhead.

Every term is a count of tensors times the bytes of one value: `FP32` for fp32 values (masters, gradients,
states, upcasts), `_Step.itemsize` for the compute dtype, 1 for uint8/bool; the comment beside a term says
which tensors it counts and who holds them. The settings come from a validated `Recipe`, so nothing here
checks them again.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_kit.config import DatasetConfig, Recipe
from qlora_kit.errors import CheckpointError
from qlora_kit.lora import LoraConfig
from qlora_kit.quant import NESTED_BLOCKSIZE, QuantConfig
from qlora_kit.shapes import ITEMSIZE, GiB, LinearShape, ModelShape, Settings

CUDA_OVERHEAD = 3 * GiB // 4
"""CUDA context with torch's and bitsandbytes' kernels (~0.5 GiB) plus caching-allocator rounding (~0.25 GiB)."""
PAGED_MIN_NUMEL = 100_000
"""bitsandbytes pages the states of tensors this large or larger; smaller ones stay in device memory."""
MIN_8BIT_NUMEL = 4096
"""bitsandbytes keeps 32-bit states for tensors smaller than this even in its 8-bit optimizers."""
STATE_BLOCKSIZE = 256
"""Values per fp32 absmax in bitsandbytes' 8-bit optimizer states."""
FP32 = 4
"""Bytes of an fp32 value: LoRA masters, their gradients, 32-bit optimizer states, absmax, upcast activations."""
CODE_MAP_BYTES = 256 * FP32
"""One 8-bit optimizer code map: 256 fp32 levels (bitsandbytes keeps one per state, two states)."""


@dataclass
class Plan:
    """Bytes of one training step at its peak. Component fields are each thing's full size; `phases` holds what
    comes and goes during the step, and `total_bytes` = weights + adapters + optimizer + the largest phase +
    overhead. `activation_bytes` is the most activations hold at once (saved tensors or checkpointed block
    inputs plus one block's working set), `logits_bytes` the loss's working set; gradients exist in full only
    at the end of backward. `resident_bytes` leaves out paged optimizer states, which may be evicted to host
    memory; `fits` compares it with `gpu_bytes`."""

    model: str
    settings: dict[str, Any]
    params: int
    quantized_params: int
    adapter_params: int
    base_weights_bytes: int
    quantized_bytes: int
    adapter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    optimizer_evictable_bytes: int
    activation_bytes: int
    logits_bytes: int
    overhead_bytes: int
    phases: dict[str, int]
    peak_phase: str
    total_bytes: int
    resident_bytes: int
    gpu_bytes: int | None = None
    fits: bool | None = None
    max_batch_size: int | None = None
    max_seq_len: int | None = None
    assumptions: list[str] = field(default_factory=list)
    gpus: int = 1
    """Every byte figure above is per GPU (per rank) when this is > 1 or the base is offloaded."""
    gathered_bytes: int = 0
    """FSDP: whole (all-gathered) weights held during the step: the root's and the blocks' in flight."""
    host_bytes: int = 0
    """FSDP CPU offload: this rank's shards of weights, adapters, gradients and optimizer states in host memory."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- weights, adapters, optimizer --------------------------------------------------------------------------


def quantized_nbytes(numel: int, quant: QuantConfig) -> int:
    """Bytes of one 4-bit weight in the bitsandbytes layout, as `QuantizedWeight.nbytes` counts them: packed codes,
    per-block absmax (fp32, or uint8 plus one fp32 per 256 blocks with double quant); shared code tables excluded."""
    blocks = -(-numel // quant.blocksize)
    # double quant: one uint8 code per block plus an fp32 absmax per NESTED_BLOCKSIZE blocks; else fp32 per block
    scales = blocks + FP32 * -(-blocks // NESTED_BLOCKSIZE) if quant.double_quant else FP32 * blocks
    return -(-numel // 2) + scales


def _adapter_numels(shape: ModelShape, lora: LoraConfig) -> list[tuple[LinearShape, int, int]]:
    """(linear, numel of A, numel of B) for every adapted linear: A is r x in, B is out x r."""
    return [(lin, lora.r * lin.in_features, lora.r * lin.out_features)
            for lin in shape.linears if lora.targets(lin.name)]


def optimizer_state_bytes(numels: list[int], optimizer: str, device: str) -> tuple[int, int]:
    """(all state bytes, the part in paged memory) for AdamW's two states per tensor, as bitsandbytes / torch
    allocate them: fp32, or uint8 with one fp32 absmax per 256 values for tensors of >= 4096 values."""
    paged = optimizer.startswith("paged_") and device == "cuda"
    eight_bit = optimizer.endswith("_8bit")
    total = evictable = 0
    for n in numels:
        if eight_bit and n >= MIN_8BIT_NUMEL:  # two uint8 states, each with an fp32 absmax per STATE_BLOCKSIZE
            states, scales = 2 * n, 2 * FP32 * -(-n // STATE_BLOCKSIZE)
        else:  # two fp32 states (exp_avg, exp_avg_sq)
            states, scales = 2 * FP32 * n, 0
        total += states + scales
        if paged and n >= PAGED_MIN_NUMEL:
            evictable += states  # only state1/state2 are paged; the absmax vectors are ordinary allocations
    if eight_bit:
        total += 2 * CODE_MAP_BYTES
    return total, evictable


def _step_temporaries(numels: list[int], optimizer: str, device: str) -> int:
    """Scratch memory of optimizer.step(). On CUDA bitsandbytes updates in fused kernels and torch's AdamW runs
    foreach (one sqrt buffer over all tensors); on CPU both go tensor by tensor, so the largest tensor decides."""
    if not numels:
        return 0
    if device == "cuda":
        return FP32 * sum(numels) if optimizer == "adamw" else 0  # foreach: one fp32 sqrt(v) over all tensors
    n = max(numels)
    if optimizer == "adamw":
        return 2 * FP32 * n  # sqrt(v), then sqrt(v)/c as a new tensor
    if optimizer.endswith("_8bit"):
        return 4 * FP32 * n  # both states dequantized to fp32, the scaled gradient, the denominator
    return 3 * FP32 * n  # at most three at once of: scaled gradient, sqrt(v) (+ eps in place), the update


# --- activations -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Step:
    """The sizes one step's tensors are made of."""

    batch: int
    seq: int
    itemsize: int
    """Bytes of one activation value in the compute dtype (2 for bf16/fp16, 4 for fp32)."""
    tokens: int
    """batch * seq: positions every activation has."""
    positions: int
    """batch * (seq - 1): positions the loss is computed at (the last token predicts nothing)."""
    mask_bytes: int
    """A dropout mask per element: bool on CUDA (native_dropout), the input's fp32 on CPU (input * noise)."""

    @property
    def narrow(self) -> bool:
        """A compute dtype narrower than fp32: autocast keeps compute-dtype copies, and fp32 upcasts are new
        tensors rather than the activations themselves."""
        return self.itemsize < FP32

    @classmethod
    def of(cls, st: Settings) -> _Step:
        batch, seq = st.batch_size, st.seq_len
        return cls(batch, seq, ITEMSIZE[st.compute_dtype], batch * seq, batch * (seq - 1),
                   1 if st.device == "cuda" else FP32)


def _needs_grad(lin: LinearShape, st: Settings) -> bool:
    """Whether a linear's input carries a gradient. The embedding output does not, except that transformers
    makes it require one when gradient checkpointing is enabled (enable_input_require_grads)."""
    return st.gradient_checkpointing or not lin.reads_embedding


def _adapter_saved(lin: LinearShape, st: Settings, k: _Step, own_input: bool = True) -> int:
    """What one LoRA adapter saves: its input cast to the compute dtype (for A's gradient), A's output (for B's),
    the autocast copies of B and A (for the input gradients) and the dropout mask. Only in fp32 without dropout
    is the saved input the layer's input itself, one tensor for all projections reading it (`own_input`)."""
    r, size, grad = st.lora.r, k.itemsize, _needs_grad(lin, st)
    saved = (size * k.tokens * lin.in_features if own_input else 0) + size * k.tokens * r
    if k.narrow:
        saved += size * r * lin.out_features + (size * r * lin.in_features if grad else 0)
    if st.lora.dropout > 0 and grad:
        saved += k.mask_bytes * k.tokens * lin.in_features
    return saved


def _attention_saved(shape: ModelShape, st: Settings, k: _Step) -> int:
    """q, k and v (k/v repeated to every head, as transformers does whenever a padding mask is present), then
    eager: the fp32 softmax and its compute-dtype copy, b*heads*s^2 each; sdpa: the output, the fp32 logsumexp
    and the padding mask converted to the compute dtype (b*s^2), nothing of size heads*s^2."""
    per_head = k.itemsize * k.tokens * shape.heads * shape.head_dim  # one of q, k, v or the output
    if st.attn_implementation == "eager":
        scores = k.batch * shape.heads * k.seq * k.seq
        return 3 * per_head + FP32 * scores + (k.itemsize * scores if k.narrow else 0)
    logsumexp = FP32 * k.batch * shape.heads * k.seq
    return 3 * per_head + per_head + logsumexp + k.itemsize * k.batch * k.seq * k.seq


def _norm_saved(shape: ModelShape, k: _Step) -> int:
    """An RMSNorm saves its input upcast to fp32 and the fp32 reciprocal RMS per token."""
    return FP32 * k.tokens * shape.hidden + FP32 * k.tokens


def _adapters_saved(group: list[LinearShape], st: Settings, k: _Step) -> int:
    """The adapters of one half-block; all its linears but the last (the output projection) read one input."""
    shared = not k.narrow and not st.lora.dropout
    total, input_counted = 0, False
    for i, lin in enumerate(group):
        if st.lora.targets(lin.name):
            reads_shared = shared and i < len(group) - 1
            total += _adapter_saved(lin, st, k, own_input=not (reads_shared and input_counted))
            input_counted |= reads_shared
    return total


def _block_halves(shape: ModelShape, st: Settings, block: int) -> tuple[int, int]:
    """Bytes block `block` saves for its backward, as (attention half, MLP half): the first norm, the attention
    adapters and attention itself; the other norm(s), the MLP adapters and the MLP's gate, act(gate) and up
    (or act's input for a plain MLP)."""
    k = _Step.of(st)
    linears = shape.by_block.get(block, ())
    norms_attn = (shape.norms_per_block + 1) // 2 - (0 if all(_needs_grad(lin, st) for lin in linears) else 1)
    norms_mlp = shape.norms_per_block // 2
    adapters = {half: _adapters_saved([lin for lin in linears if lin.in_attention == half], st, k)
                for half in (True, False)}
    attention = norms_attn * _norm_saved(shape, k) + adapters[True] + _attention_saved(shape, st, k)
    mlp = norms_mlp * _norm_saved(shape, k) + adapters[False] + \
        (3 if shape.gated_mlp else 1) * k.itemsize * k.tokens * shape.intermediate
    return attention, mlp


def block_saved_bytes(shape: ModelShape, st: Settings, block: int) -> int:
    """Bytes block `block` saves for its backward (without checkpointing; with it, when it is recomputed)."""
    return sum(_block_halves(shape, st, block))


def _linear_work(lin: LinearShape, st: Settings, k: _Step) -> int:
    """Transient bytes around one linear, beyond what it saves. The frozen path holds the dequantized weight
    (and, with double quant, two fp32 absmax vectors) next to its input and output; the adapter path holds the
    fp32 copy of the input and the dropout output (forward) or their fp32 gradients (backward)."""
    size, n = k.itemsize, lin.in_features * lin.out_features
    absmax = 2 * FP32 * -(-n // st.quant.blocksize) if st.quant.double_quant else 0  # the nested stage undone
    io = size * k.tokens * (lin.in_features + lin.out_features)
    frozen = size * n + absmax + io
    if not st.lora.targets(lin.name):
        return frozen
    fp32_input = FP32 * k.tokens * lin.in_features
    fp32_copies = (fp32_input if k.narrow else 0) + (fp32_input if st.lora.dropout else 0)
    return max(frozen, io + fp32_copies)


def _attention_work(shape: ModelShape, st: Settings, k: _Step) -> int:
    """Transient bytes of attention backward beyond its saved tensors. Eager: the scores' gradient in fp32 and
    softmax's output gradient, while the compute-dtype probabilities are already freed; sdpa: the gradients of
    q, k, v and the output."""
    if st.attn_implementation == "eager":
        scores = k.batch * shape.heads * k.seq * k.seq
        freed_probabilities = k.itemsize * scores if k.narrow else 0  # in fp32 there is no separate copy
        return FP32 * scores + FP32 * scores - freed_probabilities  # the scores' and the softmax output's gradients
    return 4 * k.itemsize * k.tokens * shape.heads * shape.head_dim  # gradients of q, k, v and the output


def block_peak_bytes(shape: ModelShape, st: Settings, block: int) -> int:
    """Most bytes a block holds while it runs (forward, recompute or backward), saved tensors included: the MLP
    runs with everything saved (last in forward, first in backward); attention backward runs after the MLP's
    saved tensors are freed. Both also hold four residual-stream-sized tensors: the block input or its incoming
    gradient, the residual sum after attention, the normalized input and the output being formed."""
    k = _Step.of(st)
    attention, mlp = _block_halves(shape, st, block)
    linears = shape.by_block.get(block, ())
    work = {half: max([_linear_work(lin, st, k) for lin in linears if lin.in_attention == half], default=0)
            for half in (True, False)}
    # in fp32 the norms save two of the four themselves (counted in their saved bytes)
    stream = (4 if k.narrow else 2) * k.itemsize * k.tokens * shape.hidden
    return max(attention + mlp + work[False], attention + max(work[True], _attention_work(shape, st, k))) + stream


def logits_bytes(shape: ModelShape, st: Settings) -> tuple[int, int]:
    """(in forward, at the start of backward) for train.token_loss_sum. Forward: the logits in the compute dtype,
    the shifted slice copied when b > 1 (freed once cast), its fp32 copy and log-softmax. Backward: log-softmax,
    its incoming gradient and its output gradient, all fp32."""
    if not shape.has_lm_head:
        return 0, 0
    k, vocab = _Step.of(st), shape.vocab
    logits, shifted = k.itemsize * k.tokens * vocab, (k.itemsize * k.positions * vocab if k.batch > 1 else 0)
    fp32_loss_tensor = FP32 * k.positions * vocab  # one fp32 tensor over the loss positions
    if k.narrow:  # the fp32 copy and log-softmax; the shifted slice is freed once cast, before log-softmax
        forward = logits + fp32_loss_tensor + max(shifted, fp32_loss_tensor)
    else:  # .float() is a no-op: log-softmax reads the shifted slice itself
        forward = logits + shifted + fp32_loss_tensor
    return forward, 3 * fp32_loss_tensor  # log-softmax, its incoming gradient, its output gradient


def _phases(shape: ModelShape, st: Settings, adapters: list[tuple[LinearShape, int, int]]) -> dict[str, int]:
    """Bytes beyond weights, adapters and optimizer states at each candidate peak of the step."""
    k = _Step.of(st)
    last = max(shape.blocks - 1, 0)
    grads = sum(FP32 * (a + b) for _, a, b in adapters)
    grads_first = sum(FP32 * (a + b) for lin, a, b in adapters if lin.block == 0)
    final_norm = _norm_saved(shape, k) if shape.has_lm_head else 0
    rope = 2 * k.itemsize * k.seq * shape.head_dim  # cos and sin, shared by every block
    # the 4-d padding mask: in the compute dtype for eager, bool for sdpa
    mask = (k.itemsize if st.attn_implementation == "eager" else 1) * k.batch * k.seq * k.seq
    cache = k.itemsize * sum(a + b for _, a, b in adapters) if k.narrow else 0  # autocast's copies of all LoRA weights
    fwd_logits, bwd_logits = logits_bytes(shape, st)
    top, first = block_peak_bytes(shape, st, last), block_peak_bytes(shape, st, 0)
    if st.gradient_checkpointing:
        block_input = k.itemsize * k.tokens * shape.hidden
        held = shape.blocks * block_input + rope + mask  # every block's input, kept for its recompute
        phases = {
            "forward end": held + final_norm + cache + fwd_logits,
            "backward start": held + final_norm + bwd_logits,
            "top block": held + top,
            "backward end": grads - grads_first + block_input + rope + mask + first,
        }
    else:
        held = sum(block_saved_bytes(shape, st, i) for i in range(shape.blocks)) + rope
        phases = {
            "forward end": held + final_norm + mask + fwd_logits,
            "backward start": held + final_norm + bwd_logits,
            "top block": held - block_saved_bytes(shape, st, last) + top + mask,
            "backward end": grads - grads_first + rope + first,
        }
    phases["optimizer step"] = grads + _step_temporaries([n for _, a, b in adapters for n in (a, b)],
                                                         st.optimizer, st.device)
    return phases


# --- several GPUs -------------------------------------------------------------------------------------------

FSDP_BLOCKS_IN_FLIGHT = 2
"""Blocks whose weights are whole at once under FSDP2 with reshard_after_forward: the one computing and the next,
prefetched (FSDP2's default forward and backward prefetch)."""


@dataclass
class _Share:
    """One rank's part of a plan's resident components and the step's phases (train.py under distributed.py)."""

    base: int
    adapter: int
    optim: int
    evictable: int
    phases: dict[str, int]
    gathered: int = 0
    host: int = 0


def _per_rank(shape: ModelShape, st: Settings, base: int, quantized: int, adapter: int, optim: int,
              evictable: int, phases: dict[str, int]) -> _Share:
    """DDP: every rank holds everything, plus its gradient buckets (one more fp32 copy of the gradients) at the
    end of backward. FSDP: the weights, adapters, gradients and optimizer states are sharded 1/N each (dim 0 of
    every tensor), and whole copies of the root module (embeddings, head, final norm: FSDP2 keeps the root
    gathered through the step) and of the blocks in flight are held on top; with CPU offload the shards live in
    host memory and the optimizer steps there."""
    n = st.gpus
    if st.strategy == "ddp":
        if n == 1:
            return _Share(base, adapter, optim, evictable, phases)
        bucketed = {k: v + (adapter if k in ("backward end", "optimizer step") else 0) for k, v in phases.items()}
        return _Share(base, adapter, optim, evictable, bucketed)
    if n == 1 and not st.offload_base:
        return _Share(base, adapter, optim, evictable, phases)
    blocks = max(shape.blocks, 1)
    in_flight = blocks if not st.reshard_after_forward else min(FSDP_BLOCKS_IN_FLIGHT, blocks)
    per_block = (quantized + adapter) // blocks
    root = base - quantized  # plain parameters and buffers: almost all of it the embeddings and the head
    gathered = root + in_flight * per_block
    grads_gone = adapter - adapter // n  # reduce-scattered block by block: only the shard is kept
    if st.offload_base:
        grads_gone = adapter
    shared = {k: v - (grads_gone if k in ("backward end", "optimizer step") else 0) for k, v in phases.items()}
    share = _Share(base // n, adapter // n, optim // n, evictable // n, shared, gathered)
    if st.offload_base:
        share.host = share.base + share.adapter + share.optim + adapter // n
        share.phases["optimizer step"] = 0  # runs on the host, on the host's shards
        share.base = share.adapter = share.optim = share.evictable = 0
    share.phases = {k: v + gathered for k, v in share.phases.items()}
    return share


# --- the plan ----------------------------------------------------------------------------------------------


def plan_memory(
    config_or_recipe: Any,
    *,
    batch_size: int | None = None,
    seq_len: int | None = None,
    lora: LoraConfig | None = None,
    quant: QuantConfig | None = None,
    optimizer: str | None = None,
    gradient_checkpointing: bool | None = None,
    attn_implementation: str | None = None,
    compute_dtype: str | None = None,
    device: str = "cuda",
    gpu_gib: float | None = None,
) -> Plan:
    """The memory plan of one training step for a Recipe (its model config, its settings), a transformers config
    or a ModelShape; keyword arguments override the recipe's settings (or the defaults). With `gpu_gib`, also
    whether it fits and the largest batch size and sequence length that do."""
    training = dict(batch_size=batch_size, max_seq_len=seq_len, lora=lora, quant=quant, optimizer=optimizer,
                    gradient_checkpointing=gradient_checkpointing, compute_dtype=compute_dtype)
    training = {k: v for k, v in training.items() if v is not None}
    if isinstance(config_or_recipe, Recipe):
        recipe = dataclasses.replace(config_or_recipe, **training)  # Recipe validates the changed values
        shape = ModelShape.from_config(recipe_model_config(recipe), recipe.trust_remote_code)
    else:
        recipe = Recipe(model="(planned from its config)", dataset=DatasetConfig("(none)"), **training)
        shape = config_or_recipe
        if not isinstance(shape, ModelShape):
            shape = ModelShape.from_config(config_or_recipe)
    settings = Settings.from_recipe(recipe, attn_implementation=attn_implementation, device=device)
    return plan_shape(shape, settings, None if gpu_gib is None else int(gpu_gib * GiB))


def plan_shape(shape: ModelShape, st: Settings, gpu_bytes: int | None = None, search: bool = True) -> Plan:
    """The arithmetic itself, on an already-read ModelShape (cheap: searches call it many times)."""
    adapters = _adapter_numels(shape, st.lora)
    numels = [n for _, a, b in adapters for n in (a, b)]
    quantized = sum(quantized_nbytes(lin.in_features * lin.out_features, st.quant) for lin in shape.linears)
    base = quantized + ITEMSIZE[st.compute_dtype] * shape.plain_numel + shape.buffer_bytes
    adapter = FP32 * sum(numels)
    optim, evictable = optimizer_state_bytes(numels, st.optimizer, st.device)
    share = _per_rank(shape, st, base, quantized, adapter, optim, evictable, _phases(shape, st, adapters))
    phases = share.phases
    peak_phase = max(phases, key=phases.get)
    overhead = CUDA_OVERHEAD if st.device == "cuda" else 0
    total = share.base + share.adapter + share.optim + phases[peak_phase] + overhead
    evictable = share.evictable
    shards = st.gpus if st.strategy == "fsdp" else 1
    fwd_logits, bwd_logits = logits_bytes(shape, st)
    activations = max(phases["backward start"] - bwd_logits, phases["top block"])
    plan = Plan(
        model=shape.name,
        settings=_settings_dict(st),
        params=shape.params,
        quantized_params=sum(lin.in_features * lin.out_features for lin in shape.linears),
        adapter_params=sum(numels),
        base_weights_bytes=share.base,
        quantized_bytes=0 if st.offload_base else quantized // shards,
        adapter_bytes=share.adapter,
        gradient_bytes=0 if st.offload_base else adapter // shards,
        optimizer_bytes=share.optim,
        optimizer_evictable_bytes=evictable,
        activation_bytes=activations,
        logits_bytes=max(fwd_logits, bwd_logits),
        overhead_bytes=overhead,
        phases=phases,
        peak_phase=peak_phase,
        total_bytes=total,
        resident_bytes=total - evictable,
        gpu_bytes=gpu_bytes,
        assumptions=assumptions(shape, st),
        gpus=st.gpus,
        gathered_bytes=share.gathered,
        host_bytes=share.host,
    )
    if gpu_bytes is not None:
        plan.fits = plan.resident_bytes <= gpu_bytes
        if search:
            plan.max_batch_size = _largest(lambda b: dataclasses.replace(st, batch_size=b), shape, gpu_bytes, 1 << 16)
            longest = shape.max_positions or 1 << 20
            plan.max_seq_len = _largest(lambda s: dataclasses.replace(st, seq_len=s), shape, gpu_bytes, longest)
    return plan


def _fits(shape: ModelShape, st: Settings, gpu_bytes: int) -> bool:
    return plan_shape(shape, st, search=False).resident_bytes <= gpu_bytes


def _largest(vary, shape: ModelShape, gpu_bytes: int, limit: int) -> int:
    """The largest n in [1, limit] for which vary(n) fits (memory grows with n), or 0 if even 1 does not."""
    if not _fits(shape, vary(1), gpu_bytes):
        return 0
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _fits(shape, vary(mid), gpu_bytes) else (lo, mid - 1)
    return lo


def _settings_dict(st: Settings) -> dict[str, Any]:
    out = dataclasses.asdict(st)
    out["lora"]["target_modules"] = list(st.lora.target_modules)
    return out


def assumptions(shape: ModelShape, st: Settings) -> list[str]:
    """The modelling choices behind the numbers, stated with the plan."""
    q = st.quant
    out = [
        f"weights: 4-bit linears at the exact bitsandbytes layout ({q}, {q.bits_per_param():.3f} bits/param); "
        f"the shared code tables (16 and 256 fp32 values) are not counted; other parameters in {st.compute_dtype}",
        "adapters: fp32 masters, r*(in+out) per adapted linear; their gradients fp32, the same size",
    ]
    if st.optimizer.endswith("_8bit"):
        out.append(f"optimizer {st.optimizer}: two uint8 states per value plus an fp32 absmax per 256 values "
                   f"(fp32 states for tensors under {MIN_8BIT_NUMEL} values)")
    else:
        out.append(f"optimizer {st.optimizer}: two fp32 states per adapter value")
    if st.optimizer.startswith("paged_") and st.device == "cuda":
        out.append(f"paged: states of tensors >= {PAGED_MIN_NUMEL} values live in CUDA unified memory and may be "
                   "evicted to host RAM under pressure; `fits` compares only the rest (resident_bytes) with the GPU")
    ckpt = ("gradient checkpointing per block (non-reentrant): every block input is kept and one block at a time "
            "is recomputed in backward" if st.gradient_checkpointing else
            "no gradient checkpointing: every block keeps what its backward needs, LoRA inputs and dropout masks "
            f"({_Step.of(st).mask_bytes} byte(s) per value on {st.device}) included, until its backward runs")
    out += [
        f"activations: {ckpt}; modelled for pre-norm decoder blocks (norms computed in fp32, "
        f"{'gated' if shape.gated_mlp else 'plain'} MLP)" + ("" if st.gradient_checkpointing else
                                                          "; the first block's attention inputs need no gradient"),
        f"batches padded to seq_len={st.seq_len} with a padding mask present (k/v repeated to every head)",
        "attention eager: b*heads*s^2 scores saved per block (fp32 softmax plus a compute-dtype copy)"
        if st.attn_implementation == "eager" else
        "attention sdpa: a fused kernel saves its output and logsumexp, no heads*s^2 scores; the padding mask "
        "(b*s^2) is saved per block",
        f"loss: logits in {st.compute_dtype}, their fp32 copy and log-softmax over b*(s-1)*vocab "
        "(train.token_loss_sum); the peak is the largest phase: " + ", ".join(
            ["forward end", "backward start", "top block", "backward end", "optimizer step"]),
    ]
    if st.gpus > 1 or st.offload_base:
        out.append(_distributed_assumption(st))
    if st.device == "cuda":
        out.append(f"overhead: {CUDA_OVERHEAD / GiB:.2f} GiB fixed for the CUDA context and allocator slack, on top "
                   "of what torch.cuda.max_memory_allocated would report")
    else:
        out.append("device cpu: no overhead; the total is tracked tensor allocations, not process RSS")
    return out


def _distributed_assumption(st: Settings) -> str:
    if st.strategy == "ddp":
        return (f"ddp on {st.gpus} GPUs, figures per GPU: every rank holds the whole model, adapters and optimizer; "
                "DDP's gradient buckets add one fp32 copy of the gradients at the end of backward")
    where = "host memory (cpu_offload; the optimizer steps there)" if st.offload_base else "each GPU"
    blocks = "every block" if not st.reshard_after_forward else f"the {FSDP_BLOCKS_IN_FLIGHT} blocks in flight"
    return (f"fsdp (FSDP2 fully_shard per block) on {st.gpus} GPU(s), figures per GPU: 1/{st.gpus} of the 4-bit "
            f"base, adapters, gradients and optimizer states on {where}; whole copies of the root module "
            f"(embeddings, head, final norm) and of {blocks} are held during the step; batch_size is per GPU; "
            "NCCL's buffers and all-gather staging beyond those copies are not counted")


def read_model_config(path: str | Path, trust_remote_code: bool = False):
    """A transformers config from a model directory or a config .json file."""
    from transformers import AutoConfig

    from qlora_kit.loader import read_config

    path = Path(path)
    if path.is_dir():
        return read_config(path, trust_remote_code)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model directory or config file")
    if path.name == "config.json":
        return read_config(path.parent, trust_remote_code)
    try:
        json.loads(path.read_text())
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"{path}: not a usable model config ({str(e).splitlines()[0]})") from None


def recipe_model_config(recipe: Recipe):
    """The recipe's model config: from the weights directory when present, else from `model_config`, so that a
    run can be planned before (or without) downloading the weights."""
    model_dir = Path(recipe.model)
    if (model_dir / "config.json").is_file():
        return read_model_config(model_dir, recipe.trust_remote_code)
    if recipe.model_config:
        return read_model_config(recipe.model_config, recipe.trust_remote_code)
    raise CheckpointError(f"{model_dir}: no config.json, and the recipe sets no model_config to plan from")
