"""Benchmark blockwise NF4 quantize / dequantize on CPU: qlora_kit._native against bitsandbytes, in one run.

    python tools/bench_quant.py                                  # 8192 x 8192 bf16, best of 3
    python tools/bench_quant.py --rows 4096 --cols 11008 --dtype fp16 --repeats 5 --threads 1

Both sides do the whole QLoRA recipe (NF4, blocksize 64, double quant) and the results are asserted equal
bit for bit before any time is printed:
  quantize    bnb   bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4",
                    compress_statistics=True)
              ours  packed, absmax = _native.quantize_4bit(w, 64, "nf4"); offset = absmax.mean();
                    quantize_blockwise(absmax - offset, blocksize=256)   (the nested stage: bnb's C kernel)
  dequantize  bnb   bitsandbytes.functional.dequantize_4bit(packed, state)
              ours  absmax = dequantize_blockwise(nested) + offset; _native.dequantize_4bit(...)
  nested      the 8-bit stage alone, on the same centred absmax (what QuantizedWeight runs on CPU):
              bnb   quantize_blockwise(absmax - offset, blocksize=256); dequantize_blockwise(...) + offset
              ours  _native.quantize_blockwise / _native.dequantize_blockwise(..., offset=offset)
              rated per weight parameter, like the rows above; dequantize runs on every forward and backward
Timings are the best of --repeats after one untimed call each; --threads sets torch's thread count (default:
torch's), which both bitsandbytes' torch ops and our kernels use.
"""

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch
from bitsandbytes import functional as bnbf

from qlora_kit import _native

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BLOCKSIZE, NESTED_BLOCKSIZE, QUANT_TYPE = 64, 256, "nf4"


def ours_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bnbf.QuantState, torch.Tensor]:
    packed, absmax = _native.quantize_4bit(w, BLOCKSIZE, QUANT_TYPE)
    offset = absmax.mean()
    qabsmax, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
    return packed, qabsmax, state2, offset


def ours_dequantize(packed, qabsmax, state2, offset, shape, dtype) -> torch.Tensor:
    absmax = bnbf.dequantize_blockwise(qabsmax, state2) + offset
    return _native.dequantize_4bit(packed, absmax, BLOCKSIZE, QUANT_TYPE, shape, dtype)


def best_of(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """(fastest wall time, result of the untimed first call)."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def check_quantize(ours, bnb) -> None:
    packed, qabsmax, state2, offset = ours
    ref_packed, state = bnb
    assert torch.equal(packed, ref_packed.reshape(-1)), "packed codes differ from bitsandbytes"
    assert torch.equal(qabsmax, state.absmax), "nested absmax codes differ from bitsandbytes"
    assert torch.equal(state2.absmax, state.state2.absmax), "nested scales differ from bitsandbytes"
    assert torch.equal(offset, state.offset), "absmax offset differs from bitsandbytes"


def bench_nested(absmax: torch.Tensor, repeats: int) -> list[tuple[str, float, float]]:
    """(row, bnb seconds, ours seconds) for the nested 8-bit stage on one weight's absmax, results asserted equal."""
    offset = absmax.mean()
    centred = absmax - offset
    code = bnbf.create_dynamic_map(signed=True)
    t_bnb_q, (bnb_codes, bnb_state) = best_of(
        lambda: bnbf.quantize_blockwise(centred, code=code, blocksize=NESTED_BLOCKSIZE), repeats
    )
    t_ours_q, (codes, scales) = best_of(lambda: _native.quantize_blockwise(centred, code, NESTED_BLOCKSIZE), repeats)
    assert torch.equal(codes, bnb_codes), "nested codes differ from bitsandbytes"
    assert torch.equal(scales.view(torch.int32), bnb_state.absmax.view(torch.int32)), "nested scales differ"
    t_bnb_d, bnb_out = best_of(lambda: bnbf.dequantize_blockwise(bnb_codes, bnb_state) + offset, repeats)
    t_ours_d, out = best_of(
        lambda: _native.dequantize_blockwise(codes, scales, code, NESTED_BLOCKSIZE, offset=offset), repeats
    )
    assert torch.equal(out.view(torch.int32), bnb_out.view(torch.int32)), "nested absmax differs from bitsandbytes"
    return [
        ("nested stage: quantize (8-bit absmax)", t_bnb_q, t_ours_q),
        ("nested stage: dequantize", t_bnb_d, t_ours_d),
    ]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}; {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f} (other work on the machine slows both sides); "
        f"torch {torch.__version__}, bitsandbytes {metadata.version('bitsandbytes')}, "
        f"native kernels {'built' if _native.HAVE_NATIVE else 'MISSING (torch fallback)'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--cols", type=int, default=8192)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per contender; the best counts")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    parser.add_argument("--json", type=Path, help="also write the rows here, for tools/bench.py")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    w = torch.randn(args.rows, args.cols).to(dtype)
    mparams = w.numel() / 1e6
    print(f"{machine()}\nweight {args.rows}x{args.cols} {args.dtype}, NF4, blocksize {BLOCKSIZE}, double quant\n")

    t_bnb_q, bnb = best_of(
        lambda: bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type=QUANT_TYPE, compress_statistics=True),
        args.repeats,
    )
    t_ours_q, ours = best_of(lambda: ours_quantize(w), args.repeats)
    check_quantize(ours, bnb)

    t_bnb_d, bnb_out = best_of(lambda: bnbf.dequantize_4bit(*bnb), args.repeats)
    t_ours_d, ours_out = best_of(lambda: ours_dequantize(*ours, w.shape, dtype), args.repeats)
    # Value equality: bnb's scalar CPU kernel writes FP4's code 8 as -0.0 (NF4, benchmarked here, has none).
    assert torch.equal(ours_out, bnb_out.reshape(w.shape)), (
        "dequantized weights differ from bitsandbytes (its 0.50 AVX-512 kernel misreads absmax when the last "
        "dim is a multiple of 16 but not of the blocksize; ours follows its reference kernel)"
    )

    nested = bench_nested(_native.quantize_4bit(w, BLOCKSIZE, QUANT_TYPE)[1], args.repeats)

    print("| op | bitsandbytes Mparam/s | qlora_kit Mparam/s | speed-up |")
    print("|---|---:|---:|---:|")
    rows = (("quantize + double quant", t_bnb_q, t_ours_q), ("dequantize", t_bnb_d, t_ours_d), *nested)
    for op, t_bnb, t_ours in rows:
        print(f"| {op} | {mparams / t_bnb:,.0f} | {mparams / t_ours:,.0f} | {t_bnb / t_ours:.1f}x |")
    print("\nresults bit-identical to bitsandbytes (packed codes, nested absmax, offset; dequantized values; "
          "the nested stage on its own)")
    if args.json:
        command = "python tools/bench_quant.py " + " ".join(sys.argv[1:])
        args.json.write_text(json.dumps([
            {"name": f"NF4 {op}, Mparam/s", "ours": mparams / t_ours, "peer": mparams / t_bnb, "unit": "Mparam/s",
             "better": "higher", "ratio": t_bnb / t_ours, "command": command} for op, t_bnb, t_ours in rows
        ], indent=2) + "\n")


if __name__ == "__main__":
    main()
