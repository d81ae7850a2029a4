"""Run every side-by-side benchmark of the project and write BENCHMARKS.md and docs/benchmarks.png.

    python tools/bench.py            # quick sizes: a few minutes on an idle 2-core machine, noisy figures
    python tools/bench.py --full     # the sizes BENCHMARKS.md should carry (much longer)
    python tools/bench.py --gpu      # on a CUDA machine, instead: the 7B QLoRA step against the peer, the 70B
                                     # step's memory, decode speed, the GPU-marked tests (quick: under 8 minutes)
    python tools/bench.py --big-checkpoint /work/bigckpt/llama-13b   # also stream a checkpoint larger than RAM

Each benchmark is its own script, run here as a subprocess with `--json ROWS`; every row it writes is one
comparison: {name, ours, peer, unit, better: "higher"|"lower", ratio: ours/peer, command}. A row without a peer
(peer null) is an absolute figure checked against its goal (the 70B step's memory). A script that is missing or
fails is reported as such in BENCHMARKS.md and the others still run.

Goals are the issues': quantize >= 10x bitsandbytes; load <= 0.5x the time and <= 1x the peak RSS of
transformers + bitsandbytes; training >= 1.5x the peer's tokens/s, with and without packing on our side, against
the peer at its best (padding-free packed) and its plain padded loop alike; generation >= 1.5x transformers +
bitsandbytes' tokens/s and >= 1x the dense bf16 model's; export <= 0.5x the time
and <= 1x the peak RSS of peft's merge_and_unload + save_pretrained; the 70B step under 48 GiB; serving 16 clients over 4 adapters >= 3x the tokens/s of the same requests one at a
time, adapter switched between them (ours or peft's set_adapter). Rows no issue sets a number for must at least
match their peer, marked "parity".
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import benchlib

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
GOAL_70B_GIB = 48.0
MET_TEXT = {True: "yes", False: "**no**", None: "-"}


@dataclass
class Bench:
    """One benchmark script and its arguments at each size (a workdir/<preset> argument is generated first)."""

    what: str
    script: str
    quick: list[str]
    full: list[str]
    rows: list[dict] = field(default_factory=list)
    output: str = ""
    status: str = "not run"
    seconds: float = 0.0


def cpu_benches(work: Path) -> list[Bench]:
    small, big = str(work / "llama-160m"), str(work / "llama-300m")
    return [
        Bench("NF4 quantize / dequantize", "bench_quant.py", ["--rows", "4096", "--cols", "4096", "--repeats", "3"],
              ["--repeats", "5"]),
        Bench("load a checkpoint in 4 bits", "bench_load.py", ["--model", small, "--repeats", "3"],
              ["--model", big, "--repeats", "3"]),
        Bench("QLoRA training", "bench_train.py", ["--workdir", str(work / "train")],
              ["--workdir", str(work / "train"), "--rows", "256", "--max-seq-len", "512", "--repeats", "3"]),
        # 300M even in quick mode: at 160M the fixed costs (imports, building the model skeleton) are half the time
        Bench("merge + export an adapter", "bench_export.py", ["--base", big, "--repeats", "3"],
              ["--base", big, "--repeats", "5"]),
        Bench("multi-adapter generation", "bench_multi_adapter.py", ["--workdir", str(work / "train")],
              ["--workdir", str(work / "train"), "--new-tokens", "32", "--repeats", "3"]),
        # one torch thread per serving process: 16 client threads share the same 2 cores
        Bench("OpenAI-compatible serving, many adapters", "bench_serve.py",
              ["--workdir", str(work / "train"), "--threads", "1"],
              ["--workdir", str(work / "train"), "--threads", "1", "--requests-per-client", "4", "--repeats", "3"]),
        # the real model (python tools/get_smollm2.py first); the demo recipe's data, steps and seed
        Bench("QLoRA vs 16-bit LoRA, SmolLM2-135M-Instruct", "bench_qlora_vs_lora.py", [],
              ["--quant", "bf16", "--quant", "nf4", "--quant", "fp4"]),
        Bench("generation (decode) speed", "bench_generate.py",
              ["--workdir", str(work / "generate"), "--models", "smollm2-135m", "--repeats", "2"],
              ["--workdir", str(work / "generate"), "--repeats", "3"]),
    ]


def gpu_benches(work: Path) -> list[Bench]:
    """CUDA only, sized so the quick set fits in 8 minutes on one H100/H200. The 7B model is generated on disk
    (13.5 GB) and loaded by ours and by the peer twice (padding-free packed, its best; and padded, its plain loop);
    the 70B one has no bf16 checkpoint (138 GB would not fit a 64 GB disk), so ours builds it on the GPU in 4 bits
    layer by layer and the peer, which loads only from disk, sits that row out. r=16 with torch AdamW keeps the 70B
    step under 48 GiB (qlora-kit plan: 38.5 GiB at batch 1 x 512; r=64 would need 50 GiB). Then decode speed on the
    1B shape, and the test suite's GPU-marked tests."""
    train = ["--device", "cuda", "--workdir", str(work / "train")]
    seven = train + ["--preset", "llama-7b", "--lora-r", "64", "--lora-alpha", "16", "--only", "ours",
                     "--only", "peer-packed", "--only", "peer"]
    seventy = train + ["--preset", "llama-70b", "--no-weights", "--only", "ours", "--lora-r", "16",
                       "--lora-alpha", "32", "--batch-size", "1", "--max-seq-len", "512"]
    return [
        Bench("QLoRA training, Llama-2-7B shape, CUDA", "bench_train.py",
              seven + ["--rows", "64", "--max-seq-len", "512"],
              seven + ["--rows", "256", "--max-seq-len", "1024", "--repeats", "3"]),
        Bench("QLoRA training, Llama-2-70B shape, CUDA (ours only)", "bench_train.py",
              seventy + ["--rows", "8"], seventy + ["--rows", "32"]),
        Bench("generation (decode) speed, CUDA", "bench_generate.py",
              ["--device", "cuda", "--workdir", str(work / "generate"), "--models", "llama-1b", "--repeats", "2"],
              ["--device", "cuda", "--workdir", str(work / "generate"), "--models", "llama-1b", "llama-7b"]),
        Bench("GPU-marked tests", PYTEST_GPU, [], []),
    ]


PYTEST_GPU = "pytest -m gpu"  # not a tools/ script: the test suite's CUDA tests, run as they are


# ---- running ---------------------------------------------------------------------------------------------------

def ensure_checkpoints(args: list[str], work: Path) -> None:
    """Generate (once, tools/make_checkpoint.py) every random-weight checkpoint `args` name as work/<preset>."""
    sys.path.insert(0, str(TOOLS))
    from make_checkpoint import PRESETS

    for arg in args:
        path = Path(arg)
        if path.parent == work and path.name in PRESETS and not (path / "config.json").is_file():
            subprocess.run([sys.executable, str(TOOLS / "make_checkpoint.py"), path.name, str(path)], check=True)


def run_tests(bench: Bench) -> None:
    """The GPU-marked tests: a status line (pytest's summary), no rows."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(REPO / "tests")]
    print(f"\n$ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    bench.seconds = time.perf_counter() - start
    bench.output = proc.stdout.strip()
    summary = (bench.output.splitlines() or ["(no output)"])[-1].strip("= ")
    bench.status = ("ok: " if proc.returncode == 0 else f"exit {proc.returncode}: ") + summary
    print(bench.output, flush=True)


def run_bench(bench: Bench, full: bool, work: Path) -> None:
    if bench.script == PYTEST_GPU:
        return run_tests(bench)
    script = TOOLS / bench.script
    if not script.is_file():
        bench.status = f"skipped: tools/{bench.script} is not in this checkout"
        return
    args = bench.full if full else bench.quick
    ensure_checkpoints(args, work)
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = Path(tmp, "rows.json")
        cmd = [sys.executable, str(script), *args, "--json", str(rows_file)]
        print(f"\n$ {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        bench.seconds = time.perf_counter() - start
        bench.output = proc.stdout.strip()
        print(bench.output, flush=True)
        if rows_file.is_file():
            bench.rows = json.loads(rows_file.read_text())
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        bench.status = f"exit {proc.returncode}: {tail}" + ("" if bench.rows else " (no rows)")
    else:
        bench.status = "ok" if bench.rows else "ok, but it wrote no rows"


# ---- goals -----------------------------------------------------------------------------------------------------

# The goals the issues set, as (row-name prefix, ratio): time and memory rows read "ours <= ratio x peer",
# throughput rows "ours >= ratio x peer". Rows not listed must at least match their peer.
GOALS: tuple[tuple[str, float], ...] = (
    ("NF4 quantize + double quant", 10.0),
    ("load time", 0.5),
    ("load peak RSS", 1.0),
    ("train tokens/s", 1.5),
    ("export time, whole command", 0.5),
    ("export merge+save time", 0.5),
    ("export peak RSS", 1.0),
    ("serve tokens/s, 16 clients over 4 adapters", 3.0),
)


def goal(row: dict) -> tuple[float | None, str, bool]:
    """(goal value, how it reads, set by the project): a ratio, or for a peer-less memory row GiB."""
    if row.get("peer") is None:
        if row["unit"] == "GiB":
            return GOAL_70B_GIB, f"< {GOAL_70B_GIB:g} GiB", True
        return None, "-", False
    sign = ">=" if row["better"] == "higher" else "<="
    if row.get("goal") is not None:  # a script that knows its issue's goal writes it into the row
        return row["goal"], f"{sign} {row['goal']:g}x", True
    for prefix, value in GOALS:
        if row["name"].startswith(prefix):
            return value, f"{sign} {value:g}x", True
    return 1.0, f"{sign} 1x (parity)", False


def met(row: dict) -> bool | None:
    value, _, _ = goal(row)
    if value is None:
        return None
    if row.get("peer") is None:
        return row["ours"] < value
    return row["ratio"] >= value if row["better"] == "higher" else row["ratio"] <= value


def advantage(row: dict) -> float:
    """How many times better ours is (> 1: ours wins), whichever direction the metric is better in."""
    return row["ratio"] if row["better"] == "higher" else 1 / row["ratio"]


# ---- the report ------------------------------------------------------------------------------------------------

def machine(load_start: tuple[float, ...], gpu: bool, revision: str) -> list[str]:
    fmt = lambda load: ", ".join(f"{x:.2f}" for x in load)  # noqa: E731
    lines = [f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
             f"- CPU: {benchlib.cpu_name()}, {os.cpu_count()} cores, {benchlib.ram_gib():.0f} GiB RAM",
             f"- load average (1, 5, 15 min): {fmt(load_start)} at the start, {fmt(os.getloadavg())} at the end "
             "(the benchmarks themselves add about one per busy core; more is other work competing with them)"]
    if gpu:
        import torch

        lines.append(f"- GPU: {torch.cuda.get_device_name()}, "
                     f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
    versions = benchlib.versions(("torch", "bitsandbytes", "transformers", "peft", "accelerate"))
    lines += [f"- Python {platform.python_version()}; " + ", ".join(versions),
              f"- qlora-kit {revision}"]
    return lines


def rerun_command(command: str) -> str:
    """A row's command without the `--json FILE` this script added (a temp file, gone by now)."""
    words = command.split()
    if "--json" in words:
        at = words.index("--json")
        del words[at:at + 2]
    return " ".join(words)


def fmt_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:,.3f} {unit}" if value < 10 else f"{value:,.1f} {unit}"


def report(benches: list[Bench], argv: list[str], load_start, gpu: bool, chart: Path | None,
           revision: str) -> str:
    mode = ("full" if "--full" in argv else "quick") + (" + GPU" if gpu else "")
    lines = ["# Benchmarks", "",
             f"Written by `{' '.join(['python tools/bench.py', *argv])}` ({mode} sizes). ours/peer is ours divided by the "
             "peer; whether higher or lower is better depends on the row. Each row's command reruns it alone; the "
             "sections below hold each script's full output (contenders, medians and spreads, what is measured).", "",
             "| what | ours | peer | ours/peer | goal | met | command |", "|---|---:|---:|---:|---|---|---|"]
    for bench in benches:
        if not bench.rows:
            lines.append(f"| {bench.what} | - | - | - | - | - | {bench.status} |")
        for row in bench.rows:
            _, goal_text, _ = goal(row)
            ratio = "-" if row.get("peer") is None else f"{row['ratio']:.2f}x"
            lines.append(f"| {row['name']} | {fmt_value(row['ours'], row['unit'])} | "
                         f"{fmt_value(row.get('peer'), row['unit'])} | {ratio} | {goal_text} | "
                         f"{MET_TEXT[met(row)]} | `{rerun_command(row['command'])}` |")
    notes = REPO / "docs" / "benchmark-notes.md"  # hand-written reading of the figures, kept across rewrites
    if notes.is_file():
        lines += ["", notes.read_text().strip()]
    lines += ["", "## Machine", "", *machine(load_start, gpu, revision)]
    if chart:
        lines += ["", f"![ours against the peer, per row, with the goals]({chart.relative_to(REPO).as_posix()})"]
    for bench in benches:
        lines += ["", f"## {bench.what} (tools/{bench.script}, {bench.seconds:.0f} s, {bench.status})", ""]
        if bench.output:
            lines += [bench.output.replace("\n## ", "\n### ").removeprefix("## ")]
    return "\n".join(lines) + "\n"


def plot(benches: list[Bench], path: Path) -> Path | None:
    """Horizontal bars: how many times better ours is than the peer (log scale), each with its goal marked."""
    rows = [r for b in benches for r in b.rows if r.get("peer") is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 0.4 * len(rows) + 1.4), dpi=110)
    ys = range(len(rows))
    adv = [advantage(r) for r in rows]
    ax.barh(ys, adv, color=["tab:green" if met(r) else "tab:red" for r in rows])
    for y, r in zip(ys, rows):
        g, _, official = goal(r)
        g = g if r["better"] == "higher" else 1 / g  # the bars show advantage, so a "<= 0.5x" goal sits at 2x
        ax.plot([g, g], [y - 0.45, y + 0.45], color="black", linewidth=2 if official else 1,
                linestyle="-" if official else ":")
    ax.axvline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(list(ys), [r["name"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("times better than the peer, log scale (speed: ours/peer; time, memory: peer/ours)", fontsize=8)
    ax.set_title("qlora-kit vs peer (> 1: ours better). Black: goal set by the project; dotted: parity", fontsize=9)
    for y, a in zip(ys, adv):
        ax.text(a, y, f" {a:.2f}x", va="center", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="the big sizes (quick ones by default)")
    p.add_argument("--gpu", action="store_true",
                   help="the CUDA benchmarks instead (7B/70B training, decode, GPU-marked tests)")
    p.add_argument("--big-checkpoint", type=Path, metavar="DIR",
                   help="also load this checkpoint, one bigger than RAM in bf16 (e.g. make_checkpoint.py llama-13b)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "qlora-bench",
                   help="generated checkpoints, data and adapters (reused across runs)")
    p.add_argument("--only", action="append", metavar="SCRIPT", help="run only these scripts (e.g. bench_train.py)")
    p.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    p.add_argument("--chart", type=Path, default=REPO / "docs" / "benchmarks.png")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    load_start = os.getloadavg()
    revision = benchlib.repo_revision()  # before this run rewrites the chart, which would read as "-dirty"
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            print("--gpu: no CUDA device here; nothing run, BENCHMARKS.md left as it is (run without --gpu)")
            return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    benches = gpu_benches(args.workdir) if args.gpu else cpu_benches(args.workdir)
    if args.big_checkpoint:
        big = ["--model", str(args.big_checkpoint)]
        benches.append(Bench("load a checkpoint bigger than RAM in bf16", "bench_load.py", big, big))
    benches = [b for b in benches if not args.only or b.script in args.only]
    for bench in benches:
        run_bench(bench, args.full, args.workdir)
    chart = plot(benches, args.chart)
    args.out.write_text(report(benches, argv, load_start, args.gpu, chart, revision))
    print(f"\nwrote {args.out}" + (f" and {chart}" if chart else ""))
    return 0 if all(b.status == "ok" or b.status.startswith("ok: ") for b in benches) else 1


if __name__ == "__main__":
    sys.exit(main())
