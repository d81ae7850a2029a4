"""Benchmark `qlora-kit serve`: K concurrent clients over M adapters, against the same requests one at a time and
against a peft `set_adapter` serving loop, side by side in one run on localhost with the official openai client.

    python tools/bench_serve.py
    python tools/bench_serve.py --clients 16 --adapter-counts 1 4 16 --requests-per-client 2 --new-tokens 32 \\
        --repeats 3 --json /tmp/serve.json

For each adapter count M (--adapter-counts):
  ours-concurrent  a `qlora-kit serve` process (--max-batch K, --max-adapters M); K client threads, each with its own
                   openai.OpenAI client, send their requests back to back; the requests cycle over the M adapters
  ours-serial      the same server and requests, one at a time in the same order, so the adapter changes between
                   consecutive requests: serving with no batching
  peft-switch      a child process: transformers + bitsandbytes NF4 base (double quant, bf16 compute), a PeftModel
                   holding the M adapters; per request model.set_adapter(name), then model.generate with the KV
                   cache on, one request at a time -- what a peft user's serving loop does. It runs in-process, with
                   no HTTP in front of it, which only flatters it
Every request is an Alpaca prompt, greedy, exactly --new-tokens new tokens (ignore_eos / min_new_tokens).
tokens/s: all new tokens over the wall time from the first request sent to the last one answered. latency: per
request, sent to answered (concurrent: includes waiting for a batch row; serial and peft: the request alone).
memory, measured alike on both sides: the serving process's resident memory (/proc/PID/status) once its model and
adapters are loaded, before the first request (VmRSS), and its peak over the whole process (VmHWM) after its runs,
beside the adapters' file bytes. The peft child reads its prompts from a JSON file this process writes, so it builds
no workspace and renders no prompt (no tokenizer builder, no qlora_kit import): its RSS is its serving loop's, as
ours is the `qlora-kit serve` process's. Contenders alternate, --repeats times each after one untimed warm-up
request per adapter; medians are reported. The model and adapters are
tools/bench_multi_adapter.py's (random weights, r=--rank on every linear layer).
"""

import argparse
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]

import bench_multi_adapter  # noqa: E402  (adapters, requests and the peft model, shared)
import bench_train  # noqa: E402
import benchlib  # noqa: E402

START_S = 600  # a server that has not answered after this long failed to start
REQUEST_S = 600  # no request may take longer than this


def workspace(args):
    """(model dir, {name: adapter dir} for the largest count, words): generated once under --workdir."""
    shape, name = bench_train.small_shape(args.hidden, args.layers, args.heads, args.intermediate, args.vocab)
    args.workdir.mkdir(parents=True, exist_ok=True)
    model_dir, words = bench_train.generated_model(args.workdir, shape, name)
    adapters = bench_multi_adapter.make_adapters(model_dir, args.workdir / f"{name}-adapters",
                                                 max(args.adapter_counts), args.rank)
    return model_dir, adapters, words


def requests_for(words, names: list[str], total: int, seed: int):
    """`total` requests cycling over `names` (so any K consecutive ones mix adapters), prompts of varied length."""
    per = -(-total // len(names))
    pool = bench_multi_adapter.make_requests(words, names, per, seed)
    by_name = {n: [r for r in pool if r.adapter == n] for n in names}
    return [by_name[names[i % len(names)]][i // len(names)] for i in range(total)]


def percentile(values: list[float], q: float) -> float:
    """Nearest rank, as `qlora-kit traces` reports it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def threads_env(threads: int) -> dict[str, str]:
    """The same torch thread count for both serving processes (0: torch's default)."""
    return {"OMP_NUM_THREADS": str(threads)} if threads else {}


# ---- ours: a real server process, real HTTP ------------------------------------------------------------------

class ServeProcess:
    def __init__(self, model_dir: Path, adapters: dict[str, Path], max_batch: int, threads: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "qlora_kit.cli", "serve", str(model_dir), "--port", str(self.port),
               "--max-batch", str(max_batch), "--max-adapters", str(len(adapters))]
        cmd += [f"--adapter={n}={d}" for n, d in adapters.items()]
        env = {**os.environ, "PYTHONPATH": str(REPO), **threads_env(threads)}
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._wait_ready()

    def _wait_ready(self) -> None:
        import openai

        client = openai.OpenAI(base_url=self.url, api_key="none", max_retries=0, timeout=10)
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"qlora-kit serve exited {self.proc.returncode}: {self.proc.stderr.read()[-2000:]}")
            try:
                client.models.list()
                return
            except openai.APIConnectionError:
                time.sleep(0.2)
        self.stop()
        raise SystemExit(f"qlora-kit serve did not answer within {START_S} s")

    def rss_gib(self, key: str) -> float:
        return benchlib.status_gib(key, self.proc.pid)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _client(url: str):
    import openai

    return openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=REQUEST_S)


def _send(client, req, new_tokens: int) -> tuple[float, str]:
    start = time.perf_counter()
    r = client.completions.create(model=req.adapter, prompt=req.prompt, max_tokens=new_tokens, temperature=0,
                                  extra_body={"ignore_eos": True})
    return time.perf_counter() - start, r.choices[0].text


def run_concurrent(url: str, requests, clients: int, new_tokens: int) -> dict:
    """K threads, thread k sending requests k, k+K, k+2K, ... back to back."""
    lanes = [requests[k::clients] for k in range(clients)]
    latencies: list[float] = []
    lock = threading.Lock()

    def lane(reqs):
        client = _client(url)
        for req in reqs:
            took, _ = _send(client, req, new_tokens)
            with lock:
                latencies.append(took)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lane, lanes))
    return {"seconds": time.perf_counter() - start, "latencies": latencies}


def run_serial(url: str, requests, new_tokens: int) -> dict:
    client = _client(url)
    start = time.perf_counter()
    latencies = [_send(client, req, new_tokens)[0] for req in requests]
    return {"seconds": time.perf_counter() - start, "latencies": latencies}


def measure_ours(args, model_dir, adapters, requests) -> dict:
    server = ServeProcess(model_dir, adapters, args.clients, args.threads)
    try:
        loaded = server.rss_gib("VmRSS")
        warm = _client(server.url)
        for name in adapters:  # first-call costs (kernel selection, allocator growth) stay out of the timings
            _send(warm, next(r for r in requests if r.adapter == name), args.new_tokens)
        runs = {"ours-concurrent": [], "ours-serial": []}
        for _ in range(args.repeats):
            runs["ours-concurrent"].append(run_concurrent(server.url, requests, args.clients, args.new_tokens))
            runs["ours-serial"].append(run_serial(server.url, requests, args.new_tokens))
        runs.update(rss_loaded_gib=loaded, rss_gib=server.rss_gib("VmHWM"))
        return runs
    finally:
        server.stop()


# ---- the peer: peft's set_adapter loop, in a child process --------------------------------------------------

def run_peft_child(args) -> None:
    import torch

    plan = json.loads(args.child_plan.read_text())
    adapters = {name: Path(d) for name, d in plan["adapters"].items()}
    requests = [PlannedRequest(*r) for r in plan["requests"]]
    model, tokenizer = bench_multi_adapter.load_peft(Path(plan["model_dir"]), adapters, "cpu")
    model.generation_config.min_new_tokens = args.new_tokens  # every request exactly --new-tokens, eos or not
    loaded = benchlib.status_gib("VmRSS")

    def serve_one(req) -> float:
        start = time.perf_counter()
        model.set_adapter(req.adapter)
        enc = tokenizer([req.prompt], return_tensors="pt")
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=args.new_tokens, do_sample=False, use_cache=True,
                           pad_token_id=tokenizer.pad_token_id)
        return time.perf_counter() - start

    for name in adapters:
        serve_one(next(r for r in requests if r.adapter == name))
    runs = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        latencies = [serve_one(r) for r in requests]
        runs.append({"seconds": time.perf_counter() - start, "latencies": latencies})
    rss = benchlib.status_gib("VmHWM")
    print(benchlib.RESULT_MARK + json.dumps({"runs": runs, "rss_loaded_gib": loaded, "rss_gib": rss}), flush=True)


class PlannedRequest(NamedTuple):
    """A request as the peft child reads it from its plan: no harness import needed to rebuild it."""

    adapter: str
    prompt: str


def measure_peft(args, model_dir: Path, adapters: dict[str, Path], requests) -> dict:
    plan = {"model_dir": str(model_dir), "adapters": {n: str(d) for n, d in adapters.items()},
            "requests": [[r.adapter, r.prompt] for r in requests]}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "plan.json"
        path.write_text(json.dumps(plan))
        argv = [str(Path(__file__).resolve()), *args.argv, "--child", "peft", "--child-plan", str(path)]
        return benchlib.spawn(argv, threads_env(args.threads))


# ---- parent --------------------------------------------------------------------------------------------------

def summary(runs: list[dict], tokens: int) -> dict:
    seconds = statistics.median(r["seconds"] for r in runs)
    latencies = [x for r in runs for x in r["latencies"]]
    return {"tokens_per_s": tokens / seconds, "seconds": seconds, "p50_s": percentile(latencies, 50),
            "p95_s": percentile(latencies, 95)}


def adapter_bytes(adapters: dict[str, Path]) -> int:
    return sum((d / "adapter_model.safetensors").stat().st_size for d in adapters.values())


def table(results: dict[int, dict], clients: int) -> str:
    rows = ["| adapters | contender | tokens/s | seconds | latency p50 s | p95 s | concurrent vs this | "
            "RSS loaded GiB | peak RSS GiB | adapters' size MiB |", "|---:|---|" + "---:|" * 8]
    for count, res in results.items():
        best = res["ours-concurrent"]["tokens_per_s"]
        for name in ("ours-concurrent", "ours-serial", "peft-switch"):
            s = res.get(name)
            if s is None:
                rows.append(f"| {count} | {name} | - | - | - | - | - | - | - | - |")
                continue
            side = "peft" if name == "peft-switch" else "ours"
            rss, loaded = res[f"rss_{side}"], res[f"rss_loaded_{side}"]
            label = f"{name} ({clients} clients)" if name == "ours-concurrent" else name
            rows.append(f"| {count} | {label} | {s['tokens_per_s']:,.1f} | {s['seconds']:.2f} | {s['p50_s']:.3f} | "
                        f"{s['p95_s']:.3f} | {best / s['tokens_per_s']:.2f}x | {loaded:.3f} | {rss:.3f} | "
                        f"{res['adapter_mib']:.1f} |")
    return "\n".join(rows)


def json_rows(results: dict[int, dict], clients: int, command: str) -> list[dict]:
    out = []
    for count, res in results.items():
        ours = res["ours-concurrent"]["tokens_per_s"]
        for peer, label in (("ours-serial", "one at a time, adapter switched per request"),
                            ("peft-switch", "peft set_adapter loop")):
            if peer in res:
                theirs = res[peer]["tokens_per_s"]
                out.append({"name": f"serve tokens/s, {clients} clients over {count} adapters (vs {label})",
                            "ours": ours, "peer": theirs, "unit": "tokens/s", "better": "higher",
                            "ratio": ours / theirs, "command": command})
        if "rss_peft" in res:
            out.append({"name": f"serve peak RSS, {count} adapters (vs peft set_adapter loop)",
                        "ours": res["rss_ours"], "peer": res["rss_peft"], "unit": "GiB", "better": "lower",
                        "ratio": res["rss_ours"] / res["rss_peft"], "command": command})
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "qlora-bench-train",
                   help="the workspace shared with tools/bench_train.py (model, tokenizer, adapters)")
    bench_train.add_shape_args(p)
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (and the server's --max-batch)")
    p.add_argument("--adapter-counts", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads in both serving processes (0: torch's default)")
    p.add_argument("--no-peft", action="store_true", help="only ours (e.g. without bitsandbytes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the ratio rows (for tools/bench.py) here")
    p.add_argument("--child", choices=("peft",), help=argparse.SUPPRESS)
    p.add_argument("--child-plan", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.child:
        run_peft_child(args)
        return 0
    command = "python tools/bench_serve.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load_start = os.getloadavg()
    model_dir, all_adapters, words = workspace(args)
    total = args.clients * args.requests_per_client
    tokens = total * args.new_tokens
    results: dict[int, dict] = {}
    for count in args.adapter_counts:
        adapters = dict(list(all_adapters.items())[:count])
        requests = requests_for(words, list(adapters), total, args.seed)
        ours = measure_ours(args, model_dir, adapters, requests)
        res = {name: summary(ours[name], tokens) for name in ("ours-concurrent", "ours-serial")}
        res.update(rss_ours=ours["rss_gib"], rss_loaded_ours=ours["rss_loaded_gib"],
                   adapter_mib=adapter_bytes(adapters) / 2**20)
        if not args.no_peft:
            peft = measure_peft(args, model_dir, adapters, requests)
            if "error" in peft:
                print(f"peft-switch with {count} adapters failed: {peft['error']}", file=sys.stderr)
            else:
                res.update({"peft-switch": summary(peft["runs"], tokens), "rss_peft": peft["rss_gib"],
                            "rss_loaded_peft": peft["rss_loaded_gib"]})
        results[count] = res
        print(f"{count} adapters: {json.dumps({k: v for k, v in res.items()}, default=str)}", file=sys.stderr)
    print(f"## Serving {total} requests ({args.clients} clients x {args.requests_per_client}) over 1-"
          f"{max(args.adapter_counts)} LoRA adapters (r={args.rank}) on one NF4 base, {args.new_tokens} new tokens "
          f"each, cpu\n\nmodel {model_dir} ({args.hidden} hidden, {args.layers} layers, vocab {args.vocab}); "
          f"median of {args.repeats} timed run(s) after one warm-up request per adapter\n")
    print(table(results, args.clients))
    print("\nRSS loaded: the serving process's VmRSS with the model and adapters loaded, before the first request; "
          "peak RSS: its VmHWM after all its runs (ours: the `qlora-kit serve` process, HTTP stack included, one "
          "process for both of ours' rows; peft: its child, no HTTP, no harness).\nadapters' size: their "
          "safetensors files (fp32), what holding them costs at least.")
    print(f"\ncommand: {command}\n{bench_train.environment_line('cpu')}\nload average at the start "
          f"{', '.join(f'{x:.2f}' for x in load_start)}, at the end {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps(json_rows(results, args.clients, command), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
