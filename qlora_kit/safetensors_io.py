"""Safetensors I/O for Hugging Face checkpoint directories: find and validate safetensors files, read them tensor
by tensor, write sharded output, and the side files (config.json, tokenizer) that travel with the weights.
Training checkpoints are `runstate.py`'s; atomic directories and files are `atomic.py`'s.

Reading uses positioned reads (`pread` at the header's offsets, safe from any thread) rather than a memory map:
the page cache then holds the file, not our RSS, so a model larger than RAM streams through in constant resident
memory, and a truncated or corrupt file is caught from its header, before any data is touched, with a message
naming it.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from qlora_kit.atomic import atomic_write
from qlora_kit.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024
SIDE_FILES = ("generation_config.json",)
"""Copied beside the weights of every checkpoint the kit writes, when the source has them."""
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and byte range after the header."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors header and check it against the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            (n,) = struct.unpack("<Q", raw) if len(raw) == 8 else (None,)
            if n is None or n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{path}: not a safetensors file (bad header length); re-download or re-save it")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors header ({e}); the file is corrupt") from None
    base = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = meta["data_offsets"]
            info = TensorInfo(path, _DTYPES[meta["dtype"]], tuple(meta["shape"]), base + start, base + end)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}; the file is corrupt") from None
        if info.end > size:
            raise CheckpointError(
                f"{path}: truncated — tensor {name!r} needs {info.end} bytes but the file has {size}; re-download it"
            )
        infos[name] = info
    return infos


def read_config_json(model_dir: Path) -> dict:
    """A model directory's config.json as plain JSON (no transformers import), with one clear error each for a
    missing directory, a missing file and invalid JSON."""
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: no such model directory")
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing; a Hugging Face model directory needs its config.json")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_file}: not a JSON object")
    return cfg


def write_config_json(out_dir: Path, cfg: dict) -> None:
    """config.json as transformers writes it (sorted keys, indented)."""
    atomic_write(out_dir / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, validated against its index when sharded."""
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: no such model directory")
    index = model_dir / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map')") from None
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} names missing shard(s): {', '.join(missing)}; download them")
        return files
    if (model_dir / SINGLE_NAME).exists():
        return [model_dir / SINGLE_NAME]
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise CheckpointError(
            f"{model_dir}: only pickle weights (*.bin/*.pt) found; qlora-kit loads safetensors only — "
            "convert with transformers: model.save_pretrained(dir, safe_serialization=True)"
        )
    raise CheckpointError(f"{model_dir}: no model.safetensors or {INDEX_NAME} found")


def tensor_index(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint by name (headers only; no data read)."""
    infos: dict[str, TensorInfo] = {}
    for f in weight_files(model_dir):
        for name, info in read_header(f).items():
            if name in infos:
                raise CheckpointError(f"{f}: tensor {name!r} is also in {infos[name].file.name}; the index is broken")
            infos[name] = info
    return infos


class TensorReader:
    """Reads tensors by name with one open descriptor per file; positioned reads, so threads may share it."""

    def __init__(self, infos: dict[str, TensorInfo]) -> None:
        self.infos = infos
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor, in a new buffer or in `out` (contiguous, of its shape and dtype: a buffer the caller reuses,
        which spares a fresh allocation's page faults)."""
        info = self.infos[name]
        if out is None:
            out = torch.empty(info.shape, dtype=info.dtype)
        elif tuple(out.shape) != info.shape or out.dtype != info.dtype or not out.is_contiguous():
            raise ValueError(f"{name}: out must be a contiguous {info.dtype} tensor of shape {list(info.shape)}")
        if info.nbytes != out.numel() * out.element_size():
            raise CheckpointError(f"{info.file}: tensor {name!r} has {info.nbytes} bytes for shape {info.shape}")
        fd, start, nbytes = self.source(name)
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        while nbytes:
            n = os.preadv(fd, [view], start)
            if n == 0:
                raise CheckpointError(f"{info.file}: short read for tensor {name!r}; the file changed or is truncated")
            view, start, nbytes = view[n:], start + n, nbytes - n
        return out

    def source(self, name: str) -> tuple[int, int, int]:
        """(file descriptor, offset, byte count) of a tensor's raw bytes, for copying them as they are."""
        info = self.infos[name]
        with self._lock:
            fd = self._fds.get(info.file)
            if fd is None:
                fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        return fd, info.start, info.nbytes

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ShardWriter:
    """Collects tensors and writes `model-0000k-of-0000n.safetensors` shards of at most `max_shard_bytes`.

    Shards are written as they fill (memory stays at one shard) under provisional names, then renamed once the
    count is known, and the index is written last.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int = 5 * 1024**3) -> None:
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.out_dir / f"shard-{len(self._shards):05d}.partial"
        save_file(self._pending, str(path), metadata={"format": "pt"})  # a failed write: see AtomicDir
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        """Write the last shard, give shards their final names, and write the index when there are several."""
        if self._pending or not self._shards:
            self._flush()
        return _name_shards(self.out_dir, self._shards, self.total_bytes)


class StreamingShardWriter:
    """Writes tensors straight to their place in shards whose layout is fixed up front, from any thread.

    Why, beside `ShardWriter`: when every output's name, shape and dtype is known before any is computed (an
    export), each shard's safetensors header can be written first and every tensor `pwrite` at its offset the
    moment it exists, by whichever thread computed it, in any order. Host memory is then the tensors being
    computed, not a shard. Same file names, index and `.partial` staging as `ShardWriter`.
    """

    def __init__(self, out_dir: Path, layout: list[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int = 5 * 1024**3) -> None:
        self.out_dir = out_dir
        self._shards: list[list[str]] = [[]]
        self._where: dict[str, tuple[int, int, int, tuple[int, ...], torch.dtype]] = {}
        size = 0
        for name, shape, dtype in layout:
            nbytes = math.prod(shape) * dtype.itemsize
            if self._shards[-1] and size + nbytes > max_shard_bytes:
                self._shards.append([])
                size = 0
            self._shards[-1].append(name)
            self._where[name] = (len(self._shards) - 1, size, nbytes, tuple(shape), dtype)
            size += nbytes
        self.total_bytes = sum(w[2] for w in self._where.values())
        self._lock = threading.Lock()
        self._fds: list[tuple[int, int]] = []
        try:
            for i, keys in enumerate(self._shards):
                self._fds.append(self._open(i, keys))
        except BaseException:
            self.close()
            raise

    def _open(self, i: int, keys: list[str]) -> tuple[int, int]:
        """Create shard i with its header; (fd, offset of its data)."""
        names = {dtype: code for code, dtype in _DTYPES.items()}
        header = {"__metadata__": {"format": "pt"}}
        for key in keys:
            _, start, nbytes, shape, dtype = self._where[key]
            if dtype not in names:
                raise CheckpointError(f"{key}: cannot write {dtype} to safetensors here (supported: {sorted(_DTYPES)})")
            header[key] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [start, start + nbytes]}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        fd = os.open(self.out_dir / f"shard-{i:05d}.partial", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _pwrite_all(fd, memoryview(struct.pack("<Q", len(raw)) + raw), 0)
        except BaseException:
            os.close(fd)
            raise
        return fd, 8 + len(raw)

    def _claim(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[int, int, int]:
        """(fd, offset, nbytes) of a planned tensor, which is then no longer pending."""
        with self._lock:
            if name not in self._where:
                raise CheckpointError(f"{name}: not in the planned layout, or written twice")
            shard, start, nbytes, want_shape, want_dtype = self._where.pop(name)
        if shape != want_shape or dtype != want_dtype:
            raise CheckpointError(f"{name}: planned as {list(want_shape)} {want_dtype}, got {list(shape)} {dtype}")
        fd, base = self._fds[shard]
        return fd, base + start, nbytes

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write `tensor` at its place, in the calling thread."""
        fd, offset, _ = self._claim(name, tuple(tensor.shape), tensor.dtype)
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        _pwrite_all(fd, memoryview(data.numpy()), offset)

    def copy(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, source: tuple[int, int, int]) -> None:
        """Write a tensor that is copied as stored, straight from `source` ((fd, offset, nbytes), as
        `TensorReader.source` gives it): in the kernel where the file systems allow, so an embedding matrix of
        gigabytes never passes through our memory."""
        fd, offset, nbytes = self._claim(name, tuple(shape), dtype)
        src_fd, src_offset, src_bytes = source
        if src_bytes != nbytes:
            raise CheckpointError(f"{name}: the source holds {src_bytes} bytes, the layout plans {nbytes}")
        _copy_range(src_fd, src_offset, fd, offset, nbytes)

    def finish(self) -> list[Path]:
        """Check every planned tensor came, then final names and the index."""
        try:
            if self._where:
                raise CheckpointError(f"{self.out_dir}: {len(self._where)} planned tensors were never written, "
                                      f"e.g. {next(iter(self._where))}")
        finally:
            self.close()
        return _name_shards(self.out_dir, self._shards, self.total_bytes)

    def close(self) -> None:
        """Close the files (after a failure too; AtomicDir removes them)."""
        for fd, _ in self._fds:
            os.close(fd)
        self._fds = []


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM}
_COPY_CHUNK = 16 * 1024 * 1024


def _copy_range(src: int, src_offset: int, dst: int, dst_offset: int, nbytes: int) -> None:
    """Copy nbytes between two files at given offsets: copy_file_range, else through a 16 MiB buffer."""
    kernel = hasattr(os, "copy_file_range")
    buf = None
    while nbytes:
        if kernel:
            try:
                n = os.copy_file_range(src, dst, nbytes, src_offset, dst_offset)
            except OSError as e:
                if e.errno not in _NO_KERNEL_COPY:
                    raise
                kernel = False
                continue
        else:
            buf = buf or memoryview(bytearray(min(nbytes, _COPY_CHUNK)))
            n = os.preadv(src, [buf[:min(nbytes, len(buf))]], src_offset)
            _pwrite_all(dst, buf[:n], dst_offset)
        if n == 0:
            raise CheckpointError("short read while copying a tensor: the source checkpoint changed or is truncated")
        src_offset, dst_offset, nbytes = src_offset + n, dst_offset + n, nbytes - n


def _name_shards(out_dir: Path, shards: list[list[str]], total_bytes: int) -> list[Path]:
    """Give `.partial` shards their final names and write the index when there are several."""
    n = len(shards)
    names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, name in enumerate(names):
        os.replace(out_dir / f"shard-{i:05d}.partial", out_dir / name)
    if n > 1:
        weight_map = {t: names[i] for i, keys in enumerate(shards) for t in keys}
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write(out_dir / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    return [out_dir / name for name in names]


def copy_side_files(src: Path, dst: Path, names: tuple[str, ...] = TOKENIZER_FILES) -> list[str]:
    """Copy tokenizer (and similar) files that exist in `src`; returns what was copied."""
    copied = []
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def iter_by_file(infos: dict[str, TensorInfo]) -> Iterator[str]:
    """Tensor names in on-disk order (file, then offset), so reads are sequential."""
    return iter(sorted(infos, key=lambda n: (str(infos[n].file), infos[n].start)))
