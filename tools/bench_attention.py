"""Causal attention of short examples on the CPU, forward + backward: torch's flash kernel against the kit's
`_ShortCausal` (qlora_kit/attention.py), which training takes for examples up to `attention.SHORT` tokens.

    python tools/bench_attention.py                      # SmolLM2-135M's heads: 9 query, 3 key/value, 64 wide
    python tools/bench_attention.py --heads 32 --kv-heads 8 --dim 128 --lengths 64 128 256 512

bf16 inputs, glibc's thresholds as the Trainer sets them, best of --repeats runs of each, interleaved; the error
columns are the norm of the difference to an fp64 reference of the q/k/v gradients over the norm of the reference
(worst of the three).
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlora_kit.attention import _ShortCausal  # noqa: E402
from qlora_kit.device import keep_freed_memory  # noqa: E402


def run(fn, q, k, v, grad):
    out = fn(q, k, v)
    return out, *torch.autograd.grad(out, (q, k, v), grad)


def flash(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def short(q, k, v):
    return _ShortCausal.apply(q, k, v, q.shape[-1] ** -0.5)


def exact(q, k, v):
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--examples", type=int, default=4, help="examples of each length per call")
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 171, 256, 384, 512])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    keep_freed_memory()  # as the Trainer runs: without it, fresh mmaps of the fp32 scores swing the timings
    print(f"| tokens | flash ms | short ms | flash / short | flash err | short err |  ({args.examples} examples, "
          f"{args.heads}/{args.kv_heads} heads of {args.dim}, {torch.get_num_threads()} threads)\n|---:|---:|---:|---:|---:|---:|")
    for length in args.lengths:
        gen = torch.Generator().manual_seed(length)
        q, k, v = (torch.randn(args.examples, h, length, args.dim, generator=gen).bfloat16().requires_grad_()
                   for h in (args.heads, args.kv_heads, args.kv_heads))
        grad = torch.randn(q.shape, generator=gen).bfloat16()
        ref = run(exact, *(t.detach().double().requires_grad_() for t in (q, k, v)), grad.double())
        best = {flash: float("inf"), short: float("inf")}
        err = {}
        for _ in range(args.repeats):
            for fn in best:
                start = time.perf_counter()
                res = run(fn, q, k, v, grad)
                best[fn] = min(best[fn], time.perf_counter() - start)
                err[fn] = max(float((a.double() - r).norm() / r.norm()) for a, r in zip(res[1:], ref[1:]))
        print(f"| {length} | {best[flash] * 1e3:.1f} | {best[short] * 1e3:.1f} | {best[flash] / best[short]:.2f}x | "
              f"{err[flash]:.1e} | {err[short]:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
