"""Benchmark merging a LoRA adapter into its base and saving it: `qlora-kit export` against peft.

Each export runs in its own subprocess, so every contender starts from a bare interpreter and its peak RSS is its
own. Runs alternate between contenders and the table gives the median over --repeats. A base that fits in half
the available RAM is read once beforehand, so every run sees a warm page cache. Outputs are written beside the
base (same disk) and deleted after each run.

    python tools/bench_export.py --base /work/bigckpt/llama-300m --repeats 3 --check

Contenders (CPU):
  ours           qlora-kit export ADAPTER --out OUT --base BASE   (W' = dequant(quant_nf4_dq(W)) + s·B·A)
  ours-original  the same with --merge-into original             (W' = W + s·B·A)
  ours-peft-adapter  `ours` on a copy of ADAPTER without qlora_kit.json, as peft would have written it: the kit
                 then builds the architecture (transformers' modeling code) to find the quantized layers
  peer           AutoModelForCausalLM.from_pretrained(BASE, dtype=bfloat16); PeftModel.from_pretrained(model,
                 ADAPTER); merge_and_unload(); save_pretrained(OUT)   (W' = W + s·B·A)

`ours` and `peer` do not compute the same thing: QLoRA trains the adapter against the dequantized 4-bit base, so
ours merges into dequant(quant(W)) — it quantizes and dequantizes every linear layer on top of the merge — while
peft merges into the original W. `ours-original` is the apples-to-apples row.

The adapter (r=64 on every linear but the head, PEFT format, random non-zero B, and the record of the quantized
layers that the kit's trainer writes beside every adapter) is written by `make_adapter` into ADAPTER (default
BASE-lora-r64, outside the repo) unless it is there already. Without a base at --base, one is
generated first with tools/make_checkpoint.py (--preset).
"""

import argparse
import json
import math
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import RESULT_MARK, environment_line, spawn, status_gib, warm_page_cache

REPO = Path(__file__).resolve().parents[1]  # children import qlora_kit from this checkout unless it is installed
CONTENDERS = ("ours", "ours-original", "ours-peft-adapter", "peer")
RANK, ALPHA = 64, 16
METRICS = (  # (key, column title, format)
    ("process_s", "time s", "{:.2f}"),
    ("cpu_s", "CPU s", "{:.2f}"),
    ("import_s", "of which import s", "{:.2f}"),
    ("work_s", "of which merge+save s", "{:.2f}"),
    ("peak_rss_gib", "peak RSS GiB", "{:.3f}"),
    ("rss_import_gib", "RSS after import GiB", "{:.3f}"),
)


# ---- the adapter ---------------------------------------------------------------------------------------------

def make_adapter(base: Path, out: Path, rank: int = RANK, alpha: float = ALPHA, seed: int = 0) -> Path:
    """A random PEFT LoRA adapter on every linear layer the kit quantizes (all-linear: every linear but the head),
    with the layer record the kit's trainer writes (NF4 + double quant, blocks of 64).

    A is Kaiming-uniform as at init; B is N(0, 0.02) rather than zeros, so the merge changes every weight."""
    import torch
    from safetensors.torch import save_file

    from qlora_kit.adapters import CONFIG_NAME, PREFIX, WEIGHTS_NAME
    from qlora_kit.loader import build_empty, quant_targets, read_config
    from qlora_kit.quant import QuantConfig
    from qlora_kit.targets import RECORD_NAME, LayerRecord, record_text

    model = build_empty(read_config(base), torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    targets = quant_targets(model)
    tensors = {}
    for name, target in targets.items():
        shape = tuple(model.get_submodule(name).weight.shape)
        out_f, in_f = shape[::-1] if target.transposed else shape
        bound = 1 / math.sqrt(in_f)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = (torch.rand(rank, in_f, generator=gen) * 2 - 1) * bound
        tensors[f"{PREFIX}{name}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 0.02
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base.resolve()),
        "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "use_rslora": False,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in targets}), "bias": "none",
        "fan_in_fan_out": any(t.transposed for t in targets.values()),
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    record = LayerRecord(QuantConfig(), model.base_model_prefix, targets)
    (out / RECORD_NAME).write_text(record_text(record))
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out


def without_record(adapter: Path) -> Path:
    """ADAPTER-peft: the same adapter without the kit's layer record, as peft writes adapters."""
    from qlora_kit.targets import RECORD_NAME

    out = adapter.with_name(adapter.name + "-peft")
    if not out.exists():
        shutil.copytree(adapter, out, ignore=shutil.ignore_patterns(RECORD_NAME))
    return out


# ---- child: one export in a fresh interpreter ----------------------------------------------------------------

def _import_ours(merge_into: str):
    from qlora_kit.cli import main
    import qlora_kit.export  # noqa: F401  (what the CLI imports lazily: its cost lands in import time)

    def run(base, adapter, out):
        argv = ["export", adapter, "--out", out, "--base", base, "--merge-into", merge_into, "--no-progress"]
        if main(argv) != 0:
            raise SystemExit("qlora-kit export failed")
    return run


def _import_peer():
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def run(base, adapter, out):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        model.save_pretrained(out)
    return run


def run_child(contender: str, base: str, adapter: str, out: str) -> None:
    start = time.perf_counter()
    run = {"ours": lambda: _import_ours("dequantized"), "ours-original": lambda: _import_ours("original"),
           "ours-peft-adapter": lambda: _import_ours("dequantized"), "peer": _import_peer}[contender]()
    import_s = time.perf_counter() - start
    rss_import = status_gib("VmRSS")
    start = time.perf_counter()
    run(base, adapter, out)
    work_s = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(RESULT_MARK + json.dumps({"import_s": import_s, "work_s": work_s, "rss_import_gib": rss_import,
                                    "cpu_s": usage.ru_utime + usage.ru_stime,
                                    "peak_rss_gib": usage.ru_maxrss / 2**20}), flush=True)  # KiB on Linux


# ---- parent: schedule children, summarize --------------------------------------------------------------------

def measure(contender: str, base: Path, adapter: Path, out: Path) -> dict:
    cmd = [__file__, "--child", contender, "--base", str(base), "--adapter", str(adapter), "--out", str(out)]
    return spawn(cmd, {"PYTHONWARNINGS": "ignore"})


def compare_outputs(outs: dict[str, Path]) -> list[str]:
    """Max |difference| between the contenders' merged weights, relative to the largest weight."""
    from safetensors import safe_open

    def tensors(path):
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(f, "pt") as st:
                for k in st.keys():
                    yield k, st.get_tensor(k)

    lines = []
    pairs = [("ours", "ours-peft-adapter", "same work, layers found two ways: must be 0"),
             ("ours-original", "peer", "same math: only rounding may differ"),
             ("ours", "peer", "differ by the NF4 quantization error of the base")]
    for a, b, note in pairs:
        if a not in outs or b not in outs:
            continue
        other = dict(tensors(outs[b]))
        diff = scale = 0.0
        for k, t in tensors(outs[a]):
            diff = max(diff, (t.float() - other.pop(k).float()).abs().max().item())
            scale = max(scale, t.float().abs().max().item())
        extra = f", {len(other)} tensors only in {b}" if other else ""
        lines.append(f"{a} vs {b}: max|diff| {diff:.3g} = {diff / scale:.2e} of max|w| ({note}){extra}")
    return lines


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
            if len(ok) > 1:
                cell += " (" + "-".join(fmt.format(f(r[key] for r in ok)) for f in (min, max)) + ")"
            cells.append(cell)
        rows.append(f"| {contender} | {len(ok)}/{len(runs)} | " + " | ".join(cells) + " |")
    peer = medians.get("peer")
    for ours in ("ours", "ours-original", "ours-peft-adapter"):
        if peer and ours in medians:
            cells = [f"{medians[ours][k] / peer[k]:.2f}x" if peer[k] else "-" for k, _, _ in METRICS]
            rows.append(f"| {ours}/peer | | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_rows(path: Path, results: dict[str, list[dict]], base: Path, argv) -> None:
    """Medians of the whole command's time, merge+save time and peak RSS, each of ours against peer, as rows for
    tools/bench.py."""
    keys = (("process_s", "export time, whole command", "s"), ("work_s", "export merge+save time", "s"),
            ("peak_rss_gib", "export peak RSS", "GiB"))
    med = {c: {k: statistics.median(r[k] for r in runs if "error" not in r) for k, _, _ in keys}
           for c, runs in results.items() if any("error" not in r for r in runs)}
    command = "python tools/bench_export.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = [{"name": f"{name}, {base.name} ({ours})", "ours": med[ours][k], "peer": med["peer"][k], "unit": unit,
             "better": "lower", "ratio": med[ours][k] / med["peer"][k], "command": command}
            for ours in ("ours", "ours-original", "ours-peft-adapter") for k, name, unit in keys
            if {ours, "peer"} <= med.keys() and (ours, k) != ("ours-peft-adapter", "work_s")]
    # (without the record, transformers is imported inside merge+save, where the peer has it in its import time:
    # only the whole command compares like with like for that row)
    path.write_text(json.dumps(rows, indent=2) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, default=Path("/work/bigckpt/llama-300m"), help="HF checkpoint directory")
    p.add_argument("--preset", default="llama-300m", help="make_checkpoint.py preset used when --base is missing")
    p.add_argument("--adapter", type=Path, help="PEFT adapter directory (default: BASE-lora-r64, made if missing)")
    p.add_argument("--only", choices=CONTENDERS, action="append", help="run only these contenders")
    p.add_argument("--repeats", type=int, default=1, help="exports per contender; the table shows medians")
    p.add_argument("--check", action="store_true", help="compare the last outputs of the contenders tensor by tensor")
    p.add_argument("--json", type=Path, help="also write the ours/peer rows here, for tools/bench.py")
    p.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        run_child(args.child, str(args.base), str(args.adapter), args.out)
        return 0
    if not args.base.exists():
        subprocess.run([sys.executable, str(REPO / "tools" / "make_checkpoint.py"), args.preset, str(args.base)],
                       check=True)
    adapter = args.adapter or args.base.with_name(f"{args.base.name}-lora-r{RANK}")
    if not adapter.exists():
        sys.path.insert(0, str(REPO))
        make_adapter(args.base, adapter)
    adapters = {c: adapter for c in CONTENDERS} | {"ours-peft-adapter": without_record(adapter)}
    contenders = args.only or list(CONTENDERS)
    cache = warm_page_cache(args.base, "base")
    results = {c: [] for c in contenders}
    with tempfile.TemporaryDirectory(prefix=".bench-export-", dir=args.base.parent) as tmp:
        outs = {c: Path(tmp, c) for c in contenders}
        for i in range(args.repeats):
            for contender in contenders:
                results[contender].append(measure(contender, args.base, adapters[contender], outs[contender]))
                if i < args.repeats - 1 or not args.check:
                    shutil.rmtree(outs[contender], ignore_errors=True)
        print(f"## Merge a LoRA adapter (r={RANK}, alpha={ALPHA}, all linear layers) into {args.base} and save it\n\n"
              f"median (min-max) of {args.repeats} run(s); page cache {cache}\n")
        print(table(results))
        print("\ntime: the whole child process, interpreter start to exit (wall clock); CPU: its user + system "
              "time over all threads, the figure a busy machine distorts least;\nimport: the contender's imports; "
              "merge+save: the export call alone.\npeak RSS: the child's high-water mark (ru_maxrss), imports "
              "included.\nours merges into dequant(quant(W)) (what QLoRA trained against) and so also quantizes "
              "and dequantizes every linear;\nours-original and peer both compute W + s·B·A (same math); "
              "ours-peft-adapter is ours on an adapter without the kit's layer record,\nso it imports transformers "
              "and builds the architecture during merge+save (the peer's import column has that import instead).")
        if args.check:
            print("\n" + "\n".join(compare_outputs({c: p for c, p in outs.items() if p.exists()})))
    print(f"\ncommand: python tools/bench_export.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(environment_line(("torch", "transformers", "peft", "bitsandbytes", "safetensors")))
    if args.json:
        write_rows(args.json, results, args.base, argv)
    return 1 if any("error" in r for runs in results.values() for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
