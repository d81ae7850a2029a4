"""Resumable checkpoints: `checkpoints/step-N/` holds everything that decides the next step.

Adapter (PEFT files), optimizer state (`torch.save`, read back with `weights_only=True`: no pickle code runs),
scheduler, counters and data position (JSON), RNG state (safetensors; one stream per rank when distributed,
where rank 0 gathers the whole adapter and optimizer state and writes the directory alone). Each directory is
built under a temp name and renamed when complete, so the newest `step-N` is always whole, whatever moment a kill
came at.
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

from qlora_kit.adapters import adapter_state_dict, read_adapter_weights, save_adapter
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


def _rng_state() -> dict[str, torch.Tensor]:
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    return rng


def _rng_key(key: str, rank: int) -> str:
    """Rank 0's RNG keeps the single-process names; rank r's gets a `.rank<r>` suffix."""
    return key if rank == 0 else f"{key}.rank{rank}"


def save_checkpoint(trainer: Trainer, keep: int) -> Path:
    """Distributed: every rank joins the gathers (whole adapter and optimizer state, each rank's RNG), rank 0
    writes the directory, and the others wait until it is complete."""
    step, d = trainer.counters.step, trainer.dist
    target = trainer.out / DIR / f"step-{step}"
    adapter = d.full_tensors(adapter_state_dict(trainer.model))
    optim = d.optimizer_state(trainer.net, trainer.optimizer) if d.active else trainer.optimizer.state_dict()
    rngs = d.gather_objects(_rng_state())
    if d.is_main and not target.exists():
        _write(trainer, target, adapter, optim, rngs)
        _rotate(trainer.out, keep)
        _clean_partials(trainer.out)
    d.barrier()
    return target


def _write(trainer: Trainer, target: Path, adapter: dict, optim: dict, rngs: list[dict]) -> None:
    with AtomicDir(target) as tmp:
        save_adapter(trainer.model, tmp, trainer.recipe.lora, str(Path(trainer.recipe.model).resolve()),
                     tensors=adapter)
        try:
            torch.save(optim, tmp / "optimizer.pt")
        except RuntimeError as e:  # torch reports a failed write (a full disk) as RuntimeError, not OSError
            raise OSError(f"optimizer.pt: {e}") from e
        rng = {_rng_key(k, rank): v for rank, state in enumerate(rngs) for k, v in state.items()}
        save_file(rng, str(tmp / "rng.safetensors"))
        state = {
            "counters": asdict(trainer.counters),
            "scheduler": trainer.scheduler.state_dict(),
            "data": trainer.batches.state_dict(),
            "total_steps": trainer.total_steps,
            "world_size": trainer.dist.world,
            "strategy": trainer.dist.strategy,
        }
        (tmp / STATE).write_text(json.dumps(state, indent=1) + "\n")


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
    _check_world(d, state, trainer.dist)
    weights = read_adapter_weights(d)
    params = trainer.params
    for module, ab in weights.items():
        for key, tensor in ab.items():
            trainer.dist.load_into(params[f"{module}.{key}.default.weight"], tensor)
    if trainer.dist.active:  # rank 0 reads the whole state, each rank keeps its shard
        optim_state = _read_optimizer(d, trainer.device) if trainer.dist.is_main else {}
        trainer.dist.load_optimizer_state(trainer.net, trainer.optimizer, optim_state)
    else:
        trainer.optimizer.load_state_dict(_read_optimizer(d, trainer.device))
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.batches.load_state_dict(state["data"])
    for key, value in state["counters"].items():
        setattr(trainer.counters, key, value)
    rng = load_file(str(d / "rng.safetensors"))
    rank = trainer.dist.rank
    torch.set_rng_state(rng[_rng_key("torch_cpu", rank)])
    if _rng_key("torch_cuda", rank) in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng[_rng_key("torch_cuda", rank)])
    return step


def _check_world(d: Path, state: dict, dist) -> None:
    """The optimizer file's layout and each rank's RNG stream belong to the world that wrote them: refuse another."""
    saved, strategy = state.get("world_size", 1), state.get("strategy", "none")
    same_kind = (strategy == "none") == (dist.strategy == "none")
    if saved != dist.world or not same_kind:
        launch = f"torchrun --nproc-per-node {saved}" if strategy != "none" else "a single process (no torchrun)"
        raise CheckpointError(
            f"{d}: was saved by a run on {saved} process(es) (strategy {strategy}), this one runs on {dist.world} "
            f"(strategy {dist.strategy}); resume it with {launch}, or start a new output_dir"
        )


def _read_optimizer(d: Path, device: torch.device) -> dict:
    try:
        return torch.load(d / "optimizer.pt", map_location=device, weights_only=True)
    except Exception as e:  # corrupt, or holding more than tensors: weights_only refuses to run pickled code
        raise CheckpointError(
            f"{d / 'optimizer.pt'}: refused, not plain tensors ({type(e).__name__}: the file is corrupt or unsafe); "
            f"delete {d} and run again to resume from the checkpoint before it"
        ) from None
