"""Benchmark loading a checkpoint as an NF4 double-quant model: qlora_kit against transformers + bitsandbytes.

Each load runs in its own subprocess, so every contender starts from a bare interpreter and its peak RSS is its
own. A child times its imports and its load call separately and reports its peak RSS (ru_maxrss) as of the moment
the load returns, before any forward pass. Runs alternate ours, peer, ours, peer, ... and the table gives the
median over --repeats. A checkpoint that fits in half the available RAM is read once beforehand, so every run
sees a warm page cache; a larger one is read from disk by every run (said on the header line).

    python tools/bench_load.py --model /work/bigckpt/llama-300m --repeats 3 --check-logits
    python tools/bench_load.py --model /work/bigckpt/llama-13b --only peer

Contenders (both: NF4, double quant, bf16 compute, CPU):
  ours  qlora_kit.load_quantized(DIR, quant=QuantConfig(), lora=None, device="cpu", dtype=torch.bfloat16)
  peer  AutoModelForCausalLM.from_pretrained(DIR, quantization_config=BitsAndBytesConfig(...), device_map="cpu")
"""

import argparse
import json
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import RESULT_MARK, environment_line, spawn, status_gib, warm_page_cache

REPO = Path(__file__).resolve().parents[1]  # children import qlora_kit from this checkout unless it is installed
CONTENDERS = ("ours", "peer")
CHECK_TOKENS = 32  # length of the fixed input for --check-logits
# Two loads are the same quantized model when they differ by far less than quantizing moved the logits: a different
# NF4 layout (block size, no double quant) lands near 1.4x the quantization error, compute noise near zero.
SAME_MODEL_RATIO = 0.25
METRICS = (  # (key, column title, format)
    ("import_s", "import s", "{:.2f}"),
    ("load_s", "load s", "{:.2f}"),
    ("process_s", "process s", "{:.2f}"),
    ("rss_import_gib", "RSS after import GiB", "{:.3f}"),
    ("anon_import_gib", "anon after import GiB", "{:.3f}"),
    ("peak_rss_gib", "peak RSS GiB", "{:.3f}"),
    ("peak_anon_gib", "peak anon GiB", "{:.3f}"),
    ("rss_loaded_gib", "RSS after load GiB", "{:.3f}"),
    ("anon_loaded_gib", "anon after load GiB", "{:.3f}"),
)
SAMPLE_S = 0.005  # how often a child polls its anonymous RSS during the load
# glibc raises its mmap threshold as large blocks are freed, so how much freed memory a load keeps varies from run
# to run (peer peak RSS 1.0-1.9 GiB on llama-300m); pinning the threshold makes RSS repeatable (--stable-malloc).
STABLE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
LEGEND = """
import s: the contender's imports; load s: the load call alone; process s: the whole child, interpreter start to exit.
peak RSS: the child's high-water mark (ru_maxrss) when the load returned, imports included: subtract 'RSS after
import' for the load alone. RSS also counts file-backed pages: shared libraries (~0.1 GiB) and checkpoint pages a
loader leaves mmapped (tensors that view the file); the kernel can drop those. anon: RssAnon, the memory the process
pins, polled every 5 ms during the load for its peak; subtract 'anon after import' for what the load added."""


# ---- child: one load in a fresh interpreter --------------------------------------------------------------------

def _poll_peak(key: str, stop: threading.Event, peak: list[float]) -> None:
    while not stop.wait(SAMPLE_S):
        peak[0] = max(peak[0], status_gib(key))


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _import_ours():
    import torch
    from qlora_kit import QuantConfig, load_quantized

    return lambda path: load_quantized(path, quant=QuantConfig(), lora=None, device="cpu", dtype=torch.bfloat16)


def _import_reference():
    import torch
    from transformers import AutoModelForCausalLM

    return lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cpu")


def _import_peer():
    import bitsandbytes  # noqa: F401  (imported here so its cost lands in import time, not load time)
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    return lambda path: AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                             device_map="cpu")


def run_child(contender: str, model_dir: str, logits_out: str | None) -> None:
    start = time.perf_counter()
    load = {"ours": _import_ours, "peer": _import_peer, "reference": _import_reference}[contender]()
    import_s = time.perf_counter() - start
    rss_import, anon_import = status_gib("VmRSS"), status_gib("RssAnon")

    peak_anon, stop = [anon_import], threading.Event()
    poller = threading.Thread(target=_poll_peak, args=("RssAnon", stop, peak_anon), daemon=True)
    poller.start()
    start = time.perf_counter()
    model = load(model_dir)
    load_s = time.perf_counter() - start
    stop.set()
    poller.join()
    anon_loaded = status_gib("RssAnon")
    result = {"import_s": import_s, "load_s": load_s, "rss_import_gib": rss_import, "anon_import_gib": anon_import,
              "peak_rss_gib": _peak_rss_gib(), "peak_anon_gib": max(peak_anon[0], anon_loaded),
              "rss_loaded_gib": status_gib("VmRSS"), "anon_loaded_gib": anon_loaded}
    if logits_out:
        import torch

        vocab = model.config.get_text_config().vocab_size
        ids = torch.randint(vocab, (1, CHECK_TOKENS), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.save(model(ids).logits.float(), logits_out)
    print(RESULT_MARK + json.dumps(result), flush=True)


# ---- parent: schedule children, summarize --------------------------------------------------------------------

def measure(contender: str, model_dir: Path, logits_out: Path | None, stable_malloc: bool) -> dict:
    cmd = [__file__, "--child", contender, "--model", str(model_dir)]
    if logits_out:
        cmd += ["--logits-out", str(logits_out)]
    return spawn(cmd, STABLE_MALLOC if stable_malloc else None)


def table(results: dict[str, list[dict]]) -> str:
    header = "| contender | runs | " + " | ".join(title for _, title, _ in METRICS) + " |"
    rows = [header, "|" + "---|" * (len(METRICS) + 2)]
    medians = {}
    for contender, runs in results.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            rows.append(f"| {contender} | 0/{len(runs)} | failed: {runs[-1]['error']} |")
            continue
        medians[contender] = {key: statistics.median(r[key] for r in ok) for key, _, _ in METRICS}
        cells = []
        for key, _, fmt in METRICS:
            cell = fmt.format(medians[contender][key])
            if len(ok) > 1:  # the spread, so a noisy figure reads as one
                cell += " (" + "-".join(fmt.format(f(r[key] for r in ok)) for f in (min, max)) + ")"
            cells.append(cell)
        rows.append(f"| {contender} | {len(ok)}/{len(runs)} | " + " | ".join(cells) + " |")
    if len(medians) == 2:
        ours, peer = medians["ours"], medians["peer"]
        cells = [f"{ours[k] / peer[k]:.2f}x" if peer[k] else "-" for k, _, _ in METRICS]
        rows.append("| ours/peer | | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def compare_logits(paths: dict[str, Path]) -> tuple[str, bool]:
    """One line comparing ours and peer against each other and against the unquantized bf16 model."""
    import torch

    logits = {name: torch.load(path) for name, path in paths.items()}

    def rel(a: str, b: str) -> float:  # relative L2 distance of a's logits from b's
        return ((logits[a] - logits[b]).norm() / logits[b].norm()).item()

    between, ours_q, peer_q = rel("ours", "peer"), rel("ours", "reference"), rel("peer", "reference")
    same = between < SAME_MODEL_RATIO * peer_q
    return (f"logits on {CHECK_TOKENS} fixed tokens, relative L2: ours vs peer {between:.4f}; vs the bf16 original: "
            f"ours {ours_q:.4f}, peer {peer_q:.4f} -> {'same' if same else 'NOT the same'} quantized model "
            f"(ours vs peer {'<' if same else '>='} {SAME_MODEL_RATIO} x peer's quantization error)"), same


def write_rows(path: Path, results: dict[str, list[dict]], model: Path, argv) -> None:
    """Medians of load time and peak RSS, ours against peer, as rows for tools/bench.py."""
    keys = (("load_s", "load time", "s"), ("peak_rss_gib", "load peak RSS", "GiB"))
    med = {c: {k: statistics.median(r[k] for r in runs if "error" not in r) for k, _, _ in keys}
           for c, runs in results.items() if any("error" not in r for r in runs)}
    command = "python tools/bench_load.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = [{"name": f"{name}, {model.name}", "ours": med["ours"][k], "peer": med["peer"][k], "unit": unit,
             "better": "lower", "ratio": med["ours"][k] / med["peer"][k], "command": command}
            for k, name, unit in keys if {"ours", "peer"} <= med.keys()]
    path.write_text(json.dumps(rows, indent=2) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--only", choices=CONTENDERS, help="run one contender")
    p.add_argument("--repeats", type=int, default=1, help="loads per contender; the table shows medians")
    p.add_argument("--check-logits", action="store_true",
                   help=f"compare logits on {CHECK_TOKENS} fixed tokens, from one more untimed load of each "
                        "contender and of the unquantized bf16 model (small models)")
    p.add_argument("--stable-malloc", action="store_true",
                   help="pin glibc's mmap threshold in the children, for repeatable RSS (not how users run)")
    p.add_argument("--json", type=Path, help="also write the ours/peer rows here, for tools/bench.py")
    p.add_argument("--child", choices=CONTENDERS + ("reference",), help=argparse.SUPPRESS)
    p.add_argument("--logits-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        run_child(args.child, str(args.model), args.logits_out)
        return 0
    contenders = [args.only] if args.only else list(CONTENDERS)
    cache = warm_page_cache(args.model)
    results = {c: [] for c in contenders}
    with tempfile.TemporaryDirectory() as tmp:
        logits = {c: Path(tmp, f"{c}.pt") for c in (*contenders, "reference")}
        for _ in range(args.repeats):
            for contender in contenders:
                results[contender].append(measure(contender, args.model, None, args.stable_malloc))
        checks = {}
        if args.check_logits and len(contenders) == 2:  # extra, untimed loads: forward passes stay out of the figures
            checks = {c: measure(c, args.model, path, args.stable_malloc) for c, path in logits.items()}
        malloc = ", " + " ".join(f"{k}={v}" for k, v in STABLE_MALLOC.items()) if args.stable_malloc else ""
        print(f"## Load {args.model} as NF4 + double quant on CPU\n\nmedian (min-max) of {args.repeats} run(s); "
              f"page cache {cache}{malloc}\n")
        print(table(results))
        print(LEGEND)
        failed = [f"{c}: {r['error']}" for c, r in checks.items() if "error" in r]
        same = True
        if failed:
            print("\nlogits check failed: " + "; ".join(failed))
        elif checks:
            line, same = compare_logits(logits)
            print("\n" + line)
        elif args.check_logits:
            print("\nlogits check skipped: it compares both contenders")
    print("\n" + environment_line(("torch", "transformers", "bitsandbytes", "accelerate", "safetensors")))
    if args.json:
        write_rows(args.json, results, args.model, argv)
    runs = [r for rs in results.values() for r in rs] + list(checks.values())
    return 0 if same and not any("error" in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
