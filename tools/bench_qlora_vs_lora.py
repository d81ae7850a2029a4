"""QLoRA against 16-bit LoRA on a real model: same data, steps, seed and LoRA init; held-out loss of each.

    python tools/get_smollm2.py                                   # the model, once (93 MB download)
    python tools/bench_qlora_vs_lora.py                           # bf16 LoRA vs QLoRA (NF4 + double quant)
    python tools/bench_qlora_vs_lora.py --quant bf16 --quant nf4 --quant fp4 --steps 100 --json rows.json

The QLoRA paper's claim (Dettmers et al., 2023, section 4) is that a 4-bit NF4 base with LoRA on every linear
layer matches 16-bit LoRA. Each `--quant` is one arm:
  bf16        the 16-bit reference: the unquantized checkpoint in bf16 with peft's LoRA on the same layers (what a
              user running 16-bit LoRA would use; the kit has no unquantized base by design)
  KEY=V,...   the kit's 4-bit base, `QuantConfig(**fields)` (a bare word is the type: `nf4` = type=nf4), e.g.
              `type=nf4,double_quant=false`; any field QuantConfig gains later works here unchanged
Every arm runs the same loop here: the recipe's data and batch order (qlora_kit.batching, same seed), the kit's
token-weighted loss, optimizer and schedule, and the same initial adapter — peft's LoRA A matrices are copied from
the kit's seeded initialisation, B starts at zero in both — so the only difference between arms is the base
weights. Held-out loss is the recipe's eval set, response tokens only, before and after training.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

import benchlib

from qlora_kit.batching import BatchIterator
from qlora_kit.config import Recipe, load_recipe
from qlora_kit.data import build_datasets, ensure_pad_token
from qlora_kit.device import load_tokenizer
from qlora_kit.loader import load_quantized
from qlora_kit.lora import QLinear, lora_parameters
from qlora_kit.optim import make_optimizer, make_scheduler
from qlora_kit.quant import QuantConfig
from qlora_kit.train import evaluate, token_loss_sum

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "smollm2-pos.yaml"
BF16 = "bf16"


def quant_arm(spec: str) -> QuantConfig | None:
    """`bf16` -> None (16-bit LoRA); otherwise QuantConfig fields, `type=nf4,double_quant=true` or just `nf4`."""
    if spec == BF16:
        return None
    known = {f.name: f.type for f in fields(QuantConfig)}
    kwargs: dict[str, object] = {}
    for part in spec.split(","):
        key, _, value = part.partition("=") if "=" in part else ("type", "=", part)
        if key not in known:
            sys.exit(f"--quant {spec}: unknown QuantConfig field {key!r} (fields: {', '.join(known)})")
        kwargs[key] = {"true": True, "false": False}.get(value.lower(), int(value) if value.isdigit() else value)
    return QuantConfig(**kwargs)


def arm_label(quant: QuantConfig | None) -> str:
    if quant is None:
        return "bf16 LoRA (peft)"
    default = QuantConfig(type=quant.type)
    extra = [f"{f.name}={getattr(quant, f.name)}" for f in fields(QuantConfig)
             if f.name != "type" and getattr(quant, f.name) != getattr(default, f.name)]
    return f"QLoRA {quant.type}" + ("+DQ" if quant.double_quant else "") + (f" ({', '.join(extra)})" if extra else "")


def kit_model(recipe: Recipe, quant: QuantConfig) -> torch.nn.Module:
    torch.manual_seed(recipe.seed)  # the Trainer seeds here too: LoRA A's init comes from this stream
    return load_quantized(recipe.model, quant=quant, lora=recipe.lora, device="cpu", dtype=torch.bfloat16)


def peft_model(recipe: Recipe, init_from: torch.nn.Module) -> torch.nn.Module:
    """bf16 base + peft LoRA on exactly the kit's adapted layers, LoRA A copied from the kit's seeded init."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapted = {name: mod for name, mod in init_from.named_modules() if isinstance(mod, QLinear)}
    base = AutoModelForCausalLM.from_pretrained(recipe.model, dtype=torch.bfloat16)
    lora = recipe.lora
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, use_rslora=lora.use_rslora,
                        target_modules=sorted(adapted), bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, config)  # adapter weights fp32 (autocast_adapter_dtype), like the kit's masters
    peft_modules = dict(model.base_model.model.named_modules())
    for name, mod in adapted.items():
        (adapter,) = mod.lora_A.keys()
        with torch.no_grad():
            peft_modules[name].lora_A["default"].weight.copy_(mod.lora_A[adapter].weight)
            peft_modules[name].lora_B["default"].weight.zero_()
    return model


def run_arm(recipe: Recipe, quant: QuantConfig | None, data, steps: int) -> dict:
    tokenizer, train_data, eval_data = data
    pad_id = ensure_pad_token(tokenizer)
    kit = kit_model(recipe, quant or QuantConfig())
    model = kit if quant is not None else peft_model(recipe, kit)
    params = (list(lora_parameters(model).values()) if quant is not None
              else [p for p in model.parameters() if p.requires_grad])
    optimizer = make_optimizer(params, recipe.optimizer, recipe.learning_rate, recipe.weight_decay, torch.device("cpu"))
    warmup = recipe.warmup_steps or int(recipe.warmup_ratio * steps)
    scheduler = make_scheduler(optimizer, recipe.lr_scheduler, warmup, steps)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    evaluate_now = lambda: evaluate(model, eval_data, recipe.batch_size, pad_id, "cpu", autocast)  # noqa: E731
    torch.manual_seed(recipe.seed)  # dropout draws start from the same state in every arm
    before = evaluate_now()
    batches = iter(BatchIterator(train_data, recipe.batch_size, pad_id, recipe.seed, 0))
    model.train()
    start, losses = time.perf_counter(), []
    for _ in range(steps):
        batch = next(batches)
        with autocast():
            loss, n = token_loss_sum(model, batch)
        (loss / max(n, 1)).backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item() / max(n, 1))
    seconds = time.perf_counter() - start
    after = evaluate_now()
    return {"arm": arm_label(quant), "quant": None if quant is None else asdict(quant), "eval_loss_before": before,
            "eval_loss_after": after, "train_loss_last10": sum(losses[-10:]) / len(losses[-10:]),
            "train_seconds": seconds, "steps": steps}


def json_rows(results: list[dict], model: str, command: str) -> list[dict]:
    """Rows for tools/bench.py: each 4-bit arm's held-out loss against the bf16 arm's (ratio ours/peer)."""
    reference = next((r for r in results if r["quant"] is None), None)
    return [{"name": f"held-out loss after LoRA, {model}, {r['arm']} vs bf16 LoRA", "ours": r["eval_loss_after"],
             "peer": reference["eval_loss_after"] if reference else None, "unit": "nats/token", "better": "lower",
             "ratio": r["eval_loss_after"] / reference["eval_loss_after"] if reference else None,
             "command": command} for r in results if r["quant"] is not None]


def table(results: list[dict], recipe: Recipe, steps: int) -> str:
    lora = recipe.lora
    lines = [f"QLoRA vs 16-bit LoRA: {Path(recipe.model).name}, {steps} steps of batch {recipe.batch_size}, "
             f"lr {recipe.learning_rate:g} {recipe.lr_scheduler}, LoRA r={lora.r} alpha={lora.alpha:g} "
             f"dropout={lora.dropout:g} {','.join(lora.target_modules)}, seed {recipe.seed}",
             f"train {recipe.dataset.path}, held out {recipe.dataset.eval_path} (response tokens only)", "",
             "| arm | held-out loss before | after | vs bf16 LoRA | train loss, last 10 steps | train s |",
             "|---|---:|---:|---:|---:|---:|"]
    reference = next((r["eval_loss_after"] for r in results if r["quant"] is None), None)
    for r in results:
        vs = f"{r['eval_loss_after'] / reference:.3f}x" if reference else "-"
        lines.append(f"| {r['arm']} | {r['eval_loss_before']:.4f} | {r['eval_loss_after']:.4f} | {vs} | "
                     f"{r['train_loss_last10']:.4f} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path, default=RECIPE, 
                    help="data, LoRA and optimizer settings (default: the demo's)")
    ap.add_argument("--quant", action="append", help="an arm: bf16, or QuantConfig fields (repeatable; "
                    "default: bf16 and nf4)")
    ap.add_argument("--steps", type=int, help="optimizer steps per arm (default: the recipe's max_steps)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the rows (for tools/bench.py) here")
    ap.add_argument("overrides", nargs="*", help="recipe key=value overrides, as for qlora-kit train")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe, args.overrides)
    if not (Path(recipe.model) / "config.json").is_file():
        print(f"bench_qlora_vs_lora: {recipe.model} not found; run `python tools/get_smollm2.py` first",
              file=sys.stderr)
        return 2
    arms = [quant_arm(spec) for spec in (args.quant or [BF16, "nf4"])]
    steps = args.steps or recipe.max_steps
    tokenizer = load_tokenizer(recipe.model)
    ensure_pad_token(tokenizer)
    train_data, eval_data = build_datasets(recipe.dataset, tokenizer, recipe.max_seq_len, recipe.seed)
    results = [run_arm(recipe, quant, (tokenizer, train_data, eval_data), steps) for quant in arms]
    command = "python tools/bench_qlora_vs_lora.py " + " ".join(sys.argv[1:])
    print(table(results, recipe, steps))
    print(f"\ncommand: {command}\n" + benchlib.environment_line(("torch", "transformers", "peft")))
    if args.json:
        args.json.write_text(json.dumps(json_rows(results, Path(recipe.model).name, command), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
