"""Training checkpoints on disk: `checkpoints/step-N/` holds a trainer's state dict, nothing else.

The state itself is the trainer's (`Trainer.state_dict()` / `load_state_dict()`); this module only lays it out
in a directory and reads it back: the adapter (PEFT files, `adapters.AdapterFiles`), the optimizer state
(`torch.save`, read back with `weights_only=True`: no pickle code runs), scheduler, counters and data position
(JSON), RNG state (safetensors; one stream per rank when distributed). A distributed run's state is whole
(rank 0 gathers the adapter and optimizer state and alone calls `save_checkpoint`), so the directory does not
depend on how the run was sharded. Each directory is built under a temp name and renamed when complete, so the
newest `step-N` is always whole, whatever moment a kill came at.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from qlora_kit.adapters import AdapterFiles
from qlora_kit.atomic import AtomicDir, atomic_write
from qlora_kit.errors import CheckpointError

DIR = "checkpoints"
STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
RNG = "rng.safetensors"
_JSON_KEYS = ("counters", "scheduler", "data", "total_steps", "world_size", "strategy", "scaler")


def complete_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every finished checkpoint, oldest first; temp dirs of interrupted saves are ignored."""
    root = out_dir / DIR
    found = []
    for d in root.glob("step-*") if root.is_dir() else []:
        step = d.name.removeprefix("step-")
        if step.isdigit() and (d / STATE).is_file():
            found.append((int(step), d))
    return sorted(found)


def save_checkpoint(out_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write `state` (a trainer's state dict) as `out_dir/checkpoints/step-<step>`, then keep only the newest
    `keep` checkpoints (0: all). A checkpoint of that step that already exists is kept as it is."""
    target = out_dir / DIR / f"step-{step}"
    if target.exists():
        return target
    with AtomicDir(target) as tmp:
        state["adapter"].write(tmp)
        try:
            torch.save(state["optimizer"], tmp / OPTIMIZER)
        except RuntimeError as e:  # torch reports a failed write (a full disk) as RuntimeError, not OSError
            raise OSError(f"{OPTIMIZER}: {e}") from e
        save_file(state["rng"], str(tmp / RNG))
        atomic_write(tmp / STATE, json.dumps({k: state[k] for k in _JSON_KEYS if k in state}, indent=1) + "\n")
    _rotate(out_dir, keep)
    _clean_partials(out_dir)
    return target


def _rotate(out_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    for _, d in complete_checkpoints(out_dir)[:-keep]:
        trash = d.with_name(f".{d.name}.tmp-old")  # out of sight first: a kill never leaves half of one in view
        os.replace(d, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _clean_partials(out_dir: Path) -> None:
    """Temp dirs left by saves that were killed before their rename."""
    for d in (out_dir / DIR).glob(".step-*.tmp-*"):
        shutil.rmtree(d, ignore_errors=True)


def load_checkpoint(d: Path, device: torch.device, optimizer: bool = True) -> dict[str, Any]:
    """The state dict `save_checkpoint` wrote into `d`, optimizer tensors on `device` (`optimizer=False`: left
    out, for the ranks that receive their shard of it from rank 0)."""
    state = json.loads((d / STATE).read_text())
    state["adapter"] = AdapterFiles.read(d)
    state["optimizer"] = {}
    try:
        if optimizer:
            state["optimizer"] = torch.load(d / OPTIMIZER, map_location=device, weights_only=True)
    except Exception as e:  # corrupt, or holding more than tensors: weights_only refuses to run pickled code
        raise CheckpointError(
            f"{d / OPTIMIZER}: refused, not plain tensors ({type(e).__name__}: the file is corrupt or unsafe); "
            f"delete {d} and run again to resume from the checkpoint before it"
        ) from None
    state["rng"] = load_file(str(d / RNG))
    return state
