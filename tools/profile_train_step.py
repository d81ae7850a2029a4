"""Where a QLoRA training step's time goes: torch.profiler over a few of qlora_kit's Trainer steps.

The model and data are tools/bench_train.py's workspace (a Llama-shaped random-weight model, alpaca rows); the step is
Trainer._step, exactly what `qlora-kit train` runs (autocast, loss, backward with gradient checkpointing, clipping,
optimizer). Prints the top operators by self CPU time, and the share of a few groups of them.

    python tools/profile_train_step.py                       # 3 profiled steps after 3 warmup, packing on
    python tools/profile_train_step.py --no-packing --steps 2
"""

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]

import bench_train  # noqa: E402

# operator name prefixes -> group; the rest is "other" (elementwise ops, norms, rotary, copies, Python overhead)
GROUPS = {
    "matmul (base dequantized W, LoRA A/B, LM head)": ("aten::mm", "aten::addmm", "aten::matmul",
                                                      "aten::linear"),
    "4-bit dequantize (forward, recompute, backward)": ("dequantize",),
    "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product", "_ShortCausal", "aten::bmm",
                  "aten::baddbmm", "aten::_softmax"),
    "cross-entropy": ("aten::_log_softmax", "aten::log_softmax", "aten::nll_loss", "_ChunkedCrossEntropy",
                      "_NativeCrossEntropy"),
    "optimizer": ("Optimizer.step", "aten::_foreach", "aten::lerp", "aten::addcdiv"),
    "dtype casts": ("aten::to", "aten::_to_copy", "aten::copy_"),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "qlora-bench-train")
    bench_train.add_shape_args(p)
    p.add_argument("--preset", help="a tools/make_checkpoint.py model shape (bench_train's --preset)")
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lengths", choices=("lognormal", "uniform"), default="lognormal")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3,
                   help="steps run before profiling: the first ones fault in fresh memory (tens of ms a step)")
    p.add_argument("--no-packing", action="store_true")
    args = p.parse_args(argv)
    args.model = args.data = None
    args.no_weights, args.seed = False, 0
    model_dir, data = bench_train.prepare_workspace(args)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from qlora_kit.config import load_recipe
    from qlora_kit.quant import QuantizedWeight
    from qlora_kit.train import Trainer

    dequantize = QuantizedWeight.dequantize  # a C call through ctypes: named here so the profiler sees it

    def named_dequantize(self, *a, **kw):
        with torch.profiler.record_function("dequantize"):
            return dequantize(self, *a, **kw)

    QuantizedWeight.dequantize = named_dequantize

    with tempfile.TemporaryDirectory(prefix="profile-", dir=args.workdir) as out:
        recipe = load_recipe({
            "model": str(model_dir), "dataset": {"path": str(data), "format": "alpaca"}, "output_dir": out,
            "max_steps": args.steps + args.warmup, "batch_size": args.batch_size, "max_seq_len": args.max_seq_len,
            "packing": not args.no_packing, "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
            "optimizer": "adamw", "lr_scheduler": "constant", "gradient_checkpointing": True,
            "compute_dtype": "bfloat16",
        })
        trainer = Trainer(recipe, progress=False)
        trainer.model.train()
        batches = iter(trainer.batches)
        for _ in range(args.warmup):  # first-call costs and first touches of memory stay out
            trainer._step(batches)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                trainer._step(batches)
    events = [e for e in prof.key_averages() if e.key != "ProfilerStep*"]
    total = sum(e.self_cpu_time_total for e in events)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    print(f"\n{args.steps} steps, {total / 1e6 / args.steps:.2f} s of self CPU time per step; by group:")
    grouped = {name: 0.0 for name in GROUPS}
    for e in events:
        group = next((g for g, prefixes in GROUPS.items() if e.key.startswith(prefixes)), None)
        if group is not None:
            grouped[group] += e.self_cpu_time_total
    for name, t in sorted(grouped.items(), key=lambda kv: -kv[1]):
        print(f"  {name:55s} {t / total:6.1%}")
    print(f"  {'other':55s} {1 - sum(grouped.values()) / total:6.1%}")
    print(f"\ntorch threads {torch.get_num_threads()}; {bench_train.environment_line('cpu')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
