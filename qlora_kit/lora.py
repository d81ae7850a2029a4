"""The frozen 4-bit linear and the LoRA adapters on it.

`QLinear` holds one 4-bit weight (as frozen parameters; `qweight` is its `QuantizedWeight`) and any number of
named LoRA adapters (peft's module layout: `lora_A.<name>`, `lora_B.<name>`, `lora_dropout.<name>`), of which one
is active. Its forward dequantizes the
weight on the fly in the compute dtype through an autograd function that keeps only the 4-bit weight for
backward: the dequantized matrix is rebuilt in backward instead of being saved, which is what makes QLoRA's
memory figures possible. (Under non-reentrant gradient checkpointing the CPU training path keeps the matrix that
the block's recomputation built until that block's backward, `_LoraTrainLinear`: one block's W at a time.)
Merging is one function (`merge_delta_`, in place; `merge_delta` on a copy), used by the module and by export
alike.

Which adapter a forward uses is the layer's `active_adapter`, unless the calling context routes batch rows to
adapters (`route_rows`, which `adapters.per_row_adapters` wraps): that routing lives in a `ContextVar`, not on
the module, so two threads (or nested blocks) running one model with different adapters per row never see each
other's routing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from qlora_kit import _native
from qlora_kit.errors import ConfigError
from qlora_kit.quant import QuantizedWeight

ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the frozen base (QLoRA paper: r 64, alpha 16, every linear layer)."""

    r: int = 64
    """Rank of the update B·A."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha/r (alpha/sqrt(r) with rsLoRA)."""
    dropout: float = 0.0
    """Dropout on the adapter's input (the paper uses 0.1 for 7B/13B, 0.05 above)."""
    target_modules: tuple[str, ...] = (ALL_LINEAR,)
    """Module names (matched as the last dotted components) or "all-linear" (every linear but the output head)."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha/sqrt(r), which keeps the update's size steady as r grows."""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", (self.target_modules,))
        else:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"lora.r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ConfigError(f"lora.target_modules must be a list of module names, got {self.target_modules!r}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def targets(self, module_name: str) -> bool:
        """Whether a (quantized) linear called `module_name` gets an adapter, with peft's name matching."""
        if ALL_LINEAR in self.target_modules:
            return True
        return any(module_name == t or module_name.endswith("." + t) for t in self.target_modules)


class _Dequant4bitLinear(torch.autograd.Function):
    """y = x Wᵀ + b with W rebuilt from 4 bits in forward and again in backward; W itself is never saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, qweight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.qweight = qweight
        return F.linear(x, qweight.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return grad_out @ ctx.qweight.dequantize(grad_out.dtype), None, None


def saves_under_checkpoint() -> bool:
    """Whether the tensors saved now go through torch's non-reentrant checkpoint hooks: dropped after the first
    forward, and kept only from a block's recomputation to its backward. Saving the dequantized W there costs one
    block's W at a time and spares backward a third dequantize; saved elsewhere it would keep every layer's W."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    pack = getattr(hooks[0], "__qualname__", "") if hooks else ""
    return pack.startswith(("_checkpoint_hook.", "_recomputation_hook."))


def _pow2_at_least_one(scale: float) -> bool:
    """Scales for which s·round(v) == round(s·v) in bf16/fp32 (no underflow; overflow is non-finite either way)."""
    return scale >= 1.0 and math.frexp(scale)[0] == 0.5


class _LoraTrainLinear(torch.autograd.Function):
    """y = x Wᵀ + s·(x Aᵀ) Bᵀ for training on the CPU under autocast, the same bits as QLinear's unfused path
    (base matmul on the dequantized W, autocast's bf16 copies of A and B, B's output times s, the sum) with less
    work: A's rows are appended to the dequantized W, so one matmul gives the base output and x Aᵀ (each output
    column is computed alone; tests check the bits); a power-of-two s >= 1 is folded into B's copy (exact), which
    drops a multiply of the whole output forward and backward; under gradient checkpointing the recomputation's W
    is kept for backward (two dequantizes per step, not three). x comes in twice so that autograd adds the adapter's
    and the base's input gradients in the order the unfused graph did (floating-point sums are order-sensitive)."""

    @staticmethod
    def forward(ctx, x_lora, x, qweight: QuantizedWeight, a: torch.Tensor, b: torch.Tensor, scale: float):
        dtype, out_f, r = x.dtype, qweight.shape[0], a.shape[0]
        wa = torch.empty(out_f + r, qweight.shape[1], dtype=dtype)
        qweight.dequantize(dtype, out=wa[:out_f])
        wa[out_f:].copy_(a)
        a16, b16 = wa[out_f:], b.to(dtype)
        fold = _pow2_at_least_one(scale)
        b_used = b16 * scale if fold else b16
        y = F.linear(x, wa)
        h = y[..., out_f:].contiguous()
        d = F.linear(h, b_used)
        if not fold:
            d = d * scale
        keep_w = saves_under_checkpoint()
        ctx.save_for_backward(x, h, a16, b_used, wa[:out_f] if keep_w else None)
        ctx.qweight, ctx.scale, ctx.fold = qweight, scale, fold
        return d.add_(y[..., :out_f])  # into d, this function's own: one [rows, out] allocation fewer

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, h, a16, b_used, w = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        gs = g2 if ctx.fold else g2 * ctx.scale
        grad_b = gs.t().mm(h.reshape(-1, h.shape[-1]))  # autograd's mm_mat2_backward for a transposed weight
        if ctx.fold:
            grad_b = grad_b * ctx.scale
        grad_h = gs.mm(b_used)
        grad_a = grad_h.t().mm(x.reshape(-1, x.shape[-1]))
        gx_lora = gx = None
        if ctx.needs_input_grad[0]:
            gx_lora = grad_h.mm(a16).view(x.shape)
        if ctx.needs_input_grad[1]:
            w = ctx.qweight.dequantize(g.dtype) if w is None else w
            gx = g2.mm(w).view(x.shape)
        return gx_lora, gx, None, grad_a.float(), grad_b.float(), None


def linear_4bit(x: torch.Tensor, qweight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Frozen 4-bit linear in x's dtype; saves only the 4-bit weight for backward.

    When no gradient can flow and x is a few rows (decode: tokens, not sequences), W is never built: the 4-bit
    kernel multiplies straight from the codes (`QuantizedWeight.decode_matmul`); more rows on the CPU (a prefill)
    are multiplied in a bucketed row count (`bucketed_linear`)."""
    if not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))):
        y = qweight.decode_matmul(x, bias)
        if y is not None:
            return y
        if x.device.type == "cpu" and x.dim() >= 2:
            return bucketed_linear(x, qweight.dequantize(x.dtype), bias)
    return _Dequant4bitLinear.apply(x, qweight, bias)


class DecodeLinear(nn.Linear):
    """An unquantized linear layer (the LM head) whose decode steps take the native few-row kernel: at one row,
    torch's bf16 matmul reads the weight at under half the speed the kernel does, and the LM head is the largest
    matrix a small model multiplies per token. Anything else (gradients, many rows, fp32) is nn.Linear's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and _native.dense_supported(x, self.weight):
            return _native.dense_gemm(x, self.weight, self.bias)
        return super().forward(x)


def use_decode_head(model: nn.Module) -> None:
    """Give the model's output layer DecodeLinear's decode path, in place: its class only, so the parameters (and
    their tie to the input embeddings) are the same objects and the state dict is unchanged."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is nn.Linear:
        head.__class__ = DecodeLinear


ROW_BUCKETS_PER_OCTAVE = 4  # row counts a CPU inference matmul is padded to per power of two (<= 25% more rows)


def row_bucket(rows: int) -> int:
    """`rows` rounded up to one of ROW_BUCKETS_PER_OCTAVE sizes between consecutive powers of two."""
    step = 1 << max(0, rows.bit_length() - ROW_BUCKETS_PER_OCTAVE.bit_length())
    return -(-rows // step) * step


def bucketed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) with x's rows (all but the last dim, flattened) padded with zeros to `row_bucket`.

    Why: oneDNN, which runs torch's bf16 matmuls on the CPU, keeps a JIT-compiled kernel for every (row count, weight
    shape) it meets, about 0.6 MB each, in two caches (its primitive cache and ideep's, up to 1024 entries each),
    and a prefill's row count (batch x prompt width) is new almost every time: 100 distinct row counts against one
    1408x512 weight grew the RSS by 66 MB, and in `qlora-kit serve` these caches were 45-85 MB of the peak RSS over
    tools/bench_serve.py's 65-80 requests. Bucketed, a server meets a few dozen row counts in its life. Each row's
    result is computed alone (tests check the bits), so the padding changes no output."""
    rows, k = x.numel() // x.shape[-1], x.shape[-1]
    x2 = x.reshape(rows, k)
    padded = row_bucket(rows)
    if padded != rows:
        x2 = torch.cat([x2, x2.new_zeros(padded - rows, k)])
    return F.linear(x2, weight, bias)[:rows].reshape(*x.shape[:-1], weight.shape[0])


_MERGE_BLOCK = 1 << 18  # elements per row block of a merge: its fp32 product (1 MiB) stays in cache


def merge_delta(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale·B·A in W's dtype, as a new tensor; W is left as it was, also when the merge is refused."""
    return merge_delta_(weight.clone(memory_format=torch.contiguous_format), lora_a, lora_b, scale)


def merge_delta_(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """weight += scale·B·A in place, product in fp32 and one rounding to W's dtype; refuses a non-finite result.

    Why in row blocks: a row's delta depends only on its own row of B, so one block's fp32 product (1 MiB)
    is computed, added and checked while it is in cache, and no fp32 copy of the whole matrix ever exists.
    The check runs after the rounding, so a value that overflows W's dtype counts too; aminmax propagates NaN
    and is ~20x faster than isfinite().all()."""
    out_f, in_f = weight.shape
    rows = max(1, _MERGE_BLOCK // max(in_f, 1))
    with torch.no_grad():  # a merge is never differentiated; the factors may still require grad
        a = lora_a.float()
        product = torch.empty(min(rows, out_f), in_f, device=weight.device)
        for i in range(0, out_f, rows):
            block = weight[i:i + rows]
            delta = torch.mm(lora_b[i:i + rows].float(), a, out=product[:block.shape[0]])
            block.add_(delta, alpha=scale)
            if block.numel() and not all(math.isfinite(v) for v in torch.aminmax(block)):
                raise ValueError("merging the adapter produced non-finite weights (inf or nan); the adapter is corrupt")
    return weight


@dataclass
class _Merged:
    """A dense copy W + ΣB·A used for serving; `names` are the adapters folded into it."""

    weight: torch.Tensor
    names: list[str] = field(default_factory=list)


QUANT_STATE = ("codes", "absmax", "nested_absmax", "nested_code", "offset")
"""QLinear's frozen parameters holding the 4-bit weight. Every one has an integer dtype (fp32 scales are kept as
their int32 bit patterns), so `model.to(dtype)` and `.half()` never touch codes or scales while device moves and
FSDP2's sharding treat them like any parameter."""


def _to_bits(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous().view(torch.int32)


def _from_bits(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.view(torch.float32)


class QLinear(nn.Module):
    """A frozen 4-bit linear layer with named LoRA adapters (peft's attribute names, so its keys line up).

    The 4-bit weight is module state: frozen parameters named in `QUANT_STATE` (so `.to()`, `state_dict` and
    FSDP2's `fully_shard` see it as they see any parameter); `qweight` is the `QuantizedWeight` view of them.
    `state_dict` writes and reads them in the bitsandbytes/HF layout under `weight`."""

    def __init__(
        self, qweight: QuantizedWeight, bias: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.bfloat16
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self._qweight_cache: tuple | None = None  # see qweight
        self._lora_cache: tuple | None = None  # see _lora_args
        self.qweight = qweight  # registers the frozen quant-state parameters (see the setter)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.compute_dtype = compute_dtype
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        # the ModuleDicts' own name -> module dicts, for the decode path (see _decode)
        self._adapter_dicts = (self.lora_A._modules, self.lora_B._modules, self.lora_dropout._modules)
        self.scaling: dict[str, float] = {}
        self.active_adapter: str | None = None
        self.merged: _Merged | None = None

    def add_adapter(self, name: str, config: LoraConfig, dtype: torch.dtype = torch.float32) -> None:
        """A new adapter: A Kaiming-uniform like nn.Linear (the LoRA paper, peft), B zeros so B·A starts at 0."""
        device = self.qweight.device
        self.lora_A[name] = nn.Linear(self.in_features, config.r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(config.r, self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling[name] = config.scale
        if self.active_adapter is None:
            self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        if self.merged and name in self.merged.names:
            self.unmerge()
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            del d[name]
        del self.scaling[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.lora_A), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged is not None:
            return F.linear(x.to(self.merged.weight.dtype), self.merged.weight, self._bias(x)).to(x.dtype)
        fused = self._decode(x)
        if fused is not None:
            return fused
        groups = _ROW_ROUTING.get().get(id(self))
        if groups is None and self._fused_training(x):
            name = self.active_adapter
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            return _LoraTrainLinear.apply(x, x, self.qweight, a, b, self.scaling[name])
        result = linear_4bit(x.to(self.compute_dtype), self.qweight, self._bias(x)).to(x.dtype)
        if groups is not None:
            return self._per_row(x, result, groups)
        name = self.active_adapter
        if name is None or name not in self.lora_A:
            return result
        return result + self.lora_delta(x, name).to(result.dtype)

    def _fused_training(self, x: torch.Tensor) -> bool:
        """Whether this forward can take `_LoraTrainLinear`: a differentiated CPU forward of the active adapter,
        without bias or dropout, x in the compute dtype under autocast to it (where the unfused path computes
        the adapter in that dtype too). Anything else takes the unfused path."""
        name = self.active_adapter
        if not (torch.is_grad_enabled() and x.is_cpu and x.dim() >= 2 and self.bias is None) \
                or name is None or name not in self.lora_A or x.dtype != self.compute_dtype:
            return False
        a = self.lora_A[name].weight
        if not (a.requires_grad or self.lora_B[name].weight.requires_grad or x.requires_grad):
            return False
        return isinstance(self.lora_dropout[name], nn.Identity) and torch.is_autocast_enabled("cpu") and \
            torch.get_autocast_dtype("cpu") == x.dtype

    def _decode(self, x: torch.Tensor) -> torch.Tensor | None:
        """Inference on a few rows: base matmul and every row's LoRA delta in one native call (decode_matmul),
        the same sums as the unfused path in another order. None where it does not apply (gradients, dropout
        in training, adapters not in fp32, x not in the compute dtype): then the unfused path runs."""
        if torch.is_grad_enabled() or x.dtype != self.compute_dtype or not x.is_cpu or x.dim() < 2:
            return None
        routed = _ROW_ROUTING.get().get(id(self))
        # the ModuleDicts' own dicts, not their __getitem__/__getattr__: this runs for every layer at every token
        a_mods, b_mods, drop = self._adapter_dicts
        factors = []
        for name in routed if routed is not None else (self.active_adapter,):
            if name not in a_mods:
                continue
            a, b = a_mods[name]._parameters["weight"], b_mods[name]._parameters["weight"]
            dropout = self.training and type(drop[name]) is not nn.Identity
            if dropout or a.dtype != torch.float32 or b.dtype != torch.float32 or a.shape[0] > _native.GEMV_MAX_RANK:
                return None
            factors.append((name, a, b, self.scaling[name]))
        return self.qweight.decode_matmul(x, self._bias(x), self._lora_args(x, routed, factors))

    def _lora_args(self, x: torch.Tensor, routed, factors: list) -> _native.LoraArgs | None:
        """The kernel's LoRA arguments, built once per batch composition and reused by every decode step of it:
        rebuilding pointer arrays and the row map for each of a model's hundreds of layers per token cost more
        than the kernel itself at batch 1. The key holds everything they are built from (the routing, the
        factors by storage and scale, B's version counter since the kernel gets a transposed copy
        of it), so a changed adapter -- one trained in place between two generations included -- or batch gets
        new ones."""
        if not factors:
            return None
        # a routing is recognised by its rows' adapter names where it carries them (per_row_adapters builds a new
        # one each decode step), otherwise by identity (the cache holds it, so its id is not reused)
        signature = getattr(routed, "signature", routed)
        key = (signature, x.shape[:-1], tuple((a.data_ptr(), b.data_ptr(), b._version, s) for _, a, b, s in factors))
        cached = self._lora_cache
        if cached is not None and (cached[0] is signature or (isinstance(signature, tuple) and cached[0] == signature)) \
                and cached[1:-1] == key[1:]:
            return cached[-1]
        batch_adapter = torch.full((x.shape[0],), -1, dtype=torch.int32)
        for i, (name, *_) in enumerate(factors):
            rows = None if routed is None else routed[name]
            batch_adapter[slice(None) if rows is None else rows] = i
        per_row = x.numel() // (x.shape[0] * x.shape[-1])
        args = _native.lora_args([(a, b, s) for _, a, b, s in factors], batch_adapter.repeat_interleave(per_row))
        self._lora_cache = (*key, args)
        return args

    def _per_row(self, x: torch.Tensor, result: torch.Tensor, groups: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Each batch row gets its own adapter: the base matmul once for all rows, each B·A on its rows only.

        Added in place: `result` is this forward's own new output, and `index_add` (not `_`) copied the whole
        output once per adapter in the batch (16 copies per layer for 16 rows over 16 adapters)."""
        for name, rows in groups.items():
            if name in self.lora_A:
                rows = rows.to(x.device)
                result.index_add_(0, rows, self.lora_delta(x.index_select(0, rows), name).to(result.dtype))
        return result

    def _bias(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.bias is None:
            return None
        dtype = self.merged.weight.dtype if self.merged is not None else self.compute_dtype
        return self.bias.to(dtype)

    def lora_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """scale · B(A(dropout(x))) for adapter `name`, in the adapter's dtype (autocast may lower it).

        Under autocast to x's own dtype without dropout, x goes in as it is: autocast would cast it back from the
        adapter's dtype anyway, and that round trip is exact, so skipping it changes no bit and saves two copies
        of the activations per layer (four with recomputation)."""
        a = self.lora_A[name]
        dropout = self.lora_dropout[name]
        device = x.device.type
        as_is = isinstance(dropout, nn.Identity) and torch.is_autocast_enabled(device) and \
            torch.get_autocast_dtype(device) == x.dtype
        return self.lora_B[name](a(dropout(x if as_is else x.to(a.weight.dtype)))) * self.scaling[name]

    def merge(self, name: str | None = None) -> None:
        """Fold adapter `name` (default: the active one) into a dense copy of the dequantized weight."""
        name = name or self.active_adapter
        if self.merged is None:
            self.merged = _Merged(self.qweight.dequantize(self.compute_dtype))
        if name in self.merged.names:
            return
        w = merge_delta(self.merged.weight, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])
        self.merged.weight, self.merged.names = w, self.merged.names + [name]

    def unmerge(self) -> None:
        """Drop the dense merged copy and return to the 4-bit path. Nothing is subtracted: merging never touched
        the 4-bit weight or the adapters, so forgetting the copy restores the unmerged layer exactly."""
        self.merged = None

    @property
    def qweight(self) -> QuantizedWeight:
        """The 4-bit weight, built from the module's own quant-state parameters, so that what forward and backward
        see is whatever those parameters are now (under FSDP2: the block's all-gathered tensors). It is rebuilt
        only when one of them is another tensor or has moved (`.to()` swaps a parameter's data in place): at
        decode, building it per call cost as much as a small layer's matmul. The check is per tensor identity
        plus the storage of the codes and scales: every path that moves one moves them all together."""
        ps = self._parameters
        codes, absmax, nested_absmax, nested_code, offset = params = (
            ps["codes"], ps["absmax"], ps["nested_absmax"], ps["nested_code"], ps["offset"])
        cached = self._qweight_cache
        if cached is not None:
            old = cached[0]
            if (old[0] is codes and old[1] is absmax and old[2] is nested_absmax and old[3] is nested_code
                    and old[4] is offset and cached[1] == (codes.data_ptr(), absmax.data_ptr())):
                return cached[2]
        nested = nested_absmax is not None
        qw = QuantizedWeight(
            codes.view(-1), absmax if nested else _from_bits(absmax), self.weight_shape,
            self.weight_dtype, self.blocksize, self.quant_type, _from_bits(nested_absmax),
            _from_bits(nested_code), _from_bits(offset).reshape(()) if nested else None,
        )
        self._qweight_cache = (params, (codes.data_ptr(), absmax.data_ptr()), qw)
        return qw

    @qweight.setter
    def qweight(self, qw: QuantizedWeight) -> None:
        self.weight_shape, self.weight_dtype = torch.Size(qw.shape), qw.dtype
        self.blocksize, self.quant_type = qw.blocksize, qw.quant_type
        nested = qw.nested_absmax is not None
        state = {
            "codes": qw.packed.reshape(-1, 1),  # bitsandbytes' shape for the packed codes
            "absmax": qw.absmax if nested else _to_bits(qw.absmax),
            "nested_absmax": _to_bits(qw.nested_absmax),
            "nested_code": _to_bits(qw.nested_code),
            "offset": _to_bits(qw.offset.reshape(1)) if nested else None,
        }
        for name, tensor in state.items():
            self.register_parameter(name, None if tensor is None else nn.Parameter(tensor, requires_grad=False))

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        # Only the names change: bitsandbytes' keys (`weight.absmax`, `weight.quant_state.…`) hold dots, which
        # parameter names cannot.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in QUANT_STATE:
            destination.pop(prefix + name, None)
        destination.update(self.qweight.state_dict(prefix + "weight"))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        keys = [k for k in state_dict if k == prefix + "weight" or k.startswith(prefix + "weight.")]
        if keys:  # the bitsandbytes layout in, whatever shape and quantization the layer held before
            self.qweight = QuantizedWeight.from_state_dict({k[len(prefix):]: state_dict[k] for k in keys})
            for k in keys:
                state_dict.pop(k)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        if keys:  # loaded above under the bitsandbytes names
            missing[:] = [k for k in missing if k.removeprefix(prefix) not in QUANT_STATE]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant={self.qweight.config}, "
            f"adapters={list(self.lora_A)}"
        )


class RowGroups(dict):
    """Batch rows per adapter name ({name: row indices}) plus `signature`, every row's adapter name in order: two
    routings with the same signature route the same rows the same way, which lets a layer reuse what it built
    for the last decode step's batch."""

    def __init__(self, names: Sequence[str | None]) -> None:
        super().__init__(
            (n, torch.tensor([i for i, m in enumerate(names) if m == n], dtype=torch.long))
            for n in dict.fromkeys(names) if n is not None
        )
        self.signature = tuple(names)


_ROW_ROUTING: ContextVar[Mapping[int, Mapping[str, torch.Tensor]]] = ContextVar("qlora_kit_row_routing", default={})
"""id(layer) -> {adapter name: batch rows}, for the forwards run in the current context (thread, task)."""


@contextmanager
def route_rows(layers: Iterable[QLinear], groups: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, forwards of `layers` run in the calling context give batch rows `groups[name]` adapter
    `name` and the rows named nowhere the bare base. Re-entrant (an inner block wins for its layers until it
    exits) and thread-safe: the routing is this context's, never the layers' own state. Forwards run in another
    thread (a CUDA autograd worker recomputing a checkpointed block, say) do not see it."""
    token = _ROW_ROUTING.set({**_ROW_ROUTING.get(), **{id(layer): groups for layer in layers}})
    try:
        yield
    finally:
        _ROW_ROUTING.reset(token)


def add_lora(model: nn.Module, config: LoraConfig, name: str = "default") -> list[str]:
    """Add adapter `name` to every targeted `QLinear`; refuse a target list that names nothing here."""
    layers = [n for n, m in model.named_modules() if isinstance(m, QLinear)]
    chosen = [n for n in layers if config.targets(n)]
    if not chosen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in layers})
        raise ConfigError(
            f"lora.target_modules {list(config.target_modules)} matched no linear layer; "
            f"this model has: {', '.join(leaves)} (or use all-linear)"
        )
    for n in chosen:
        model.get_submodule(n).add_adapter(name, config)
    return chosen


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable adapter tensors by name: found by what they are (LoRA factors of a QLinear)."""
    return {
        f"{mod_name}.{n}": p
        for mod_name, mod in model.named_modules() if isinstance(mod, QLinear)
        for n, p in mod.named_parameters(recurse=True) if n.startswith(("lora_A.", "lora_B."))
    }


def quant_state_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The frozen tensors that hold every QLinear's 4-bit weight, by name: what "the 4-bit base" occupies."""
    return {
        f"{mod_name}.{n}": p
        for mod_name, mod in model.named_modules() if isinstance(mod, QLinear)
        for n, p in mod.named_parameters(recurse=False) if n in QUANT_STATE
    }
