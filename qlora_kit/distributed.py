"""Training on several processes with torch.distributed: DDP, or FSDP2 sharding the 4-bit base block by block.

Launch as with any torch program: `torchrun --nproc-per-node N --no-python qlora-kit train RECIPE`, or
`accelerate launch --multi_gpu --num_processes N -m qlora_kit.cli train RECIPE` (torchrun underneath; on CPUs too).
The process group comes from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): NCCL on
CUDA, gloo on CPU. Without those variables nothing here starts and the single-process trainer runs as before —
except `distributed.cpu_offload`, which runs FSDP at world size 1 so a base bigger than the GPU stays in host
memory and is streamed in one block at a time.

`Dist` owns what differs between one process and many, so the loop stays one loop: the wrapping, the sums over
ranks (token counts for an exact token-weighted loss, losses, tokens/s),
the gradient norm of sharded gradients, and who writes files (rank 0; the others take part in the gathers).
FSDP2 shards every parameter on dim 0, the QLinear quant state included (`lora.QUANT_STATE`): each rank holds
~1/N of the 4-bit base, of the adapters and of the optimizer state.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from qlora_kit.errors import ConfigError


STRATEGIES = ("fsdp", "ddp")
_COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)  # a rank stuck this long in one collective ends the job


@dataclass(frozen=True)
class DistributedConfig:
    """How a run launched on several processes (torchrun, accelerate launch --multi_gpu) shares the work."""

    strategy: str = "fsdp"
    """"fsdp": FSDP2 shards the 4-bit base, adapters and optimizer state across ranks, block by block; "ddp":
    every rank holds the whole model and gradients are all-reduced. Used when WORLD_SIZE > 1."""
    cpu_offload: bool = False
    """FSDP only: keep the sharded parameters (the 4-bit base with them) in host memory and copy each block to the
    GPU for its forward and backward. With one process this is the "base bigger than the GPU" mode."""
    reshard_after_forward: bool = True
    """FSDP only: free each block's gathered weights after its forward and gather them again for backward (less
    memory, one more all-gather per block)."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"distributed.strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.cpu_offload and self.strategy != "fsdp":
            raise ConfigError("distributed.cpu_offload needs distributed.strategy=fsdp (DDP cannot offload)")


_MPI_WORLD_SIZE = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")  # mpirun's, not torchrun's
_ON_CPU = "accelerate launch --multi_gpu --num_processes N (torchrun underneath; gloo on a CPU) or torchrun"


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun (or accelerate launch --multi_gpu) set it; 1 when started plainly.

    Two launches that would otherwise train alone on each process, unnoticed, are refused. accelerate's plain
    launcher (`accelerate launch --num_processes N` without --multi_gpu on a machine without N GPUs, or with
    --cpu) starts one process, yet sets MASTER_ADDR as for N (and ACCELERATE_USE_CPU, which only it sets); its
    multi-CPU mode is mpirun, which sets only its own variables, so each of N processes would train the whole job
    by itself and write the same output_dir."""
    if "WORLD_SIZE" not in os.environ:
        mpi = next((v for v in _MPI_WORLD_SIZE if os.environ.get(v, "1") != "1"), None)
        if mpi:
            raise ConfigError(f"started by mpirun ({mpi}={os.environ[mpi]}) without torchrun's WORLD_SIZE: "
                              f"each process would train alone; launch with {_ON_CPU}")
        if "ACCELERATE_USE_CPU" in os.environ and "MASTER_ADDR" in os.environ:
            raise ConfigError(f"accelerate launch --num_processes N without --multi_gpu (or with --cpu) started one "
                              f"process here; for N processes use {_ON_CPU}")
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"WORLD_SIZE={value!r} is not a positive integer; launch with torchrun --nproc-per-node N")
    return int(value)


class Dist:
    """This process's place in the job; a world of one when not launched distributed (every method a no-op)."""

    def __init__(self, config: DistributedConfig, device: torch.device) -> None:
        self.config = config
        world = launched_world_size()
        self.active = world > 1 or config.cpu_offload
        self.strategy = config.strategy if self.active else "none"
        self.world, self.rank, self.device = 1, 0, device
        if not self.active:
            return
        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            self.device = torch.device("cuda", local)
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if world == 1 and "MASTER_ADDR" not in os.environ:  # offload at world size 1, started plainly
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                        timeout=_COLLECTIVE_TIMEOUT)
            else:
                dist.init_process_group(backend, timeout=_COLLECTIVE_TIMEOUT)
        self.world, self.rank = dist.get_world_size(), dist.get_rank()

    def optimizer_name(self, name: str) -> str:
        """The optimizer this strategy can step. bitsandbytes' fused updates cannot take FSDP's sharded DTensor
        parameters: its 32-bit AdamW becomes torch's AdamW, the same update (with each rank holding 1/N of the
        states there is less to page); its 8-bit states have no such twin and are refused."""
        if self.strategy != "fsdp" or name == "adamw":
            return name
        if name.endswith("_8bit"):
            raise ConfigError(f"optimizer {name} cannot step FSDP's sharded parameters; use optimizer=adamw "
                              "(each rank holds 1/N of its states) or distributed.strategy=ddp")
        return "adamw"  # the first log line says so (Trainer._announce)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()

    # --- the model -----------------------------------------------------------------------------------------

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training forward runs through: `model` itself for FSDP (sharded in place) and for one
        process, a DDP wrapper for DDP. Saving and evaluating keep using `model`."""
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

            mesh = dist.device_mesh.init_device_mesh(self.device.type, (self.world,))
            kwargs = {"mesh": mesh, "reshard_after_forward": self.config.reshard_after_forward}
            if self.config.cpu_offload:
                kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=self.device.type == "cuda")
            for block in transformer_blocks(model):
                fully_shard(block, **kwargs)
            fully_shard(model, **kwargs)  # the rest: embeddings, final norm, head
            return model
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # every rank built the same base and adapters from the same seed: broadcasting the base is wasted time
            return DistributedDataParallel(model, device_ids=ids, init_sync=False)
        return model

    def micro_batch(self, net: nn.Module, last: bool):
        """DDP all-reduces gradients on the last micro-batch of a step only; FSDP reduce-scatters each one, which
        keeps only sharded gradients between micro-batches."""
        if self.strategy == "ddp" and not last:
            return net.no_sync()
        return contextlib.nullcontext()

    @property
    def grad_scale(self) -> float:
        """DDP and FSDP average gradients over ranks; the loss is a sum over all ranks' tokens, so undo the mean
        (exact: the world size is a power of two in every usual job, and any integer scale is close)."""
        return float(self.world)

    def grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        """Clip to the global norm (over every rank's shards) and return it."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    # --- sums over ranks -----------------------------------------------------------------------------------

    def total(self, *values: float) -> list[float]:
        """Each value summed over ranks (float64, so token counts stay exact integers)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a Ctrl-C seen by one rank stops all at the same step)."""
        return bool(self.total(float(flag))[0]) if self.active else flag

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def gather_objects(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    # --- evaluation ----------------------------------------------------------------------------------------

    def shard_indices(self, count: int) -> Iterator[int | None]:
        """Indices i ≡ rank (mod world) of `count` items, then None until every rank has made the same number of
        passes (a filler pass, whose result is dropped, keeps FSDP's all-gathers in step)."""
        mine = list(range(self.rank, count, self.world))
        yield from mine
        for _ in range(-(-count // self.world) - len(mine)):
            yield None

    # --- what each rank holds ------------------------------------------------------------------------------

    def local_bytes(self, tensors: Iterable[torch.Tensor]) -> int:
        """Bytes of these tensors held by this rank (a DTensor counts its local shard)."""
        return sum(_local(t).numel() * t.element_size() for t in tensors)

    def full_tensors(self, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole tensors on the CPU (an all-gather per sharded tensor; every rank must call it)."""
        return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu() for k, v in named.items()}

    def load_into(self, param: nn.Parameter, full: torch.Tensor) -> None:
        """Copy a whole tensor into a parameter that may be a shard: each rank keeps its own part, no traffic."""
        with torch.no_grad():
            if hasattr(param, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements,
                                         src_data_rank=None)
            param.copy_(full)

    def optimizer_state(self, net: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """The whole optimizer state keyed by parameter name, on rank 0 (empty elsewhere): the same file whatever
        the strategy, so a checkpoint does not depend on how the state was sharded."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(net, optimizer, options=options)

    def load_optimizer_state(self, net: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Rank 0's whole state in, each rank keeping its shard (broadcast from rank 0)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(net, optimizer, state, options=options)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder (or encoder) blocks FSDP shards one by one: the ModuleList holding the most 4-bit linears."""
    from qlora_kit.lora import QLinear

    best: list[nn.Module] = []
    best_count = 0
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            count = sum(isinstance(m, QLinear) for m in mod.modules())
            if count > best_count:
                best, best_count = list(mod), count
    if not best:
        raise ConfigError(f"{type(model).__name__}: no list of transformer blocks with 4-bit layers to shard; "
                          "use distributed.strategy=ddp")
    return best
