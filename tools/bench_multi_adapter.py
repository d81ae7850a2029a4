"""Benchmark serving several LoRA adapters on one 4-bit base: one batched generate against switching per request.

32 requests (--adapters 4 x --prompts 8, in mixed order), each naming its adapter, all greedy, every one forced to
--new-tokens new tokens (min_new_tokens = max_new_tokens), so every contender generates the same number of tokens.
Contenders run in this one process, alternating, --repeats times each; the table gives medians. tokens/s is new
tokens over the wall time of serving all requests, prompts (prefill) included.

    python tools/bench_multi_adapter.py
    python tools/bench_multi_adapter.py --adapters 8 --prompts 8 --new-tokens 32 --repeats 3 --json /tmp/multi.json

Contenders (CPU unless --device cuda; NF4 + double quant, bf16 compute):
  ours-batched  qlora_kit.generate.generate(model, tokenizer, requests): every request in one left-padded batch,
                row i with its own adapter (per_row_adapters)
  ours-switch   for each request: qlora_kit.adapters.set_active_adapter(model, name); model.generate(one prompt)
  peft-switch   transformers + bitsandbytes base, PeftModel with every adapter loaded; for each request:
                model.set_adapter(name); model.generate(one prompt)   (what peft users do with set_adapter)
  peft-batched  the same model; model.generate(all prompts, adapter_names=[...])   (peft's mixed-adapter batch)

The model and tokenizer are tools/bench_train.py's generated workspace model (random weights, word-level tokenizer);
the adapters are random (A and B non-zero, r=--rank on every linear layer), written in the PEFT format by qlora_kit.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]

import bench_train  # noqa: E402  (the shared workspace: random-weight model + word-level tokenizer)

CONTENDERS = ("ours-batched", "ours-switch", "peft-switch", "peft-batched")
PROMPT_WORDS = (8, 48)  # instruction words per prompt, uniform: prompts of different lengths pad in a batch
ROWS = (  # (row name, peer contender) for tools/bench.py; ours is always ours-batched
    ("vs peft set_adapter per request", "peft-switch"),
    ("vs ours with set_active_adapter per request", "ours-switch"),
    ("vs peft's mixed-adapter batch, adapter_names", "peft-batched"),
)


def make_adapters(model_dir: Path, out: Path, count: int, rank: int) -> dict[str, Path]:
    """`count` random PEFT adapters (a0, a1, ...) for the base, written with qlora_kit's own save_adapter."""
    import torch

    from qlora_kit import LoraConfig, load_quantized
    from qlora_kit.adapters import save_adapter
    from qlora_kit.lora import lora_parameters

    names = {f"a{i}": out / f"r{rank}-a{i}" for i in range(count)}
    if all(d.is_dir() for d in names.values()):
        return names
    lora = LoraConfig(r=rank, alpha=2.0 * rank)
    model = load_quantized(model_dir, lora=lora)
    for i, adapter_dir in enumerate(names.values()):
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():  # A as LoRA initialises it (scaled by fan-in), B non-zero: each adapter changes the base
            for key, p in lora_parameters(model).items():
                p.normal_(0, p.shape[1] ** -0.5 if ".lora_A." in key else 0.02, generator=gen)
        save_adapter(model, adapter_dir, lora, str(model_dir.resolve()))
    return names


def make_requests(words: list[str], adapters: list[str], prompts: int, seed: int):
    """Each adapter gets its own `prompts` alpaca prompts; the requests arrive in a shuffled order."""
    import numpy as np

    from qlora_kit.data import alpaca_prompt
    from qlora_kit.generate import Request

    rng = np.random.default_rng(seed)
    requests = []
    for name in adapters:
        for _ in range(prompts):
            instruction = " ".join(rng.choice(words, int(rng.integers(*PROMPT_WORDS))))
            requests.append(Request(alpaca_prompt(instruction), name, chat=False))
    return [requests[i] for i in rng.permutation(len(requests))]


# ---- contenders: each serves every request and returns the completions ---------------------------------------

def ours_batched(model, tokenizer, requests, new_tokens):
    from qlora_kit.generate import generate

    return generate(model, tokenizer, requests, max_new_tokens=new_tokens)


def one_at_a_time(model, tokenizer, requests, new_tokens, switch):
    """Every request alone, after `switch(adapter name)`; prompts encoded as qlora_kit.generate encodes them."""
    import torch

    out = []
    with torch.no_grad():
        for r in requests:
            switch(r.adapter)
            enc = tokenizer([r.prompt], return_tensors="pt").to(model.device)
            ids = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            out.append(tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def peft_batched(model, tokenizer, requests, new_tokens):
    import torch

    tokenizer.padding_side = "left"
    enc = tokenizer([r.prompt for r in requests], return_tensors="pt", padding=True).to(model.device)
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             adapter_names=[r.adapter for r in requests])
    return [tokenizer.decode(row, skip_special_tokens=True) for row in ids[:, enc["input_ids"].shape[1]:]]


def load_ours(model_dir: Path, adapters: dict[str, Path], device: str):
    from qlora_kit.generate import load_model

    model, tokenizer = load_model(model_dir, adapters, device=device)
    return model, tokenizer


def load_peft(model_dir: Path, adapters: dict[str, Path], device: str):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch.bfloat16,
                                                device_map=device)
    (first, first_dir), *rest = adapters.items()
    model = PeftModel.from_pretrained(base, first_dir, adapter_name=first)
    for name, adapter_dir in rest:
        model.load_adapter(adapter_dir, adapter_name=name)
    return model.eval(), AutoTokenizer.from_pretrained(model_dir)


def contender_fn(name: str, models: dict):
    from qlora_kit.adapters import set_active_adapter

    if name == "ours-batched":
        return lambda reqs, n: ours_batched(*models["ours"], reqs, n)
    if name == "ours-switch":
        model, tok = models["ours"]
        return lambda reqs, n: one_at_a_time(model, tok, reqs, n, lambda a: set_active_adapter(model, a))
    if name == "peft-switch":
        model, tok = models["peft"]
        return lambda reqs, n: one_at_a_time(model, tok, reqs, n, model.set_adapter)
    return lambda reqs, n: peft_batched(*models["peft"], reqs, n)


# ---- parent ----------------------------------------------------------------------------------------------------

def table(times: dict[str, list[float]], tokens: int, agree: dict[str, float]) -> str:
    rows = ["| contender | runs | seconds | tokens/s | ours-batched vs this | completions equal to ours-switch |",
            "|---|---|---:|---:|---:|---:|"]
    best = statistics.median(times["ours-batched"]) if "ours-batched" in times else None
    for name, ts in times.items():
        med = statistics.median(ts)
        spread = f" ({min(ts):.2f}-{max(ts):.2f})" if len(ts) > 1 else ""
        ratio = f"{med / best:.2f}x" if best else "-"
        same = f"{agree[name]:.0%}" if name in agree else "-"
        rows.append(f"| {name} | {len(ts)} | {med:.2f}{spread} | {tokens / med:,.1f} | {ratio} | {same} |")
    return "\n".join(rows)


def json_rows(times: dict[str, list[float]], tokens: int, device: str, command: str) -> list[dict]:
    if "ours-batched" not in times:
        return []
    ours = tokens / statistics.median(times["ours-batched"])
    return [{"name": f"multi-adapter generate tokens/s, {device} ({label})", "ours": ours,
             "peer": tokens / statistics.median(times[peer]), "unit": "tokens/s", "better": "higher",
             "ratio": ours / (tokens / statistics.median(times[peer])), "command": command}
            for label, peer in ROWS if peer in times]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "qlora-bench-train",
                   help="the workspace shared with tools/bench_train.py (model, tokenizer, adapters)")
    bench_train.add_shape_args(p)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--prompts", type=int, default=8, help="prompts per adapter")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--only", choices=CONTENDERS, action="append", help="run only these contenders")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the ratio rows (for tools/bench.py) here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python tools/bench_multi_adapter.py " + " ".join(argv if argv is not None else sys.argv[1:])
    shape, name = bench_train.small_shape(args.hidden, args.layers, args.heads, args.intermediate, args.vocab)
    args.workdir.mkdir(parents=True, exist_ok=True)
    model_dir, words = bench_train.generated_model(args.workdir, shape, name)
    adapters = make_adapters(model_dir, args.workdir / f"{name}-adapters", args.adapters, args.rank)
    requests = make_requests(words, list(adapters), args.prompts, args.seed)
    contenders = args.only or list(CONTENDERS)
    models = {}
    if any(c.startswith("ours") for c in contenders):
        models["ours"] = load_ours(model_dir, adapters, args.device)
    if any(c.startswith("peft") for c in contenders):
        models["peft"] = load_peft(model_dir, adapters, args.device)
    for model, _ in models.values():  # every request generates exactly --new-tokens tokens, eos or not
        model.generation_config.min_new_tokens = args.new_tokens
    fns = {c: contender_fn(c, models) for c in contenders}
    times, outputs = {c: [] for c in contenders}, {}
    for c in contenders:  # one untimed pass each: first-call costs (kernel selection, weight repacking) stay out
        outputs[c] = fns[c](requests, args.new_tokens)
    for _ in range(args.repeats):
        for c in contenders:
            start = time.perf_counter()
            fns[c](requests, args.new_tokens)
            times[c].append(time.perf_counter() - start)
    reference = outputs.get("ours-switch")
    agree = {c: sum(a == b for a, b in zip(out, reference)) / len(reference) for c, out in outputs.items()} \
        if reference else {}
    tokens = len(requests) * args.new_tokens
    print(f"## Serving {len(requests)} requests over {args.adapters} LoRA adapters (r={args.rank}) on one NF4 base, "
          f"{args.new_tokens} new tokens each, {args.device}\n\nmodel {model_dir} ({args.hidden} hidden, {args.layers} "
          f"layers, vocab {args.vocab}); median (min-max) of {args.repeats} timed run(s) after one untimed run\n")
    print(table(times, tokens, agree))
    print("\ncompletions equal: greedy completions identical to serving each request alone with ours (random weights "
          "make near-ties common,\nso bf16 rounding differences between batch shapes can flip a token).")
    print(f"\ncommand: {command}\n{bench_train.environment_line(args.device)}")
    if args.json:
        args.json.write_text(json.dumps(json_rows(times, tokens, args.device, command), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
