"""What `qlora-kit plan` shows: the source (recipe, model dir or config.json), the table, and `--fit` proposals.

The arithmetic lives in `plan.py`; this module reads inputs, searches settings that fit and formats the result.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_kit.config import Recipe, load_recipe
from qlora_kit.errors import ConfigError
from qlora_kit.quant import QuantConfig
from qlora_kit.plan import GiB, ModelShape, Plan, Settings, plan_shape, read_model_config, recipe_model_config


# --- proposing settings that fit --------------------------------------------------------------------------


@dataclass
class Proposal:
    """Recipe keys to change so that the run fits, and the plan with them."""

    changes: dict[str, Any]
    plan: Plan

    def overrides(self) -> list[str]:
        """The changes as `key=value` overrides for `qlora-kit train`."""
        return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in self.changes.items()]

    def to_dict(self) -> dict[str, Any]:
        return {"changes": self.changes, "overrides": self.overrides(), "plan": self.plan.to_dict()}


def _halvings(value: int, floor: int) -> list[int]:
    out = [value]
    while out[-1] // 2 >= floor:
        out.append(out[-1] // 2)
    return out


_PAGED_TWIN = {"adamw": "paged_adamw_32bit", "adamw_8bit": "paged_adamw_8bit"}


def _optimizer_options(name: str) -> list[tuple[str, int]]:
    """(optimizer, cost): the recipe's own; its paged twin (the same update, states may spill to host memory);
    8-bit paged states (a slightly different update)."""
    options = [(name, 0)]
    if name in _PAGED_TWIN:
        options.append((_PAGED_TWIN[name], 1))
    if not name.endswith("_8bit"):
        options.append(("paged_adamw_8bit", 2))
    return options


def propose_fit(shape: ModelShape, st: Settings, gpu_bytes: int, accumulation: int = 1) -> Proposal | None:
    """The cheapest change of batch size, sequence length, LoRA rank, checkpointing and optimizer that fits
    `gpu_bytes`, or None if nothing does. Costs, lowest first: checkpointing on (1: compute only), a paged or
    8-bit optimizer (1-2), a smaller micro-batch with more accumulation steps (2 per halving: same effective
    batch), a lower rank (4 per halving), shorter sequences (8 per halving: changes what is learnt)."""
    candidates = []
    for ckpt in [st.gradient_checkpointing] + ([True] if not st.gradient_checkpointing else []):
        for opt, opt_cost in _optimizer_options(st.optimizer):
            for i, b in enumerate(_halvings(st.batch_size, 1)):
                for j, r in enumerate(_halvings(st.lora.r, 4)):
                    for m, sl in enumerate(_halvings(st.seq_len, min(st.seq_len, 128))):
                        cost = (ckpt != st.gradient_checkpointing) + opt_cost + 2 * i + 4 * j + 8 * m
                        candidates.append((cost, ckpt, opt, b, r, sl))
    for _, ckpt, opt, b, r, sl in sorted(candidates, key=lambda c: c[0]):
        trial = dataclasses.replace(st, gradient_checkpointing=ckpt, optimizer=opt, batch_size=b, seq_len=sl,
                                    lora=dataclasses.replace(st.lora, r=r))
        plan = plan_shape(shape, trial, gpu_bytes, search=False)
        if plan.fits:
            changes = {k: v for k, v, old in [
                ("gradient_checkpointing", ckpt, st.gradient_checkpointing), ("optimizer", opt, st.optimizer),
                ("batch_size", b, st.batch_size),
                ("gradient_accumulation_steps", -(-accumulation * st.batch_size // b), accumulation),
                ("lora.r", r, st.lora.r), ("max_seq_len", sl, st.seq_len)] if v != old}
            return Proposal(changes, plan)
    return None


# --- the readable form -------------------------------------------------------------------------------------


def _gib(n: int) -> str:
    return f"{n / GiB:8.2f} GiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _per_gpu_line(plan: Plan) -> str:
    st = plan.settings
    offload = " with the base offloaded to host memory" if st["offload_base"] else ""
    host = f", host memory per rank {_gib(plan.host_bytes).strip()}" if plan.host_bytes else ""
    return f"  per GPU of {st['gpus']}, {st['strategy']}{offload}{host}"


def format_plan(plan: Plan) -> str:
    """The plan as a table: components, the step's phases (the peak marked), the verdict, the assumptions."""
    st = plan.settings
    q, lora = st["quant"], st["lora"]
    lines = [
        f"memory plan: {plan.model}, {_count(plan.params)} params ({_count(plan.quantized_params)} in 4 bits), "
        f"{_count(plan.adapter_params)} adapter params",
        f"  batch {st['batch_size']} x seq {st['seq_len']}, LoRA r={lora['r']} on {','.join(lora['target_modules'])} "
        f"(dropout {lora['dropout']}), {QuantConfig(**q)}, "
        f"{st['optimizer']}, checkpointing {'on' if st['gradient_checkpointing'] else 'off'}, "
        f"{st['attn_implementation']}, {st['compute_dtype']}, on {st['device']}",
        *([_per_gpu_line(plan)] if plan.gpus > 1 or st["offload_base"] else []),
        "",
        f"  frozen base weights       {_gib(plan.base_weights_bytes)}   "
        f"(4-bit linears {_gib(plan.quantized_bytes).strip()})",
        f"  LoRA adapters (fp32)      {_gib(plan.adapter_bytes)}",
        f"  optimizer states          {_gib(plan.optimizer_bytes)}"
        + (f"   ({_gib(plan.optimizer_evictable_bytes).strip()} paged, evictable)"
           if plan.optimizer_evictable_bytes else ""),
        f"  gradients (fp32)          {_gib(plan.gradient_bytes)}",
        f"  activations               {_gib(plan.activation_bytes)}",
        f"  logits / loss             {_gib(plan.logits_bytes)}",
        f"  overhead                  {_gib(plan.overhead_bytes)}",
        *([f"  whole weights in flight   {_gib(plan.gathered_bytes)}   (FSDP all-gathers, in every phase below)"]
          if plan.gathered_bytes else []),
        "  during the step, on top of weights, adapters and optimizer states:",
        *(f"    {name:<23} {_gib(n)}{'   <- peak' if name == plan.peak_phase else ''}"
          for name, n in plan.phases.items()),
        f"  peak total                {_gib(plan.total_bytes)}",
    ]
    if plan.optimizer_evictable_bytes:
        lines.append(f"  resident (paged evicted)  {_gib(plan.resident_bytes)}")
    if plan.gpu_bytes is not None:
        lines.append(f"  GPU {plan.gpu_bytes / GiB:g} GiB: {'fits' if plan.fits else 'does NOT fit'}; "
                     f"largest batch at seq {st['seq_len']}: {plan.max_batch_size}, "
                     f"longest seq at batch {st['batch_size']}: {plan.max_seq_len}")
    lines += ["assumptions:", *(f"  - {a}" for a in plan.assumptions)]
    return "\n".join(lines)


# --- where the model config comes from ---------------------------------------------------------------------


def load_plan_source(source: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Any, Recipe]:
    """(model config, recipe) from a recipe YAML, a model directory or a config.json; for the last two the recipe
    is the defaults plus `overrides` (only its model and training settings are used)."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml"):
        recipe = load_recipe(path, overrides)
        return recipe_model_config(recipe), recipe
    config = read_model_config(path)
    recipe = load_recipe({"model": str(path), "dataset": {"path": "unused-for-planning"}}, overrides)
    return config, recipe


# --- what `qlora-kit plan` runs ----------------------------------------------------------------------------


@dataclass
class PlanReport:
    """A plan for a recipe / model directory / config.json and, when asked, the proposal that makes it fit."""

    source: str
    plan: Plan
    fit: bool = False
    proposal: Proposal | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"source": self.source, **self.plan.to_dict()}
        if self.fit:
            out["proposal"] = self.proposal.to_dict() if self.proposal else None
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def render(self) -> str:
        text = format_plan(self.plan)
        if not self.fit:
            return text
        gpu = f"{self.plan.gpu_bytes / GiB:g} GiB"
        if self.proposal is None:
            return text + (f"\nfit: nothing fits {gpu}, even at batch 1, the shortest sequence, the lowest rank and "
                           "8-bit paged states: the frozen weights alone take "
                           f"{self.plan.base_weights_bytes / GiB:.2f} GiB")
        if not self.proposal.changes:
            return text + f"\nfit: fits {gpu} as it is; nothing to change"
        p = self.proposal.plan
        return text + (f"\nfit: to fit {gpu} change {' '.join(self.proposal.overrides())}\n"
                       f"     -> peak {p.total_bytes / GiB:.2f} GiB, resident {p.resident_bytes / GiB:.2f} GiB")


def plan_report(source: str | Path, overrides: list[str] | tuple[str, ...] = (), *, gpu_gib: float | None = None,
                fit: bool = False, attn_implementation: str = "sdpa", device: str = "cuda", gpus: int = 1,
                strategy: str | None = None, offload_base: bool = False) -> PlanReport:
    """Plan a recipe YAML, a model directory or a config.json (with `key=value` recipe overrides); with `fit`,
    also propose the least change that fits `gpu_gib`."""
    if fit and gpu_gib is None:
        raise ConfigError("--fit needs the GPU size: add --gpu GiB")
    if gpu_gib is not None and gpu_gib <= 0:
        raise ConfigError(f"--gpu must be a positive number of GiB, got {gpu_gib}")
    config, recipe = load_plan_source(source, overrides)
    shape = ModelShape.from_config(config, recipe.trust_remote_code)
    settings = Settings.from_recipe(recipe, attn_implementation=attn_implementation, device=device, gpus=gpus,
                                    strategy=strategy, offload_base=offload_base or None)
    gpu_bytes = None if gpu_gib is None else int(gpu_gib * GiB)
    plan = plan_shape(shape, settings, gpu_bytes)
    proposal = propose_fit(shape, settings, gpu_bytes, recipe.gradient_accumulation_steps) if fit else None
    return PlanReport(str(source), plan, fit, proposal)
