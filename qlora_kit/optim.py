"""One optimizer factory and one schedule: the recipe's names in, torch objects out.

Paged optimizers keep their states in CUDA unified memory so that a memory spike (a long batch) evicts them to
host RAM instead of failing; off CUDA there is nothing to page, so the same name gives the unpaged
bitsandbytes optimizer with identical math, and we say so once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch

from qlora_kit.errors import ConfigError

log = logging.getLogger(__name__)

OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "adamw")
"""The optimizer names a recipe may use (`config.Recipe` checks against this list)."""
SCHEDULERS = ("constant", "cosine", "linear")
"""The learning-rate schedules a recipe may name."""


def make_optimizer(
    params: Iterable[torch.nn.Parameter], name: str, lr: float, weight_decay: float, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW by flags: paged or not, 8-bit or 32-bit states (betas 0.9/0.999, eps 1e-8 as in HF and peft)."""
    params = list(params)
    paged = name.startswith("paged_")
    if paged and device.type != "cuda":
        log.warning("%s: paging needs CUDA; on %s the optimizer runs unpaged (same update)", name, device.type)
        paged = False
    kwargs = dict(lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8)
    if name == "adamw":
        return torch.optim.AdamW(params, foreach=device.type == "cuda", **kwargs)
    import bitsandbytes as bnb  # only here: its import compiles kernels (1.7 s on 2 CPUs), paid by every rank

    if name.endswith("_8bit"):
        cls = bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit
    elif name.endswith("_32bit"):
        cls = bnb.optim.PagedAdamW32bit if paged else bnb.optim.AdamW32bit
    else:
        raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    return cls(params, **kwargs)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """Multiplier on the peak lr at step s: linear warmup from 0, then constant, cosine or linear to 0."""
    if schedule not in SCHEDULERS:
        raise ConfigError(f"lr_scheduler must be one of {', '.join(SCHEDULERS)}, got {schedule!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule, warmup_steps, total_steps))
