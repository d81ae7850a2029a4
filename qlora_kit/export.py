"""`qlora-kit export`: a base checkpoint + a LoRA adapter -> one merged Hugging Face checkpoint, streamed.

What is merged into. QLoRA trains the adapter against the *dequantized* 4-bit base, not the original weights, so
by default every linear layer the adapter targets is written as W' = dequant(quant(W)) + scale·B·A, quantized
with the settings the training used (recorded beside the adapter: `targets.py`). Every other linear layer that
training held in 4 bits (every linear but the output head and what it is tied to) is written as
dequant(quant(W)) too, because that is the weight the model saw; everything else (embeddings, norms, the head,
biases) is copied byte for byte. `merge_into="original"` folds the adapter into the original W instead
(W + scale·B·A) and copies the other linears unchanged: what peft's `merge_and_unload()` on an unquantized base
produces.

A base already in the bitsandbytes 4-bit layout is dequantized as stored and written in bf16 (its original
weights no longer exist, so "original" is refused). The output is the base's dtype otherwise.

How. The output layout is known before anything is computed, so each shard's header is written first and every
tensor goes straight to its offset (`StreamingShardWriter`). Tensors are independent, so a few worker threads
each take one whole tensor at a time — read it into a reused buffer, quantize, dequantize into that same
buffer, merge in place, write it — with the CPU threads split between them rather than every step fanning out
over all of them: on two cores that keeps both busy through the reads and writes, which a single pipeline with
per-step parallelism left half idle. Copied tensors go file to file in the kernel, and each layer's adapter
factors are read when that layer is merged. Peak host memory is a few tensors per worker, never a shard, nor
the whole adapter. The output directory appears only when complete, and holds sharded
safetensors, config.json without any quantization_config, generation_config.json and the tokenizer files (the
adapter directory's when it has them, since those are what training used; else the base's).
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from qlora_kit.adapters import CHAT_TEMPLATE_NAME, adapter_index, read_adapter_config
from qlora_kit.atomic import AtomicDir
from qlora_kit.safetensors_io import (
    SIDE_FILES, TOKENIZER_FILES, StreamingShardWriter, TensorInfo, TensorReader, copy_side_files, iter_by_file,
    read_config_json, tensor_index, write_config_json,
)
from qlora_kit.errors import CheckpointError, ConfigError
from qlora_kit.lora import LoraConfig, merge_delta_
from qlora_kit.quant import FLOAT_DTYPES, QuantConfig, QuantizedWeight, stored_quant_config
from qlora_kit.targets import Target, checkpoint_key, read_record

MERGE_INTO = ("dequantized", "original")
BNB_DTYPE = torch.bfloat16  # the compute dtype a 4-bit base is dequantized to
MAX_WORKERS = 4  # tensors in flight at once: each holds a few tensors' worth of buffers


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
    layers_from: str = ""
    """Where the quantized layers came from: the adapter's record, or the architecture (built to find them)."""
    quant: QuantConfig | None = None
    """The quantization the weights went through (None when merged into the original weights)."""


@dataclass(frozen=True)
class _Job:
    """One linear weight of the base: how it is stored and the adapter factors for it, if any."""

    target: Target
    aux: tuple[str, ...]  # the quant-state entries of a weight stored in 4 bits
    lora: tuple[str, str, float] | None  # the adapter file's keys of A and B, and the scale


@dataclass(frozen=True)
class _Settings:
    merge_into: str
    quant: QuantConfig
    dtype: torch.dtype
    adapter_dir: Path
    adapter: TensorReader
    """The adapter file: each layer's factors are read when that layer is merged."""


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
    well. `quant` overrides the training's quantization, which is read from the adapter's record (default NF4 +
    double quant, blocks of 64, for an adapter without one); a base that is already 4-bit is dequantized with
    its stored settings. merge_into="original" merges into W itself.
    """
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if merge_into not in MERGE_INTO:
        raise ConfigError(f"merge_into must be one of {MERGE_INTO}, got {merge_into!r}")
    if max_shard_bytes <= 0:
        raise ConfigError(f"the maximum shard size must be positive, got {max_shard_bytes} bytes")
    lora, raw = read_adapter_config(adapter_dir)
    base_dir = _base_dir(adapter_dir, raw, base)
    config = read_config_json(base_dir)
    stored_quant = stored_quant_config(config.get("quantization_config"))
    if stored_quant is not None and merge_into == "original":
        raise ConfigError(
            f"{base_dir} is stored in 4 bits: its original weights are gone, so there is nothing to merge "
            "into but the dequantized ones (use merge_into dequantized, or point --base at the bf16 checkpoint)"
        )
    infos = tensor_index(base_dir)
    record = read_record(adapter_dir)
    targets, prefix = (record.targets, record.base_model_prefix) if record is not None else \
        _architecture_targets(base_dir, trust_remote_code)
    adapter_infos, adapter_keys = adapter_index(adapter_dir)
    jobs = _plan(targets, prefix, infos, (adapter_infos, adapter_keys), lora, adapter_dir, base_dir)
    dtype = BNB_DTYPE if stored_quant is not None else _base_dtype(config, infos, jobs)
    quant = stored_quant or quant or (record.quant if record is not None else QuantConfig())
    if merge_into == "dequantized" and stored_quant is None and (quant.calibration is not None or quant.scale_search):
        # both choose each weight's values from a pass of the whole model (calibration text, or scale search's
        # random-token probe), which a tensor-by-tensor export cannot redo: it would merge into other weights
        # than the adapter was trained on
        how = (f"calibrated with {quant.calibration}", "--calibrate") if quant.calibration is not None else \
            ("scale-searched", "--scale-search")
        raise ConfigError(
            f"{adapter_dir}: trained on a base {how[0]}, which export cannot redo tensor by tensor; write that base "
            f"once with `qlora-kit quantize {how[1]}` and pass it as --base, or use --merge-into original"
        )
    aux = {k for job in jobs.values() for k in job.aux}
    keys = [k for k in iter_by_file(infos) if k not in aux]
    layout = [(k, _out_shape(infos[k], jobs.get(k)), dtype if k in jobs else infos[k].dtype) for k in keys]
    merged = sum(job.lora is not None for job in jobs.values())
    report = ExportReport(
        out_dir, base_dir, merge_into, dtype, merged=merged, kept=len(keys) - len(jobs),
        dequantized=0 if merge_into == "original" else len(jobs) - merged,
        layers_from="the adapter's record" if record is not None else "the architecture",
        quant=quant if merge_into == "dequantized" else None,
    )
    with AtomicDir(out_dir) as tmp, TensorReader(adapter_infos) as adapter:
        settings = _Settings(merge_into, quant, dtype, adapter_dir, adapter)
        writer = StreamingShardWriter(tmp, layout, max_shard_bytes)
        with TensorReader(infos) as reader, closing(writer):
            _run(keys, jobs, reader, writer, settings, progress)
            report.shards = len(writer.finish())
        report.bytes_out = writer.total_bytes
        write_config_json(tmp, _merged_config(config, dtype))
        copy_side_files(base_dir, tmp, SIDE_FILES)
        copy_side_files(_tokenizer_source(adapter_dir, base_dir), tmp)
        copy_side_files(adapter_dir, tmp, (CHAT_TEMPLATE_NAME,))  # the template training used wins
    return report


def _tokenizer_source(adapter_dir: Path, base_dir: Path) -> Path:
    """The adapter directory when it holds a tokenizer (training's), else the base; a chat template alone is not
    a tokenizer."""
    files = [n for n in TOKENIZER_FILES if n != CHAT_TEMPLATE_NAME]
    return adapter_dir if any((adapter_dir / n).is_file() for n in files) else base_dir


def _architecture_targets(base_dir: Path, trust_remote_code: bool) -> tuple[dict[str, Target], str]:
    """The quantized layers found the slow way, by building the architecture (an adapter without a record)."""
    from qlora_kit.loader import build_empty, quant_targets, read_config

    config = read_config(base_dir, trust_remote_code)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    model = build_empty(config, torch.bfloat16, trust_remote_code)
    return quant_targets(model), getattr(model, "base_model_prefix", "") or ""


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



def _plan(targets: dict[str, Target], prefix: str, infos: dict[str, TensorInfo], adapter, lora: LoraConfig,
          adapter_dir: Path, base_dir: Path) -> dict[str, _Job]:
    """Checkpoint key of every quantized linear's weight -> its job; every adapter tensor must find its layer.
    `adapter` is `adapters.adapter_index`'s (tensor index, module -> keys): shapes are checked here, before any
    data is read."""
    adapter_infos, weights = adapter
    unknown = [m for m in weights if m not in targets or checkpoint_key(m + ".weight", infos, prefix) is None]
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise CheckpointError(
            f"{adapter_dir}: adapter modules {shown} are not quantized linear layers of {base_dir} "
            "(is it the base the adapter was trained on?)"
        )
    aux: dict[str, list[str]] = {}  # weight key -> its quant-state entries, when stored in 4 bits
    for key in infos:
        if ".weight." in key:
            aux.setdefault(key.split(".weight.", 1)[0] + ".weight", []).append(key)
    jobs = {}
    for name, target in targets.items():
        key = checkpoint_key(name + ".weight", infos, prefix)
        if key is None:
            raise CheckpointError(f"{base_dir}: checkpoint lacks tensors the architecture needs: {name}.weight "
                                  "(is it the base the adapter was trained on?)")
        entries = tuple(aux.pop(key, ()))
        if not entries and infos[key].shape != target.stored_shape:
            raise CheckpointError(
                f"{infos[key].file}: tensor {key!r} has shape {list(infos[key].shape)} but the model needs "
                f"{list(target.stored_shape)}; is it the base the adapter was trained on?"
            )
        factors = _factors(name, target, weights[name], adapter_infos, lora, adapter_dir) if name in weights else None
        jobs[key] = _Job(target, entries, factors)
    stray = [k for k in aux if any(".quant_state." in e for e in aux[k])]
    if stray:
        raise CheckpointError(
            f"{base_dir}: {stray[0]} is stored in 4 bits but is not a layer qlora-kit quantizes (the output head, "
            "or a layer transformers keeps in full precision); it cannot be exported"
        )
    return jobs


def _factors(name: str, target: Target, ab: dict[str, str], infos: dict[str, TensorInfo], lora: LoraConfig,
             adapter_dir: Path) -> tuple[str, str, float]:
    """(key of A, key of B, scale), their shapes checked against the layer's; the rank is per module, as peft's
    rank_pattern."""
    if set(ab) != {"lora_A", "lora_B"}:
        raise CheckpointError(f"{adapter_dir}: {name} has {sorted(ab)} but needs both lora_A and lora_B")
    out_f, in_f = target.shape
    a, b = infos[ab["lora_A"]], infos[ab["lora_B"]]
    r = a.shape[0] if a.shape else 0
    if a.shape != (r, in_f) or b.shape != (out_f, r) or a.dtype not in FLOAT_DTYPES or b.dtype not in FLOAT_DTYPES:
        raise CheckpointError(
            f"{adapter_dir}: {name} has lora_A {list(a.shape)} {a.dtype} and lora_B {list(b.shape)} {b.dtype}, but "
            f"the base layer is {out_f}x{in_f} (out x in); is it the base the adapter was trained on?"
        )
    scale = LoraConfig(r, lora.alpha, lora.dropout, lora.target_modules, lora.use_rslora).scale
    return ab["lora_A"], ab["lora_B"], scale


def _out_shape(info: TensorInfo, job: _Job | None) -> tuple[int, ...]:
    """A written tensor's shape: as stored, except a 4-bit weight, which becomes its layer's full shape."""
    return job.target.stored_shape if job is not None and job.aux else info.shape


def _base_dtype(config: dict, infos: dict[str, TensorInfo], jobs: dict[str, _Job]) -> torch.dtype:
    """The dtype config.json declares, else that of the checkpoint's linear weights."""
    declared = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or ""), None)
    if declared in FLOAT_DTYPES:
        return declared
    return next((infos[k].dtype for k in jobs if infos[k].dtype in FLOAT_DTYPES), torch.bfloat16)


# ---- the work: whole tensors on a few worker threads ---------------------------------------------------------


def _run(keys: list[str], jobs: dict[str, _Job], reader: TensorReader, writer: StreamingShardWriter,
         settings: _Settings, progress: bool) -> None:
    """Every tensor of `keys` written; the first failure (or Ctrl-C) cancels what has not started."""
    buffers = _Buffers()

    def task(key: str) -> None:
        job = jobs.pop(key, None)
        if job is None:
            info = reader.infos[key]
            writer.copy(key, info.shape, info.dtype, reader.source(key))
            return
        weight, buffer = _export_linear(reader, buffers, key, job, settings)
        writer.add(key, weight)
        buffers.put(buffer)

    workers, threads = _split_threads(len(keys))
    with _torch_threads(threads), ThreadPoolExecutor(
        workers, thread_name_prefix="export", initializer=torch.set_num_threads, initargs=(threads,)
    ) as pool:
        futures: list[Future] = [pool.submit(task, key) for key in keys]
        try:
            for future in tqdm(as_completed(futures), total=len(futures), desc="export", unit="tensor",
                               disable=not progress):
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _split_threads(tasks: int) -> tuple[int, int]:
    """(workers, CPU threads each): as many single-tensor workers as threads, up to MAX_WORKERS."""
    total = max(1, torch.get_num_threads())
    workers = max(1, min(total, MAX_WORKERS, tasks))
    return workers, max(1, total // workers)


@contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Buffers:
    """Tensor buffers handed back after each write and reused by the next tensor of the same size: the layers of
    a model repeat a few sizes, so after the first layer no read allocates (or page-faults) fresh memory."""

    def __init__(self) -> None:
        self._free: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def get(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        with self._lock:
            free = self._free.get((numel, dtype))
            flat = free.pop() if free else None
        return (torch.empty(numel, dtype=dtype) if flat is None else flat).view(shape)

    def put(self, buffer: torch.Tensor | None) -> None:
        if buffer is not None:
            with self._lock:
                self._free.setdefault((buffer.numel(), buffer.dtype), []).append(buffer.view(-1))


def _export_linear(reader: TensorReader, buffers: _Buffers, key: str, job: _Job, settings: _Settings
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the weight to write, in the checkpoint's orientation; the pooled buffer it lives in, if any)."""
    weight, buffer = _base_weight(reader, buffers, key, job, settings)
    if job.lora is not None:
        key_a, key_b, scale = job.lora
        a, b = settings.adapter.read(key_a), settings.adapter.read(key_b)
        try:
            merge_delta_(weight, a, b, scale)
        except ValueError:
            raise CheckpointError(
                f"{settings.adapter_dir}: merging the adapter into {key} produced non-finite weights (inf or nan); "
                "the adapter is corrupt"
            ) from None
    return (weight.t() if job.target.transposed else weight), buffer


def _base_weight(reader: TensorReader, buffers: _Buffers, key: str, job: _Job, settings: _Settings
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight the merge starts from, (out, in) in the output dtype: as stored in 4 bits, re-quantized, or
    original; computed in a pooled buffer wherever the shapes and dtypes allow."""
    dtype = settings.dtype
    if job.aux:
        cut = len(key) - len("weight")
        qw = QuantizedWeight.from_state_dict({k[cut:]: reader.read(k) for k in (key, *job.aux)})
        if tuple(qw.shape) != job.target.shape:
            raise CheckpointError(f"{reader.infos[key].file}: {key} is stored as {list(qw.shape)} in 4 bits but the "
                                  f"model needs {list(job.target.shape)}; is it the base the adapter was trained on?")
        buffer = buffers.get(job.target.shape, dtype)
        return qw.dequantize(dtype, out=buffer), buffer
    info = reader.infos[key]
    buffer = buffers.get(info.shape, info.dtype)
    w = reader.read(key, out=buffer)
    w = w.t() if job.target.transposed else w
    if settings.merge_into == "original":
        return w.to(dtype).contiguous(), buffer
    # Quantized exactly as the loader quantized it for training (fp64, which the loader casts, aside).
    w = w.to(torch.bfloat16) if w.dtype == torch.float64 else w
    qw = QuantizedWeight.quantize(w, settings.quant)
    in_place = w.dtype == dtype and w.is_contiguous()
    return qw.dequantize(dtype, out=w if in_place else None), buffer


def _merged_config(base_config: dict, dtype: torch.dtype) -> dict:
    """The base's config.json as written, minus any quantization_config, with the dtype of what was written."""
    cfg = dict(base_config)
    cfg.pop("quantization_config", None)
    name = str(dtype).removeprefix("torch.")
    cfg["dtype"] = name
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = name
    return cfg
