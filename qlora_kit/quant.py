"""One type owns a 4-bit weight: packed codes plus its quantization state, in the bitsandbytes layout.

Quantization is explicit (`QuantizedWeight.quantize`), and so is moving (`.to(device)`) and serializing
(`state_dict` / `from_state_dict`): nothing quantizes as a side effect of a device move. The layout is
bitsandbytes' bit for bit — codes packed two per byte (first element in the high nibble), fp32 absmax per
block, and with double quantization the absmax minus its mean quantized again with the 8-bit dynamic map in
blocks of 256 — so checkpoints move freely between qlora-kit, bitsandbytes and transformers.

Kernels: on CPU our own (`_native`, bit-identical to bitsandbytes and much faster); on CUDA bitsandbytes'.
That holds for the nested 8-bit stage too: it is only 1/64 of the data, but undoing it is part of every
dequantize, and bitsandbytes' CPU blockwise call costs milliseconds however few the values.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cache

import torch
from qlora_kit import _native, codes
from qlora_kit.errors import CheckpointError, ConfigError

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class QuantConfig:
    """How the frozen base is stored (QLoRA: NF4, double quant, blocks of 64)."""

    type: str = "nf4"
    """4-bit data type: "nf4" (normal-quantile levels, best for normally distributed weights) or "fp4"."""
    double_quant: bool = True
    """Quantize the per-block absmax values again to 8 bits in blocks of 256 (saves ~0.37 bits/param)."""
    blocksize: int = 64
    """Elements that share one absmax; a power of two from 32 to 4096."""
    scale_search: bool = False
    """Choose each block's absmax to minimise its reconstruction error, weighted per input by that input's second
    moment, instead of taking the raw max (same format, read unchanged by bitsandbytes; see quant_search.py). The
    moments come from random token ids run through the model once (no data), or from the calibration text when
    `calibration` is set. Off: bit-identical to bitsandbytes."""
    calibration: str | None = None
    """A text / JSONL file whose first few thousand tokens drive GPTQ-style error-compensating rounding of the
    codes (calibrate.py), same format again. Applied where whole models are quantized (loading, `quantize`); a
    lone weight has no inputs, so `QuantizedWeight.quantize` ignores it."""

    def __post_init__(self) -> None:
        if self.type not in QUANT_TYPES:
            raise ConfigError(f"quant.type must be one of {QUANT_TYPES}, got {self.type!r}")
        if not isinstance(self.double_quant, bool):
            raise ConfigError(f"quant.double_quant must be true or false, got {self.double_quant!r}")
        if self.blocksize not in BLOCKSIZES:
            raise ConfigError(f"quant.blocksize must be a power of two in 32..4096, got {self.blocksize!r}")
        if not isinstance(self.scale_search, bool):
            raise ConfigError(f"quant.scale_search must be true or false, got {self.scale_search!r}")
        if self.calibration is not None and not (isinstance(self.calibration, str) and self.calibration):
            raise ConfigError(f"quant.calibration must be a file path, got {self.calibration!r}")

    def __str__(self) -> str:
        """The layout in one word, as every message and report writes it: "nf4+dq/64", "fp4/128"."""
        return f"{self.type}{'+dq' if self.double_quant else ''}/{self.blocksize}"

    def bits_per_param(self) -> float:
        """Storage cost of one parameter: 4 bits of code plus the share of its block's scale."""
        if not self.double_quant:
            return 4 + 32 / self.blocksize
        return 4 + 8 / self.blocksize + 32 / (self.blocksize * NESTED_BLOCKSIZE)


def stored_quant_config(qc) -> QuantConfig | None:
    """The quant settings of a checkpoint saved in the bitsandbytes 4-bit layout (config.json's
    quantization_config, a dict or transformers' object), or None when it has none."""
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit"):
        raise CheckpointError(
            f"config.json has quantization_config {qc.get('quant_method')!r} "
            f"(load_in_4bit={qc.get('load_in_4bit')}); qlora-kit loads bf16/fp16/fp32 or bitsandbytes 4-bit checkpoints"
        )
    return QuantConfig(qc.get("bnb_4bit_quant_type", "fp4"), bool(qc.get("bnb_4bit_use_double_quant", False)))


def code_table(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 fp32 levels a 4-bit code indexes (bitsandbytes' table; tests keep the two equal)."""
    return codes.four_bit(quant_type, device)


@cache
def _device_code(quant_type: str, device: torch.device) -> torch.Tensor:
    """The 16 levels kept on an accelerator once, not copied there for every decode step."""
    return code_table(quant_type, device)


@cache
def _bnb():
    """bitsandbytes.functional, imported on first CUDA use only: the import costs ~3 s that CPU work never needs
    (it also registers the torch.ops.bitsandbytes kernels the CUDA paths call)."""
    from bitsandbytes import functional

    return functional


@dataclass
class QuantizedWeight:
    """A frozen weight in 4 bits. `absmax` is fp32 per block, or uint8 codes when `nested_absmax` is set."""

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    _gemv: tuple | None = field(default=None, repr=False, compare=False)  # see gemv_args

    @classmethod
    def quantize(cls, weight: torch.Tensor, config: QuantConfig = QuantConfig(),
                 importance: torch.Tensor | None = None) -> QuantizedWeight:
        """Quantize `weight` (bf16/fp16/fp32) exactly as bitsandbytes' quantize_4bit would.

        `importance` (scale search only): one value >= 0 per column (per input of a linear [out, in]), the second
        moment of that input; the search then minimises each block's error weighted by it (quant_search.py)."""
        if weight.dtype not in FLOAT_DTYPES:
            raise ValueError(f"can only quantize bf16/fp16/fp32 tensors, got {weight.dtype}")
        if config.scale_search:
            return cls._searched(weight, config, importance)
        if weight.device.type == "cpu":
            packed, absmax = _native.quantize_4bit(weight, config.blocksize, config.type)
        else:
            _bnb()
            packed, absmax = torch.ops.bitsandbytes.quantize_4bit.default(
                weight.contiguous(), config.blocksize, config.type, torch.uint8
            )
            packed = packed.reshape(-1)
        qw = cls(packed, absmax, weight.shape, weight.dtype, config.blocksize, config.type)
        return qw._nest() if config.double_quant else qw

    @classmethod
    def _searched(cls, weight: torch.Tensor, config: QuantConfig, importance: torch.Tensor | None) -> QuantizedWeight:
        """Scale search runs on CPU (one weight at a time: the loader streams), whatever the weight's device."""
        from qlora_kit.quant_search import search_quantize

        packed, absmax, nested_absmax, nested_code, offset = search_quantize(
            weight.detach().cpu(), config.blocksize, config.type, config.double_quant, importance
        )
        qw = cls(packed, absmax, weight.shape, weight.dtype, config.blocksize, config.type,
                 nested_absmax, nested_code, offset)
        return qw.to(weight.device)

    def _nest(self) -> QuantizedWeight:
        # bitsandbytes centres the absmax values on their mean before the 8-bit stage; same torch ops, same bits.
        offset = self.absmax.mean()
        if self.device.type == "cpu":
            code = codes.dynamic_map()  # each weight owns its table, as bitsandbytes' QuantState does
            qabsmax, nested_absmax = _native.quantize_blockwise(self.absmax - offset, code, NESTED_BLOCKSIZE)
        else:
            qabsmax, state2 = _bnb().quantize_blockwise(self.absmax - offset, blocksize=NESTED_BLOCKSIZE)
            nested_absmax, code = state2.absmax, state2.code
        self.absmax, self.offset = qabsmax, offset
        self.nested_absmax, self.nested_code = nested_absmax, code
        return self

    @property
    def config(self) -> QuantConfig:
        return QuantConfig(self.quant_type, self.nested_absmax is not None, self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def absmax_fp32(self) -> torch.Tensor:
        """Per-block scales in fp32, undoing the nested 8-bit stage when there is one."""
        if self.nested_absmax is None:
            return self.absmax
        if self.device.type == "cpu":
            return _native.dequantize_blockwise(
                self.absmax, self.nested_absmax, self.nested_code, NESTED_BLOCKSIZE, offset=self.offset
            )
        absmax = _bnb().dequantize_blockwise(
            self.absmax, absmax=self.nested_absmax, code=self.nested_code, blocksize=NESTED_BLOCKSIZE
        )
        return absmax + self.offset

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight in `dtype` (default: the dtype it was quantized from), equal to bitsandbytes' result.

        `out` (CPU only): a contiguous tensor of the weight's shape and `dtype` to write into, for callers that
        own a buffer of that size already."""
        dtype = dtype or self.dtype
        absmax = self.absmax_fp32()
        if self.device.type == "cpu":
            return _native.dequantize_4bit(
                self.packed, absmax, self.blocksize, self.quant_type, self.shape, dtype, out=out
            )
        if out is not None:
            raise ValueError("dequantize(out=...) is for CPU weights")
        _bnb()
        return torch.ops.bitsandbytes.dequantize_4bit.default(
            self.packed, absmax, self.blocksize, self.quant_type, list(self.shape), dtype
        )

    def gemv_args(self) -> _native.GemvWeight:
        """This weight's arguments for the CPU decode kernel, built on first use and kept while the tensors are
        the same ones (a weight whose tensors are replaced gets new ones)."""
        cached = self._gemv
        if cached is None or cached[0] is not self.packed or cached[1] is not self.absmax:
            nested = None if self.nested_absmax is None else (self.nested_absmax, self.nested_code, self.offset)
            args = _native.gemv_weight(self.packed, self.absmax, self.blocksize, self.quant_type, self.shape[0], nested)
            self._gemv = cached = (self.packed, self.absmax, args)
        return cached[2]

    def decode_matmul(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, lora: _native.LoraArgs | None = None
    ) -> torch.Tensor | None:
        """x Wᵀ + bias without building W, for the few rows of a decode step; None where no such kernel applies
        (then dequantize and matmul). CPU: the kit's kernel (`_native.gemm_4bit`, up to GEMV_MAX_ROWS rows), which
        also adds each row's LoRA delta given as `lora` (`_native.lora_args`); CUDA: bitsandbytes' gemv_4bit, for
        one row, as its own matmul_4bit picks it (no `lora`). Not differentiable: for
        inference only. Each weight is the value `dequantize(x.dtype)` gives; only the order of the fp32
        additions differs from F.linear(x, W) (CPU: within one output ulp plus k·2⁻²⁴·Σ|x||w|, see gemv4.c)."""
        k = self.shape[-1]
        if self.packed.is_cpu:
            if not _native.gemv_supported(x, k, self.blocksize):
                return None
            return _native.gemm_4bit(x, self.gemv_args(), bias, lora)
        if self.device.type != "cuda" or lora is not None or x.numel() != k or k % self.blocksize or x.dtype not in FLOAT_DTYPES:
            return None
        _bnb()
        y = torch.ops.bitsandbytes.gemv_4bit.default(
            x, self.packed, list(self.shape), self.absmax_fp32(), _device_code(self.quant_type, x.device),
            self.blocksize,
        )
        return y if bias is None else y + bias.to(y.dtype)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """A copy on `device`; the codes are moved as they are, never re-quantized."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedWeight(
            move(self.packed), move(self.absmax), self.shape, self.dtype, self.blocksize, self.quant_type,
            move(self.nested_absmax), move(self.nested_code), move(self.offset),
        )

    def nbytes(self) -> int:
        """Bytes this weight occupies (codes, scales, nested scales; the shared code tables excluded)."""
        tensors = (self.packed, self.absmax, self.nested_absmax)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def bits_per_param(self) -> float:
        return 8 * self.nbytes() / self.numel

    def state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """Tensors under `prefix` in the HF/bitsandbytes layout, ready for safetensors."""
        out = {
            prefix: self.packed.reshape(-1, 1),
            f"{prefix}.absmax": self.absmax,
            f"{prefix}.quant_map": code_table(self.quant_type, self.device),
        }
        meta: dict[str, object] = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": list(self.shape),
        }
        if self.nested_absmax is not None:
            out[f"{prefix}.nested_absmax"] = self.nested_absmax
            out[f"{prefix}.nested_quant_map"] = self.nested_code.clone()
            meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=self.offset.item())
        out[f"{prefix}.quant_state.bitsandbytes__{self.quant_type}"] = _pack_json(meta)
        return out

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], prefix: str = "weight") -> QuantizedWeight:
        """Rebuild from the layout `state_dict` writes (and bitsandbytes/transformers save)."""
        qs_keys = [k for k in tensors if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
        if len(qs_keys) != 1:
            raise CheckpointError(f"{prefix}: expected one quant_state.bitsandbytes__* entry, found {len(qs_keys)}")
        meta = _unpack_json(tensors[qs_keys[0]])
        nested = "nested_offset" in meta
        qw = cls(
            packed=tensors[prefix].reshape(-1).view(torch.uint8),
            absmax=tensors[f"{prefix}.absmax"],
            shape=torch.Size(meta["shape"]),
            dtype=getattr(torch, meta["dtype"]),
            blocksize=int(meta["blocksize"]),
            quant_type=meta["quant_type"],
            nested_absmax=tensors[f"{prefix}.nested_absmax"] if nested else None,
            nested_code=tensors[f"{prefix}.nested_quant_map"] if nested else None,
            offset=torch.tensor(float(meta["nested_offset"])) if nested else None,
        )
        qw._check(prefix)
        return qw

    def _check(self, name: str) -> None:
        blocks = -(-self.numel // self.blocksize)
        if self.packed.numel() != -(-self.numel // 2) or self.absmax.numel() != blocks:
            raise CheckpointError(
                f"{name}: quantized sizes do not match shape {tuple(self.shape)} "
                f"(codes {self.packed.numel()}, scales {self.absmax.numel()}); the checkpoint is inconsistent"
            )


def _pack_json(obj: dict[str, object]) -> torch.Tensor:
    return torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8)


def _unpack_json(t: torch.Tensor) -> dict:
    return json.loads(bytes(t.cpu().tolist()).decode("utf-8"))
