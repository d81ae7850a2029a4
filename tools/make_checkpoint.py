"""Write a random-weight Hugging Face checkpoint directory for a named model shape, streaming.

Benchmark and test data: the directory looks like what `save_pretrained` writes (config.json,
generation_config.json, sharded bf16 safetensors with an index, tied weights left out), so any loader can read it.

The model is never materialized. It is built on the meta device only to list tensor names, shapes and dtypes and
to learn which weights are tied; each tensor is then generated in chunks and written straight into its shard
(the safetensors header is computed up front from the shapes), so memory stays at one chunk (32 MiB), not one
shard or one model. Weights are N(0, 0.02), seeded per tensor name; norm parameters take the model's own init
(1 for a LayerNorm/RMSNorm scale, 0 for its bias, and 0 for Gemma's scale, which its RMSNorm applies as 1 + w).

    python tools/make_checkpoint.py llama-13b /work/bigckpt/llama-13b
    python tools/make_checkpoint.py tiny-llama /tmp/tiny --arch gemma --layers 2 --shard-size 2MB

The directory appears all at once: everything is written into OUT.tmp, fsynced, then renamed to OUT.
"""

import argparse
import copy
import dataclasses
import inspect
import json
import math
import os
import re
import shutil
import struct
import time
import zlib
from pathlib import Path

import torch

CHUNK_ELEMENTS = 16 * 1024 * 1024  # per generated chunk: 32 MiB in bf16; bounds memory, not speed
INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class Shape:
    """An architecture-independent model shape; `build_config` maps it onto each config class's field names."""

    arch: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_positions: int = 2048
    tie_embeddings: bool | None = None  # None: the architecture's default (tied for Gemma and GPT-2)


PRESETS = {
    # ~5M params: fast enough for unit tests. Widths are multiples of 32: bitsandbytes' CPU inference kernel
    # (AVX512-BF16 machines, no grad) repacks 4-bit weights in blocks of 32 output rows and asserts on the rest.
    "tiny-llama": Shape("llama", hidden=256, layers=4, heads=8, kv_heads=4, intermediate=704, vocab=4096),
    # JackFram/llama-160m shape (162M).
    "llama-160m": Shape("llama", hidden=768, layers=12, heads=12, kv_heads=12, intermediate=3072, vocab=32000),
    # ~301M: big enough that the load itself, not importing torch/transformers, dominates a load benchmark.
    "llama-300m": Shape("llama", hidden=1024, layers=14, heads=16, kv_heads=16, intermediate=4096, vocab=32000),
    # SmolLM2-135M shape (134.5M, tied embeddings, 49k vocab): the generation benchmark's small model.
    "smollm2-135m": Shape("llama", hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152,
                          max_positions=8192, tie_embeddings=True),
    # Llama-3.2-1B shape (1.24B, tied embeddings, 128k vocab). Presets copy shapes only, not rope/eps settings.
    "llama-1b": Shape("llama", hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256,
                      max_positions=4096, tie_embeddings=True),
    # Llama-2 shapes (6.7B, 13.0B, 69B).
    "llama-7b": Shape("llama", hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000,
                      max_positions=4096),
    "llama-13b": Shape("llama", hidden=5120, layers=40, heads=40, kv_heads=40, intermediate=13824, vocab=32000,
                       max_positions=4096),
    "llama-70b": Shape("llama", hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=28672, vocab=32000,
                       max_positions=4096),
}

# Shape field -> config keyword, per architecture. GPT-2 has no GQA, so it takes no kv_heads.
_DECODER_FIELDS = {"hidden": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
                   "kv_heads": "num_key_value_heads", "intermediate": "intermediate_size",
                   "vocab": "vocab_size", "max_positions": "max_position_embeddings"}
_GPT2_FIELDS = {"hidden": "n_embd", "layers": "n_layer", "heads": "n_head", "intermediate": "n_inner",
                "vocab": "vocab_size", "max_positions": "n_positions"}
ARCHS = {
    "llama": ("LlamaConfig", _DECODER_FIELDS),
    "mistral": ("MistralConfig", _DECODER_FIELDS),
    "qwen2": ("Qwen2Config", _DECODER_FIELDS),
    "phi3": ("Phi3Config", _DECODER_FIELDS),
    "gemma": ("GemmaConfig", _DECODER_FIELDS),
    "gpt2": ("GPT2Config", _GPT2_FIELDS),
}

_SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


@dataclasses.dataclass
class TensorSpec:
    """One tensor to write: `value` is set for the few small tensors with a fixed init (norms); else random."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    value: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def build_config(shape: Shape):
    """The transformers config for `shape`, in bf16, with special-token ids kept inside the vocabulary."""
    import transformers

    class_name, fields = ARCHS[shape.arch]
    config_cls = getattr(transformers, class_name)
    kwargs = {fields[f]: getattr(shape, f) for f in fields}
    accepted = inspect.signature(config_cls.__init__).parameters
    if "head_dim" in accepted:  # Gemma defaults to 256 whatever the width; the others derive it, some can't take it
        kwargs["head_dim"] = shape.hidden // shape.heads
    if shape.tie_embeddings is not None:
        kwargs["tie_word_embeddings"] = shape.tie_embeddings
    config = config_cls(**kwargs)
    # Default ids are the real models' (Phi-3 pads with 32000, GPT-2 ends with 50256); a smaller vocab must hold them.
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token = getattr(config, attr, None)
        if isinstance(token, int) and token >= shape.vocab:
            setattr(config, attr, None if attr == "pad_token_id" else shape.vocab - 1)
    config.dtype = torch.bfloat16
    return config


def plan_tensors(config) -> tuple[list[TensorSpec], str]:
    """What `save_pretrained` would write for `config` (tied copies dropped), and the model class name."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    params = dict(model.named_parameters(remove_duplicate=False))
    fixed = _fixed_init_values(model)
    specs = []
    for name, tensor in model.state_dict().items():
        if name in tied:
            continue
        if name not in params:
            raise NotImplementedError(f"persistent buffer {name!r}: this tool only generates parameters")
        specs.append(TensorSpec(name, tuple(tensor.shape), tensor.dtype, fixed.get(name)))
    return specs, type(model).__name__


def _fixed_init_values(model) -> dict[str, torch.Tensor]:
    """Norm parameters as the model itself initializes them, computed on a CPU copy of each (small) norm module.

    Going through the model's `_init_weights` keeps architecture quirks (Gemma's 1 + w scale) out of this tool.
    """
    values = {}
    for module_name, module in model.named_modules():
        if not _is_norm(module):
            continue
        local = copy.deepcopy(module).to_empty(device="cpu")
        model._init_weights(local)
        for param_name, param in local.named_parameters(recurse=False):
            values[f"{module_name}.{param_name}"] = param.detach().clone()
    return values


def _is_norm(module) -> bool:
    # The same test transformers' own _init_weights uses: norm classes are renamed per model, so match by name.
    name = type(module).__name__
    return "LayerNorm" in name or "RMSNorm" in name


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9, '2MiB' -> 2 * 2**20, '1000' -> 1000 (transformers' max_shard_size convention)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 5GB, 500MB, 2MiB or a byte count")
    number, prefix, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** "_KMGT".index(prefix or "_"))


def split_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Greedy, in state-dict order, like save_pretrained; a tensor larger than max_bytes gets a shard of its own."""
    shards, current, size = [], [], 0
    for spec in specs:
        if current and size + spec.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += spec.nbytes
    if current:
        shards.append(current)
    return shards


def safetensors_header(specs: list[TensorSpec]) -> bytes:
    """The length-prefixed JSON header, space-padded to 8 bytes, for `specs` laid out back to back in order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for spec in specs:
        header[spec.name] = {"dtype": _SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


def write_safetensors(path: Path, specs: list[TensorSpec], seed: int) -> None:
    with open(path, "wb") as f:
        f.write(safetensors_header(specs))
        for spec in specs:
            if spec.value is not None:
                f.write(_raw_bytes(spec.value.to(spec.dtype).contiguous()))
                continue
            for chunk in _random_chunks(spec, seed):
                f.write(_raw_bytes(chunk))


def _random_chunks(spec: TensorSpec, seed: int):
    # Seeded by name, so a tensor's values don't depend on shard size or on which other tensors exist.
    generator = torch.Generator().manual_seed((seed << 32) | zlib.crc32(spec.name.encode()))
    remaining = spec.numel
    while remaining:
        n = min(remaining, CHUNK_ELEMENTS)
        # normal_ straight into bf16 is ~3x faster on CPU than randn in fp32 followed by a cast.
        yield torch.empty(n, dtype=spec.dtype).normal_(0.0, INIT_STD, generator=generator)
        remaining -= n


def _raw_bytes(tensor: torch.Tensor):
    return tensor.reshape(-1).view(torch.uint8).numpy()  # little-endian host, as safetensors expects


def write_checkpoint(config, out: Path, shard_size: int = 5 * 10**9, seed: int = 0, force: bool = False) -> dict:
    """Write the checkpoint for `config` into `out` atomically; returns a summary (files, bytes, params, seconds)."""
    from transformers import GenerationConfig

    start = time.perf_counter()
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    specs, model_class = plan_tensors(config)
    total_bytes = sum(s.nbytes for s in specs)
    tmp = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted run
    free = shutil.disk_usage(out.parent).free
    if total_bytes > free:  # fail now rather than after an hour of writing
        raise OSError(f"{out.parent} has {free / 1e9:.1f} GB free; the checkpoint needs {total_bytes / 1e9:.1f} GB")
    tmp.mkdir()
    config.architectures = [model_class]
    config.save_pretrained(tmp)
    GenerationConfig.from_model_config(config).save_pretrained(tmp)

    shards = split_shards(specs, shard_size)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    for name, shard in zip(names, shards):
        write_safetensors(tmp / name, shard, seed)
    if len(shards) > 1:
        index = {"metadata": {"total_parameters": sum(s.numel for s in specs), "total_size": total_bytes},
                 "weight_map": {s.name: name for name, shard in zip(names, shards) for s in shard}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    _fsync_tree(tmp)

    if out.exists():
        old = out.with_name(out.name + ".old")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out)
    return {"dir": str(out), "model_class": model_class, "files": len(shards), "bytes": total_bytes,
            "params": sum(s.numel for s in specs), "seconds": time.perf_counter() - start}


def _fsync_tree(directory: Path) -> None:
    # Data is on disk before the rename publishes it; this also makes the reported time include the writeback.
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shape_from_args(args) -> Shape:
    shape = PRESETS[args.preset]
    overrides = {field: getattr(args, field) for field in
                 ("arch", "hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "tie_embeddings")
                 if getattr(args, field) is not None}
    shape = dataclasses.replace(shape, **overrides)
    if "kv_heads" not in ARCHS[shape.arch][1]:
        if "kv_heads" in overrides:
            raise SystemExit(f"--kv-heads: {shape.arch} has no grouped-query attention")
        shape = dataclasses.replace(shape, kv_heads=shape.heads)
    if shape.hidden % shape.heads or shape.heads % shape.kv_heads:
        raise SystemExit(f"heads ({shape.heads}) must divide hidden ({shape.hidden}) "
                         f"and be a multiple of kv-heads ({shape.kv_heads})")
    return shape


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("preset", choices=sorted(PRESETS), help="model shape to start from")
    p.add_argument("out", type=Path, help="checkpoint directory to create")
    p.add_argument("--arch", choices=sorted(ARCHS), help="architecture (default: the preset's, llama)")
    for flag in ("hidden", "layers", "heads", "kv-heads", "intermediate", "vocab"):
        p.add_argument(f"--{flag}", type=int, help=f"override the preset's {flag}")
    p.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="tie lm_head to the input embeddings (default: the preset's, else the arch's)")
    p.add_argument("--shard-size", type=parse_size, default="5GB", help="max bytes per shard (default 5GB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    shape = shape_from_args(args)
    try:
        summary = write_checkpoint(build_config(shape), args.out, args.shard_size, args.seed, args.force)
    except OSError as e:
        raise SystemExit(f"make_checkpoint: {e}") from None
    print(f"wrote {summary['dir']}: {summary['model_class']}, {summary['params'] / 1e6:.1f}M params, "
          f"{summary['bytes'] / 1e9:.2f} GB in {summary['files']} file(s), {summary['seconds']:.1f} s")
    return summary


if __name__ == "__main__":
    main()
