"""The shapes a memory plan is arithmetic on: a model's 4-bit linears, blocks and sizes, and the step's settings.

Read once from a meta-device build (`ModelShape.from_config`), then reused by every search `plan` runs, so
"what is the largest batch that fits" costs arithmetic, not model builds.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qlora_kit.config import Recipe
from qlora_kit.device import DTYPES
from qlora_kit.errors import ConfigError
from qlora_kit.lora import LoraConfig
from qlora_kit.quant import QuantConfig

GiB = 1024**3
ATTENTION = ("sdpa", "eager")
DEVICES = ("cuda", "cpu")
ITEMSIZE = {name: dtype.itemsize for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class LinearShape:
    """One 4-bit linear: its name, shape and block index."""

    name: str
    in_features: int
    out_features: int
    block: int | None
    in_attention: bool = False
    """Part of its block's attention module (the block's first module with linears) rather than of its MLP."""
    reads_embedding: bool = False
    """One of the first block's attention input projections, whose input is the normalized embedding output."""


@dataclass(frozen=True)
class ModelShape:
    """What the arithmetic needs from a model: read once from the meta-device build, then reused for searches."""

    name: str
    linears: tuple[LinearShape, ...]
    plain_numel: int
    """Parameters kept in the compute dtype: embeddings, norms, output head, biases (tied weights once)."""
    buffer_bytes: int
    blocks: int
    norms_per_block: int
    gated_mlp: bool
    hidden: int
    intermediate: int
    heads: int
    head_dim: int
    vocab: int
    has_lm_head: bool
    max_positions: int | None

    @classmethod
    def from_config(cls, config, trust_remote_code: bool = False) -> ModelShape:
        from qlora_kit.loader import build_empty, quant_targets

        model = build_empty(config, torch.bfloat16, trust_remote_code)
        targets = set(quant_targets(model))
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if getattr(config, "tie_word_embeddings", False) and head is not None:  # as the loader ties them
            head.weight = model.get_input_embeddings().weight
        return cls.from_model(model, config, targets)

    @classmethod
    def from_model(cls, model: nn.Module, config, targets: set[str]) -> ModelShape:
        text = config.get_text_config()
        hidden = text.hidden_size
        heads = text.num_attention_heads
        prefix, blocks = _block_list(model)
        linears = _linear_shapes(model, targets, prefix)
        quantized = {f"{n}.weight" for n in targets}
        plain = sum(p.numel() for n, p in model.named_parameters() if n not in quantized)
        block0 = blocks[0] if blocks else nn.Module()
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return cls(
            name=type(model).__name__,
            linears=linears,
            plain_numel=plain,
            buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
            blocks=len(blocks),
            norms_per_block=sum("Norm" in type(m).__name__ for m in block0.modules()),
            gated_mlp=any("gate" in lin.name.rsplit(".", 1)[-1] for lin in linears if lin.block == 0),
            hidden=hidden,
            intermediate=getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden,
            heads=heads,
            head_dim=getattr(text, "head_dim", None) or hidden // heads,
            vocab=text.vocab_size,
            has_lm_head=head is not None,
            max_positions=getattr(text, "max_position_embeddings", None),
        )

    @property
    def params(self) -> int:
        return self.plain_numel + sum(lin.in_features * lin.out_features for lin in self.linears)

    @functools.cached_property
    def by_block(self) -> dict[int | None, tuple[LinearShape, ...]]:
        """The 4-bit linears grouped by block index (None: outside the blocks)."""
        out: dict[int | None, list[LinearShape]] = {}
        for lin in self.linears:
            out.setdefault(lin.block, []).append(lin)
        return {k: tuple(v) for k, v in out.items()}


def _block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: the ModuleList holding the most linear layers."""
    best, best_count = ("", nn.ModuleList()), 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            count = sum(isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D" for m in mod.modules())
            if count > best_count:
                best, best_count = (name, mod), count
    return best


def _linear_shapes(model: nn.Module, targets: set[str], prefix: str) -> tuple[LinearShape, ...]:
    out = []
    for name in targets:
        mod = model.get_submodule(name)
        w = mod.weight
        out_f, in_f = (w.shape[1], w.shape[0]) if type(mod).__name__ == "Conv1D" else tuple(w.shape)
        rest = name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else ""
        block = int(rest.split(".", 1)[0]) if rest.split(".", 1)[0].isdigit() else None
        out.append(LinearShape(name, in_f, out_f, block))
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    out.sort(key=lambda lin: order[lin.name])
    return _mark_attention(tuple(out))


def _mark_attention(linears: tuple[LinearShape, ...]) -> tuple[LinearShape, ...]:
    """Mark each block's attention linears (those of the block's first module holding linears), and among the
    first block's the input projections (all but the last, the output projection)."""
    out, parents = [], {}
    for lin in linears:
        if lin.block is None:
            out.append(lin)
            continue
        parent = lin.name.rpartition(".")[0]
        attention = parents.setdefault(lin.block, parent) == parent
        out.append(dataclasses.replace(lin, in_attention=attention))
    first = [lin.name for lin in out if lin.block == 0 and lin.in_attention]
    inputs = set(first[:-1])
    return tuple(dataclasses.replace(lin, reads_embedding=True) if lin.name in inputs else lin for lin in out)


@dataclass(frozen=True)
class Settings:
    """The knobs a plan depends on: a Recipe's, which `Recipe` has validated (`plan.plan_memory` builds a Recipe
    from loose arguments for that), plus the attention kernel and the device, checked here."""

    batch_size: int = 1
    seq_len: int = 512
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    optimizer: str = "paged_adamw_32bit"
    gradient_checkpointing: bool = True
    attn_implementation: str = "sdpa"
    compute_dtype: str = "bfloat16"
    device: str = "cuda"
    gpus: int = 1
    """Processes (one GPU each) the run is spread over; batch_size is per process."""
    strategy: str = "fsdp"
    """With gpus > 1: "fsdp" shards weights, adapters, gradients and optimizer states; "ddp" replicates them."""
    offload_base: bool = False
    """FSDP's CPU offload: sharded parameters, gradients and optimizer states live in host memory."""
    reshard_after_forward: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.gpus, int) or self.gpus < 1:
            raise ConfigError(f"--gpus must be an integer >= 1, got {self.gpus!r}")
        if self.strategy not in ("fsdp", "ddp"):
            raise ConfigError(f"--strategy must be fsdp or ddp, got {self.strategy!r}")
        if self.offload_base and self.strategy != "fsdp":
            raise ConfigError("--offload-base needs --strategy fsdp (DDP cannot offload)")
        for key, choices in (("attn_implementation", ATTENTION), ("device", DEVICES)):
            if getattr(self, key) not in choices:
                raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {getattr(self, key)!r}")

    @classmethod
    def from_recipe(cls, recipe: Recipe, **changes: Any) -> Settings:
        d = recipe.distributed
        base = cls(recipe.batch_size, recipe.max_seq_len, recipe.lora, recipe.quant, recipe.optimizer,
                   recipe.gradient_checkpointing, compute_dtype=recipe.compute_dtype, strategy=d.strategy,
                   offload_base=d.cpu_offload, reshard_after_forward=d.reshard_after_forward)
        return dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})
