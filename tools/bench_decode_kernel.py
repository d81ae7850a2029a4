"""One decode-step matmul, side by side: qlora_kit's 4-bit kernel against bitsandbytes' CPU inference kernel and
the dense bf16 matmul, on the linear shapes of SmolLM2-135M and Llama-3.2-1B (random weights, NF4 + double quant).

The whole-model comparison is tools/bench_generate.py; this isolates the kernel from the model's Python overhead.
Contenders alternate call by call in one process; the table gives the median microseconds per call.

    python tools/bench_decode_kernel.py            # rows 1 and 8, 200 calls each
    python tools/bench_decode_kernel.py --calls 500 --threads 1

  ours   QuantizedWeight.decode_matmul(x): y = x Wᵀ from the codes, no LoRA
  peer   bitsandbytes.nn.Linear4bit(nf4, double quant, bf16 compute) in eval mode, no grad: on an AVX512-BF16 CPU
         it repacks its weight for its fused kernel on the first call (left out of the timing)
  dense  F.linear(x, W) with the bf16 weight
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)

    import bitsandbytes as bnb
    import torch
    import torch.nn.functional as F

    import bench_train
    from qlora_kit.quant import QuantizedWeight

    if args.threads:
        torch.set_num_threads(args.threads)
    print("| model | out x in | rows | ours us | peer us | dense us | ours vs peer | ours vs dense |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for model, shapes in SHAPES.items():
        for n, k in shapes:
            w = torch.randn(n, k, dtype=torch.bfloat16) * 0.02
            ours = QuantizedWeight.quantize(w)
            peer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                     compress_statistics=True)
            peer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)
            peer = peer.to("cpu").eval()  # bitsandbytes quantizes on the move, as transformers' loading does
            assert peer.weight.bnb_quantized
            for rows in (1, 8):
                x = torch.randn(1, rows, k, dtype=torch.bfloat16)
                fns = {"ours": lambda: ours.decode_matmul(x), "peer": lambda: peer(x), "dense": lambda: F.linear(x, w)}
                times = {c: [] for c in fns}
                with torch.no_grad():
                    for f in fns.values():
                        f()  # first call: bitsandbytes repacks here
                    for _ in range(args.calls):
                        for c, f in fns.items():
                            t = time.perf_counter()
                            f()
                            times[c].append(time.perf_counter() - t)
                med = {c: statistics.median(t) * 1e6 for c, t in times.items()}
                print(f"| {model} | {n} x {k} | {rows} | {med['ours']:.0f} | {med['peer']:.0f} | {med['dense']:.0f} | "
                      f"{med['peer'] / med['ours']:.2f}x | {med['dense'] / med['ours']:.2f}x |", flush=True)
    print(f"\nratios: their time / ours (> 1: ours faster). torch threads {torch.get_num_threads()}; "
          f"{bench_train.environment_line('cpu')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
