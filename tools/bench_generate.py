"""Benchmark generation (decode) speed with LoRA adapters active: qlora_kit against transformers + bitsandbytes 4-bit
+ peft at its best, and against the dense bf16 model, side by side in one run.

For each model shape (random weights of that shape, tools/make_checkpoint.py, with a word-level tokenizer of its
vocabulary) every contender generates --new-tokens tokens greedily (min_new_tokens = max_new_tokens, KV cache on)
from the same --prompt-tokens-token prompts, at batch 1 (one adapter) and at --batch (rows alternating between two
adapters: per-row adapters). tokens/s = batch x new tokens / wall time of model.generate, prefill included; median
of --repeats timed calls after one untimed call (first-call costs -- bitsandbytes' weight repacking, kernel
selection -- stay out). All contenders of a shape are loaded in one process and alternate call by call.

    python tools/bench_generate.py                                 # SmolLM2-135M and Llama-3.2-1B shapes, CPU
    python tools/bench_generate.py --models smollm2-135m --repeats 5 --json /tmp/gen.json
    python tools/bench_generate.py --device cuda --models llama-1b llama-7b

Contenders (NF4 + double quant, bf16 compute, two random r=--rank adapters on every linear layer):
  ours   qlora_kit.generate.load_model(dir, adapters); batch 1: set_active_adapter; batch N: per_row_adapters.
         Decode steps take the 4-bit kernel that never builds W (CPU: csrc/gemv4.c; CUDA: bitsandbytes gemv_4bit).
  peer   AutoModelForCausalLM.from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double quant, bf16
         compute)) + PeftModel with both adapters, eval(): on an AVX512-BF16 CPU bitsandbytes repacks every weight
         for its fused CPU kernel (bf16 absmax), its fastest path; batch 1: set_adapter; batch N: adapter_names.
  dense  AutoModelForCausalLM.from_pretrained(dtype=bfloat16), no adapters: as fast as a dense model with an
         adapter merged in gets (the strictest dense baseline; it cannot serve two adapters in one batch).
"""

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]

import bench_multi_adapter  # noqa: E402  (random PEFT adapters)
import bench_train  # noqa: E402  (the workspace: random-weight checkpoint + word-level tokenizer)

CONTENDERS = ("ours", "peer", "dense")
MODELS = ("smollm2-135m", "llama-1b")
GOALS = {"peer": 1.5, "dense": 1.0}  # ours/contender tokens/s, from the issue


def load(name: str, model_dir: Path, adapters: dict[str, Path], device: str):
    import torch
    from transformers import AutoModelForCausalLM

    if name == "ours":
        from qlora_kit.generate import load_model

        return load_model(model_dir, adapters, device=device)[0]
    if name == "peer":
        return bench_multi_adapter.load_peft(model_dir, adapters, device)[0]
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map=device).eval()


def generate_fn(name: str, model, names: list[str], new_tokens: int):
    """A call that generates from `ids` with row i under adapter names[i] (the dense model has none)."""
    import torch

    from qlora_kit.adapters import per_row_adapters, set_active_adapter

    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                  pad_token_id=0)

    @torch.no_grad()
    def call(ids):
        mask = torch.ones_like(ids)
        if name == "dense":
            return model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        if name == "peer":
            if len(names) == 1:
                model.set_adapter(names[0])
                return model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            return model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **kwargs)
        if len(names) == 1:
            set_active_adapter(model, names[0])
            return model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        with per_row_adapters(model, names):
            return model.generate(input_ids=ids, attention_mask=mask, **kwargs)

    return call


def bench_model(args, preset: str) -> dict:
    """{(batch, contender): [tokens/s per timed call]} for one model shape, plus greedy agreement with ours."""
    import torch

    import make_checkpoint

    model_dir, _ = bench_train.generated_model(args.workdir, make_checkpoint.PRESETS[preset], preset)
    adapters = bench_multi_adapter.make_adapters(model_dir, args.workdir / f"{preset}-adapters", 2, args.rank)
    names = list(adapters)
    gen = torch.Generator().manual_seed(args.seed)
    vocab = make_checkpoint.PRESETS[preset].vocab
    results, outputs = {}, {}
    contenders = args.only or list(CONTENDERS)
    models = {c: load(c, model_dir, adapters, args.device) for c in contenders}
    for batch in (1, args.batch):
        ids = torch.randint(4, vocab, (batch, args.prompt_tokens), generator=gen).to(args.device)
        rows = [names[0]] if batch == 1 else [names[i % 2] for i in range(batch)]
        calls = {c: generate_fn(c, models[c], rows, args.new_tokens) for c in contenders}
        for c, call in calls.items():
            outputs[(batch, c)] = call(ids)[:, args.prompt_tokens:]
            results[(batch, c)] = []
        for _ in range(args.repeats):
            for c, call in calls.items():
                if args.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                call(ids)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                results[(batch, c)].append(batch * args.new_tokens / (time.perf_counter() - start))
    agree = {key: float((out == outputs[(key[0], "ours")]).float().mean()) for key, out in outputs.items()
             if (key[0], "ours") in outputs}
    del models
    gc.collect()
    return {"results": results, "agree": agree, "model_dir": str(model_dir)}


def table(preset: str, res: dict) -> str:
    rows = [f"### {preset}", "", "| batch | contender | tokens/s | ours / this | greedy tokens equal to ours |",
            "|---:|---|---:|---:|---:|"]
    for (batch, c), speeds in res["results"].items():
        med = statistics.median(speeds)
        ours = res["results"].get((batch, "ours"))
        ratio = f"{statistics.median(ours) / med:.2f}x" if ours else "-"
        spread = f" ({min(speeds):,.1f}-{max(speeds):,.1f})" if len(speeds) > 1 else ""
        rows.append(f"| {batch} | {c} | {med:,.1f}{spread} | {ratio} | {res['agree'].get((batch, c), 0):.0%} |")
    return "\n".join(rows)


def json_rows(preset: str, res: dict, device: str, command: str) -> list[dict]:
    out = []
    for (batch, c), speeds in res["results"].items():
        ours = res["results"].get((batch, "ours"))
        if c == "ours" or not ours:
            continue
        what = "transformers + bitsandbytes + peft" if c == "peer" else "dense bf16 model"
        o, p = statistics.median(ours), statistics.median(speeds)
        out.append({"name": f"generate tokens/s, {preset}, batch {batch}, {device} (vs {what})", "ours": o,
                    "peer": p, "unit": "tokens/s", "better": "higher", "ratio": o / p, "goal": GOALS[c],
                    "command": command})
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "qlora-bench-generate")
    p.add_argument("--models", nargs="+", default=list(MODELS), help="make_checkpoint presets")
    p.add_argument("--batch", type=int, default=8, help="the batch size besides 1 (rows alternate two adapters)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--only", choices=CONTENDERS, action="append", help="run only these contenders")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the ratio rows (for tools/bench.py) here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python tools/bench_generate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"## Generation, {args.new_tokens} new tokens greedy from {args.prompt_tokens}-token prompts, batch 1 and "
          f"{args.batch} (rows alternating two r={args.rank} adapters), {args.device}\n")
    print(f"median (min-max) tokens/s of {args.repeats} timed call(s) after one untimed call; prefill included\n")
    for preset in args.models:
        res = bench_model(args, preset)
        print(table(preset, res) + "\n", flush=True)
        rows += json_rows(preset, res, args.device, command)
    print("greedy tokens equal: share of generated tokens identical to ours' (random weights make near-ties common,"
          "\nso different accumulation orders can flip a token and the rest of the row with it).")
    print(f"\ncommand: {command}\n{bench_train.environment_line(args.device)}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
