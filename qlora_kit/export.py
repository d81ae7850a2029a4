"""`qlora-kit export`: a base checkpoint + a LoRA adapter -> one merged Hugging Face checkpoint, streamed.

What is merged into. QLoRA trains the adapter against the *dequantized* 4-bit base, not the original weights, so
by default every linear layer the adapter targets is written as W' = dequant(quant(W)) + scale·B·A, quantized
with the settings the training used. Every other linear layer that training held in 4 bits (every linear but
the output head and what it is tied to: `loader.quant_targets`) is written as dequant(quant(W)) too, because
that is the weight the model saw; everything else (embeddings, norms, the head, biases) is copied as it is.
`merge_into="original"` folds the adapter into the original W instead (W + scale·B·A) and copies the other
linears unchanged: what peft's `merge_and_unload()` on an unquantized base produces.

A base already in the bitsandbytes 4-bit layout is dequantized as stored and written in bf16 (its original
weights no longer exist, so "original" is refused). The output is the base's dtype otherwise.

Memory: the base is read tensor by tensor and every output tensor is written to its place in its shard as soon
as it exists (`StreamingShardWriter`), so peak host memory is a few tensors, not a shard, plus the adapter (each
layer's factors are dropped once merged). The merge runs over blocks of rows, so its fp32 temporaries are
small. The output directory appears only when complete, and holds sharded safetensors, config.json without any
quantization_config, generation_config.json and the tokenizer files (the adapter directory's when it has them,
since those are what training used; else the base's).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from tqdm import tqdm

from qlora_kit.adapters import read_adapter_config, read_adapter_weights
from qlora_kit.checkpoint import (
    TOKENIZER_FILES, AtomicDir, StreamingShardWriter, TensorReader, copy_side_files, iter_by_file, tensor_index,
)
from qlora_kit.errors import CheckpointError, ConfigError
from qlora_kit.loader import Target, _key_map, build_empty, checkpoint_quant_config, quant_targets, read_config
from qlora_kit.lora import LoraConfig, merge_delta
from qlora_kit.quant import FLOAT_DTYPES, QuantConfig, QuantizedWeight

MERGE_INTO = ("dequantized", "original")
SIDE_FILES = ("generation_config.json",)
BNB_DTYPE = torch.bfloat16  # the compute dtype a 4-bit base is dequantized to
_MERGE_BLOCK = 1 << 18  # elements per row block of the merge: its fp32 temporaries (1 MiB each) stay in cache


@dataclass
class ExportReport:
    """What an export did, for the CLI's summary line and for tests."""

    out_dir: Path
    base_dir: Path
    merge_into: str
    dtype: torch.dtype
    merged: int
    """Linear layers with the adapter folded in."""
    dequantized: int
    """Linear layers without an adapter written as dequant(quant(W)) (always 0 with merge_into="original")."""
    kept: int
    """Other tensors, copied as they are."""
    bytes_out: int = 0
    shards: int = 0


@dataclass(frozen=True)
class _Job:
    """One linear weight of the base: how it is stored and the adapter factors for it, if any."""

    target: Target
    aux: tuple[str, ...]  # the quant-state entries of a weight stored in 4 bits
    lora: tuple[torch.Tensor, torch.Tensor, float] | None  # (A, B, scale), fp32


def export_merged(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    base: str | Path | None = None,
    merge_into: str = "dequantized",
    quant: QuantConfig | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> ExportReport:
    """Merge the PEFT adapter in `adapter_dir` into its base and write a plain HF checkpoint to `out_dir`.

    `base` defaults to the adapter's `base_model_name_or_path`, which must be a local directory. With
    merge_into="dequantized" (the default) the adapter is folded into dequant(quant(W)) — the weight it was
    trained against — and every other linear layer that training quantized is written as dequant(quant(W)) as
    well; `quant` is the training's QuantConfig (default NF4 + double quant, blocks of 64), ignored for a base
    that is already 4-bit, whose stored quantization is used. merge_into="original" merges into W itself.
    """
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if merge_into not in MERGE_INTO:
        raise ConfigError(f"merge_into must be one of {MERGE_INTO}, got {merge_into!r}")
    if max_shard_bytes <= 0:
        raise ConfigError(f"the maximum shard size must be positive, got {max_shard_bytes} bytes")
    lora, raw = read_adapter_config(adapter_dir)
    base_dir = _base_dir(adapter_dir, raw, base)
    config = read_config(base_dir, trust_remote_code)
    stored_quant = checkpoint_quant_config(config)
    if stored_quant is not None:
        if merge_into == "original":
            raise ConfigError(
                f"{base_dir} is stored in 4 bits: its original weights are gone, so there is nothing to merge "
                "into but the dequantized ones (use merge_into dequantized, or point --base at the bf16 checkpoint)"
            )
        del config.quantization_config
    infos = tensor_index(base_dir)
    model = build_empty(config, torch.bfloat16, trust_remote_code)
    jobs = _plan(model, infos, read_adapter_weights(adapter_dir), lora, adapter_dir, base_dir)
    dtype = BNB_DTYPE if stored_quant is not None else _base_dtype(config, infos, jobs)
    quant = stored_quant or quant or QuantConfig()  # as the loader does: a 4-bit base's settings win
    aux = {k for job in jobs.values() for k in job.aux}
    report = ExportReport(out_dir, base_dir, merge_into, dtype, 0, 0, 0)
    keys = [k for k in iter_by_file(infos) if k not in aux]
    layout = [(k, _out_shape(model, infos, k, jobs), dtype if k in jobs else infos[k].dtype) for k in keys]
    with AtomicDir(out_dir) as tmp:
        writer = StreamingShardWriter(tmp, layout, max_shard_bytes)
        with TensorReader(infos) as reader, closing(writer):
            inputs = _read_ahead(reader, keys, {k: job.aux for k, job in jobs.items()})
            for key in tqdm(keys, desc="export", unit="tensor", disable=not progress):
                job = jobs.pop(key, None)  # and with it the adapter factors, once merged
                if job is None:
                    writer.add(key, next(inputs)[key])
                    report.kept += 1
                    continue
                writer.add(key, _export_linear(next(inputs), key, job, merge_into, quant, dtype, adapter_dir))
                _release_freed_memory()
                report.merged += job.lora is not None
                report.dequantized += job.lora is None and merge_into == "dequantized"
            report.shards = len(writer.finish())
        report.bytes_out = writer.total_bytes
        _write_config(base_dir, tmp, dtype)
        copy_side_files(base_dir, tmp, SIDE_FILES)
        tokenizer_src = adapter_dir if any((adapter_dir / n).is_file() for n in TOKENIZER_FILES) else base_dir
        copy_side_files(tokenizer_src, tmp)
    return report


def _base_dir(adapter_dir: Path, raw: dict, base: str | Path | None) -> Path:
    """The base checkpoint: `base` if given, else the adapter's base_model_name_or_path — never a download."""
    if base is not None:
        base_dir = Path(base)
        if not base_dir.is_dir():
            raise CheckpointError(f"{base_dir}: no such model directory (the --base of the export)")
        return base_dir
    name = raw.get("base_model_name_or_path")
    if not name:
        raise CheckpointError(f"{adapter_dir / 'adapter_config.json'}: names no base_model_name_or_path; pass --base")
    if not Path(name).is_dir():
        raise CheckpointError(
            f"the adapter's base model {name!r} (base_model_name_or_path in {adapter_dir / 'adapter_config.json'}) "
            "is not a local directory; qlora-kit never downloads: pass --base MODEL_DIR"
        )
    return Path(name)


def _plan(model, infos, weights, lora: LoraConfig, adapter_dir: Path, base_dir: Path) -> dict[str, _Job]:
    """Checkpoint key of every quantized linear's weight -> its job; every adapter tensor must find its layer."""
    targets = quant_targets(model)
    ckpt_key = {model_key: key for key, model_key in _key_map(model, infos).items() if ".weight." not in key}
    unknown = [m for m in weights if m not in targets]
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise CheckpointError(
            f"{adapter_dir}: adapter modules {shown} are not quantized linear layers of {base_dir} "
            "(is it the base the adapter was trained on?)"
        )
    missing = [n for n in targets if n + ".weight" not in ckpt_key]
    if missing:
        raise CheckpointError(f"{base_dir}: checkpoint lacks tensors the architecture needs: {missing[0]}.weight")
    aux: dict[str, list[str]] = {}  # weight key -> its quant-state entries, when stored in 4 bits
    for key in infos:
        if ".weight." in key:
            aux.setdefault(key.split(".weight.", 1)[0] + ".weight", []).append(key)
    jobs = {}
    for name, target in targets.items():
        key = ckpt_key[name + ".weight"]
        factors = _factors(name, target, model, weights[name], lora, adapter_dir) if name in weights else None
        jobs[key] = _Job(target, tuple(aux.pop(key, ())), factors)
    stray = [k for k in aux if any(".quant_state." in e for e in aux[k])]
    if stray:
        raise CheckpointError(
            f"{base_dir}: {stray[0]} is stored in 4 bits but is not a layer qlora-kit quantizes (the output head, "
            "or a layer transformers keeps in full precision); it cannot be exported"
        )
    return jobs


def _factors(name, target, model, ab, lora: LoraConfig, adapter_dir: Path) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, scale) in fp32, checked against the layer's shape; the rank is per module, as peft's rank_pattern."""
    if set(ab) != {"lora_A", "lora_B"}:
        raise CheckpointError(f"{adapter_dir}: {name} has {sorted(ab)} but needs both lora_A and lora_B")
    shape = tuple(model.get_submodule(name).weight.shape)
    out_f, in_f = shape[::-1] if target.transposed else shape
    a, b = ab["lora_A"], ab["lora_B"]
    r = a.shape[0]
    if a.shape != (r, in_f) or b.shape != (out_f, r):
        raise CheckpointError(
            f"{adapter_dir}: {name} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, but the base layer is "
            f"{out_f}x{in_f} (out x in); is it the base the adapter was trained on?"
        )
    scale = LoraConfig(r, lora.alpha, lora.dropout, lora.target_modules, lora.use_rslora).scale
    return a.float(), b.float(), scale


def _out_shape(model, infos, key: str, jobs: dict[str, _Job]) -> tuple[int, ...]:
    """A written tensor's shape: as stored, except a 4-bit weight, which becomes its layer's full shape."""
    job = jobs.get(key)
    if job is None or not job.aux:
        return infos[key].shape
    return tuple(model.get_submodule(job.target.name).weight.shape)  # already in the checkpoint's orientation


def _base_dtype(config, infos, jobs: dict[str, _Job]) -> torch.dtype:
    """The dtype config.json declares, else that of the checkpoint's linear weights."""
    if isinstance(config.dtype, torch.dtype) and config.dtype in FLOAT_DTYPES:
        return config.dtype
    return next((infos[k].dtype for k in jobs if infos[k].dtype in FLOAT_DTYPES), torch.bfloat16)


def _read_ahead(reader: TensorReader, keys: list[str], aux: dict[str, tuple[str, ...]]
                ) -> Iterator[dict[str, torch.Tensor]]:
    """Each key's tensors (a 4-bit weight with its quant state), read one key ahead on a thread: the reads
    (a sixth of a warm export) overlap the merge instead of adding to it."""
    def read(key: str) -> dict[str, torch.Tensor]:
        return {k: reader.read(k) for k in (key, *aux.get(key, ()))}

    with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as pool:
        ahead = pool.submit(read, keys[0]) if keys else None
        for nxt in [*keys[1:], None]:
            current = ahead.result()
            ahead = pool.submit(read, nxt) if nxt is not None else None
            yield current


def _export_linear(inputs, key, job: _Job, merge_into, quant, dtype, adapter_dir) -> torch.Tensor:
    """The weight to write for one linear layer, in the checkpoint's orientation (Conv1D stays transposed)."""
    weight = _base_weight(inputs, key, job, merge_into, quant, dtype)
    if job.lora is not None:
        a, b, scale = job.lora
        try:
            _merge_rows(weight, a, b, scale)
        except ValueError:
            raise CheckpointError(
                f"{adapter_dir}: merging the adapter into {key} produced non-finite weights (inf or nan); "
                "the adapter is corrupt"
            ) from None
    return weight.t() if job.target.transposed else weight


def _base_weight(inputs, key, job: _Job, merge_into, quant, dtype) -> torch.Tensor:
    """The weight the merge starts from, (out, in) in `dtype`: as stored in 4 bits, re-quantized, or original."""
    if job.aux:
        cut = len(key) - len("weight")
        return QuantizedWeight.from_state_dict({k[cut:]: t for k, t in inputs.items()}).dequantize(dtype)
    w = inputs[key]
    w = w.t() if job.target.transposed else w
    if merge_into == "original":
        return w.to(dtype).contiguous()
    # Quantized exactly as the loader quantized it for training (fp64, which the loader casts, aside).
    w = w.to(torch.bfloat16) if w.dtype == torch.float64 else w
    return QuantizedWeight.quantize(w, quant).dequantize(dtype)


def _merge_rows(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    """weight += scale·B·A in place through `merge_delta`, one block of rows at a time: the same math (a row's
    delta depends only on its own row of B) with fp32 temporaries of one block (1 MiB, cache-sized), not of the
    whole matrix. torch threads each block's matmul; a thread pool over blocks measured slower (thread start-up
    per layer, and a barrier per elementwise pass)."""
    rows = max(1, _MERGE_BLOCK // weight.shape[1])
    for i in range(0, weight.shape[0], rows):
        weight[i:i + rows] = merge_delta(weight[i:i + rows], a, b[i:i + rows], scale)


@cache
def _malloc_trim():
    libc = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None


def _release_freed_memory() -> None:
    """Give the memory freed by one layer's temporaries back to the OS (glibc's malloc_trim; elsewhere a no-op).

    Why: glibc keeps freed blocks below its adaptive mmap threshold in its heap, and the output tensors held for
    the shard sit between them, so without this the process keeps most of a shard's size again in free memory
    (0.4 GiB over a 0.56 GiB shard on llama-300m)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _write_config(base_dir: Path, out: Path, dtype: torch.dtype) -> None:
    """The base's config.json as written, minus any quantization_config, with the dtype of what was written."""
    cfg = json.loads((base_dir / "config.json").read_text())
    cfg.pop("quantization_config", None)
    name = str(dtype).removeprefix("torch.")
    cfg["dtype"] = name
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = name
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
