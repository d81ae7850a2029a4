"""Resumable checkpoints: `checkpoints/step-N/` holds everything that decides the next step.

Adapter (PEFT files), optimizer state (`torch.save`, read back with `weights_only=True`: no pickle code runs),
scheduler, counters and data position (JSON), RNG state (safetensors). Each directory is built under a temp
name and renamed when complete, so the newest `step-N` is always whole, whatever moment a kill came at.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from qlora_kit.adapters import read_adapter_weights, save_adapter
from qlora_kit.checkpoint import AtomicDir
from qlora_kit.errors import CheckpointError

if TYPE_CHECKING:
    from qlora_kit.train import Trainer

DIR = "checkpoints"
STATE = "trainer_state.json"


def complete_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every finished checkpoint, oldest first; temp dirs of interrupted saves are ignored."""
    root = out_dir / DIR
    found = []
    for d in root.glob("step-*") if root.is_dir() else []:
        step = d.name.removeprefix("step-")
        if step.isdigit() and (d / STATE).is_file():
            found.append((int(step), d))
    return sorted(found)


def save_checkpoint(trainer: Trainer, keep: int) -> Path:
    step = trainer.counters.step
    target = trainer.out / DIR / f"step-{step}"
    if target.exists():
        return target
    with AtomicDir(target) as tmp:
        save_adapter(trainer.model, tmp, trainer.recipe.lora, str(Path(trainer.recipe.model).resolve()))
        try:
            torch.save(trainer.optimizer.state_dict(), tmp / "optimizer.pt")
        except RuntimeError as e:  # torch reports a failed write (a full disk) as RuntimeError, not OSError
            raise OSError(f"optimizer.pt: {e}") from e
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["torch_cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        state = {
            "counters": asdict(trainer.counters),
            "scheduler": trainer.scheduler.state_dict(),
            "data": trainer.batches.state_dict(),
            "total_steps": trainer.total_steps,
        }
        if trainer.scaler is not None:
            state["scaler"] = trainer.scaler.state_dict()
        (tmp / STATE).write_text(json.dumps(state, indent=1) + "\n")
    _rotate(trainer.out, keep)
    _clean_partials(trainer.out)
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


def resume(trainer: Trainer) -> int | None:
    """Load the newest complete checkpoint into the trainer; None when starting fresh."""
    found = complete_checkpoints(trainer.out)
    if not found:
        return None
    step, d = found[-1]
    state = json.loads((d / STATE).read_text())
    if state["total_steps"] != trainer.total_steps:
        raise CheckpointError(
            f"{d}: was saved by a run of {state['total_steps']} steps, this recipe runs {trainer.total_steps}; "
            f"use a new output_dir or restore the recipe"
        )
    weights = read_adapter_weights(d)
    params = trainer.params
    with torch.no_grad():
        for module, ab in weights.items():
            for key, tensor in ab.items():
                params[f"{module}.{key}.default.weight"].copy_(tensor)
    try:
        optim_state = torch.load(d / "optimizer.pt", map_location=trainer.device, weights_only=True)
    except Exception as e:  # corrupt, or holding more than tensors: weights_only refuses to run pickled code
        raise CheckpointError(
            f"{d / 'optimizer.pt'}: refused, not plain tensors ({type(e).__name__}: the file is corrupt or unsafe); "
            f"delete {d} and run again to resume from the checkpoint before it"
        ) from None
    trainer.optimizer.load_state_dict(optim_state)
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.batches.load_state_dict(state["data"])
    if trainer.scaler is not None and "scaler" in state:
        trainer.scaler.load_state_dict(state["scaler"])
    for key, value in state["counters"].items():
        setattr(trainer.counters, key, value)
    rng = load_file(str(d / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    return step
