"""Atomic outputs: a file or a directory appears under its final name only when complete.

Every file the kit writes goes through `atomic_write` or is built inside an `AtomicDir`, so a kill, a full disk
or a crash never leaves something that looks finished and is not. `atomic_write` also fsyncs the file before
the rename and the directory after it, so the rename never reaches the disk ahead of the data (the small files
that mark an output complete: configs, adapter files, the recipe, the metrics log). Shards inside an
`AtomicDir` are not fsynced one by one: they are gigabytes the page cache writes back anyway, and the directory
is renamed only once all of them are written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError

from qlora_kit.errors import CheckpointError

WRITE_ERRORS = (OSError, SafetensorError)  # a full disk reaches safetensors' callers as SafetensorError


def atomic_write(path: Path, content: str | bytes | Callable[[str], None], durable: bool = True) -> None:
    """Write `path` through a sibling temp file and a rename: `content` is text, bytes, or a function that writes
    the temp file it is given (safetensors' `save_file`, say). `durable`: fsync before and after the rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        if callable(content):
            content(tmp)
        elif isinstance(content, bytes):
            Path(tmp).write_bytes(content)
        else:
            Path(tmp).write_text(content, encoding="utf-8")
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        _fsync(path.parent)


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicDir:
    """A directory that appears under its final name only when complete: built in a sibling temp dir, renamed.

    An interrupted run leaves only `.<name>.tmp-*` beside the target, never a directory that looks finished (the
    next successful one removes them); a failed write (a full disk) removes the temp dir and becomes one
    CheckpointError naming the target.
    """

    def __init__(self, target: Path, overwrite: bool = False) -> None:
        self.target = target
        self.overwrite = overwrite
        self.path: Path | None = None

    def __enter__(self) -> Path:
        if self.target.exists() and not self.overwrite:
            raise CheckpointError(f"{self.target}: already exists; choose another output directory or remove it")
        parent = self.target.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=parent))
            umask = os.umask(0o022)
            os.umask(umask)
            os.chmod(self.path, 0o777 & ~umask)  # mkdtemp's is owner-only; the result should read like any new dir
        except OSError as e:
            raise CheckpointError(f"{parent}: cannot create the output directory ({e.strerror})") from None
        return self.path

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            if issubclass(exc_type, WRITE_ERRORS):
                why = getattr(exc, "strerror", None) or str(exc)
                raise CheckpointError(f"{self.target}: writing it failed ({why}); nothing was kept. Is the disk "
                                      "full? Free some space and run the same command again") from exc
            return
        old = self.path.with_name(self.path.name + "-old")
        if self.target.exists():  # renamed away, not deleted in place: a kill never leaves half the old one
            os.replace(self.target, old)
        os.replace(self.path, self.target)
        _fsync(self.target.parent)
        for stale in [old, *self.target.parent.glob(f".{self.target.name}.tmp-*")]:  # left by killed runs
            shutil.rmtree(stale, ignore_errors=True)
