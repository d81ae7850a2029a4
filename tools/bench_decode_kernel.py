"""One decode-step matmul, side by side: qlora_kit's 4-bit kernel against bitsandbytes' CPU inference kernel and
the dense bf16 matmul, on the linear shapes of SmolLM2-135M and Llama-3.2-1B (random weights, NF4 + double quant).

The whole-model comparison is tools/bench_generate.py; this isolates the kernel from the model's Python overhead.
Contenders alternate call by call in one process; the table gives the median microseconds per call.

    python tools/bench_decode_kernel.py            # rows 1 and 8, 200 calls each
    python tools/bench_decode_kernel.py --calls 500 --threads 1
    python tools/bench_decode_kernel.py --cold     # every call reads its weight from memory, as a decode step does

  ours   QuantizedWeight.decode_matmul(x): y = x Wᵀ from the codes, no LoRA
  peer   bitsandbytes.nn.Linear4bit(nf4, double quant, bf16 compute) in eval mode, no grad: on an AVX512-BF16 CPU
         it repacks its weight for its fused kernel on the first call (left out of the timing)
  dense  F.linear(x, W) with the bf16 weight

--cold: each contender cycles through its own copies of the weight, more of them than the last-level cache holds
(--cache-mb), so no call finds its weight in cache; without it one weight is called over and over, and the
smaller shapes run from cache. "ours GB/s" is the 4-bit weight's bytes (codes and scales) over our time.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]

SHAPES = {"smollm2-135m": [(576, 576), (192, 576), (1536, 576), (576, 1536)],
          "llama-1b": [(2048, 2048), (512, 2048), (8192, 2048), (2048, 8192)]}


def make_peer(bnb, w):
    """bitsandbytes' Linear4bit (NF4, double quant, bf16 compute) holding w, quantized on the move as transformers'
    loading does."""
    import torch

    n, k = w.shape
    peer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
    peer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)
    peer = peer.to("cpu").eval()
    assert peer.weight.bnb_quantized
    return peer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--cold", action="store_true", help="a ring of copies per contender, larger than the cache")
    p.add_argument("--cache-mb", type=float, default=32.0, help="last-level cache size, for --cold")
    args = p.parse_args(argv)

    import bitsandbytes as bnb
    import torch
    import torch.nn.functional as F

    import bench_train
    from qlora_kit.quant import QuantizedWeight

    if args.threads:
        torch.set_num_threads(args.threads)
    print("| model | out x in | rows | ours us | peer us | dense us | ours vs peer | ours vs dense | ours Gparam/s "
          "| ours GB/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model, shapes in SHAPES.items():
        for n, k in shapes:
            w = torch.randn(n, k, dtype=torch.bfloat16) * 0.02
            # copies enough that the dense ones alone are twice the cache: between two calls on one copy, every
            # other copy of every contender is read
            copies = max(2, int(2 * args.cache_mb * 2**20 // w.nbytes) + 1) if args.cold else 1
            ours = [QuantizedWeight.quantize(w) for _ in range(copies)]
            peer = [make_peer(bnb, w) for _ in range(copies)]
            dense = [w.clone() for _ in range(copies)]
            for rows in (1, 8):
                x = torch.randn(1, rows, k, dtype=torch.bfloat16)
                fns = {"ours": lambda i: ours[i].decode_matmul(x), "peer": lambda i: peer[i](x),
                       "dense": lambda i: F.linear(x, dense[i])}
                times = {c: [] for c in fns}
                with torch.no_grad():
                    for f in fns.values():
                        for i in range(copies):
                            f(i)  # first call: bitsandbytes repacks here
                    for call in range(args.calls):
                        for c, f in fns.items():
                            t = time.perf_counter()
                            f(call % copies)
                            times[c].append(time.perf_counter() - t)
                med = {c: statistics.median(t) * 1e6 for c, t in times.items()}
                print(f"| {model} | {n} x {k} | {rows} | {med['ours']:.0f} | {med['peer']:.0f} | {med['dense']:.0f} | "
                      f"{med['peer'] / med['ours']:.2f}x | {med['dense'] / med['ours']:.2f}x | "
                      f"{n * k / med['ours'] / 1e3:.1f} | {ours[0].nbytes() / med['ours'] / 1e3:.1f} |", flush=True)
    print(f"\nratios: their time / ours (> 1: ours faster). torch threads {torch.get_num_threads()}; "
          f"{bench_train.environment_line('cpu')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
