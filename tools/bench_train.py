"""Benchmark QLoRA training throughput: qlora_kit's Trainer against a transformers + bitsandbytes + peft loop.

Every run is its own subprocess (a bare interpreter, its own peak memory); runs alternate ours, ours-nopack,
ours-padded, peer-packed, peer, ours, ... and the table gives medians over --repeats. Each run trains one epoch
over the same data; its first step is a warmup and is left out, so tokens/s is (real tokens of steps 2..N) /
(their wall time), model load excluded. Real tokens are non-padding tokens (prompt and response) that went
through the model.

    python tools/bench_train.py                          # CPU, a Llama-shaped random model, 128 synthetic rows
    python tools/bench_train.py --repeats 3 --rows 256 --json /tmp/train.json
    python tools/bench_train.py --device cuda --preset llama-7b --lora-r 64 --lora-alpha 16 --max-seq-len 1024
    python tools/bench_train.py --device cuda --preset llama-70b --no-weights --only ours --lora-r 16 --batch-size 1
    python tools/bench_train.py --nproc 2 --repeats 2 --threads 1   # scaling: ours on 1 process vs FSDP / DDP on 2

Contenders (same model, data, batch size, max length, LoRA r/alpha on all linear layers, optimizer, gradient
clipping 0.3, constant lr, bf16 autocast, fp32 LoRA weights, non-reentrant gradient checkpointing per block):
  ours         qlora_kit.train.Trainer(load_recipe({..., "packing": True}))  best-fit packing, attention per example
  ours-nopack  the same with packing off, as a user gets it: batches of examples in random order, like the plain
               peer's, each run as one padding-free row (the default `padding_free: true`)
  ours-padded  packing off and `padding_free: false`: each batch padded to its longest example, as the plain peer
  peer-packed  the peer at its best: padding-free, transformers' DataCollatorWithFlattening (each step's examples
               flattened into one row with position_ids restarting per example, so attention stays within each
               example), as many shuffled examples per step as fit batch size x max length tokens (ours' packed step)
  peer         AutoModelForCausalLM.from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double quant, bf16));
               prepare_model_for_kbit_training; gradient_checkpointing_enable(use_reentrant=False);
               get_peft_model(LoraConfig(target_modules="all-linear")); DataLoader(shuffle=True,
               collate_fn=DataCollatorForSeq2Seq) (pad to the longest row of the batch, labels -100 on the prompt);
               torch.autocast(bf16); loss.backward(); clip_grad_norm_; optimizer.step()
  ours-fsdp    with --nproc N: ours under `torchrun --nproc-per-node N`, distributed.strategy fsdp, the same
  ours-ddp     per-process batch (so N x the global batch: weak scaling), one epoch; tokens/s counts every rank's
               tokens over rank 0's wall time. torchrun gives each process OMP_NUM_THREADS=1; the 1-process run
               keeps torch's default threads unless --threads 1 is passed (do: on a loaded 2-core CPU its 2
               threads stall on cores other jobs hold, 158 tokens/s against 669 at 1 thread in BENCHMARKS.md).
Memory: peak RSS (ru_maxrss, the whole child: imports, load and training) on CPU; torch.cuda.max_memory_allocated
on CUDA; under torchrun each rank's (the scaling table lists them by rank; the ratio rows use rank 0's).

Without --model, a workspace is built once under --workdir: a Llama-shaped random-weight checkpoint
(tools/make_checkpoint.py; --preset, or the small shape of --hidden/--layers/...) with a word-level tokenizer of
exactly its vocabulary (one token per word, so lengths are exact), and alpaca rows whose lengths follow a wide
log-normal distribution up to --max-seq-len (nothing is truncated, so every contender trains the same tokens). With
--model DIR (and --data) that checkpoint, which needs a tokenizer, is used as it is. --no-weights writes only
config.json and the tokenizer; ours then builds the model on the device directly in 4 bits, layer by layer, from
random weights (for shapes whose bf16 checkpoint would not fit on disk: llama-70b is 138 GB); the peer loads only
from a checkpoint on disk and is skipped.
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib

REPO = Path(__file__).resolve().parents[1]
CONTENDERS = ("ours", "ours-nopack", "ours-padded", "peer-packed", "peer")
PEERS = ("peer-packed", "peer")  # the best-configured peer first: ratios are taken against the faster of the two
DISTRIBUTED = ("ours-fsdp", "ours-ddp")  # with --nproc N: ours on N processes under torchrun, batch per process
RESULT_MARK = "BENCH_RESULT "
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0-3: bos 1 and eos 2 are LlamaConfig's defaults
MAX_GRAD_NORM, LEARNING_RATE = 0.3, 2e-4
INSTRUCTION_WORDS, INPUT_WORDS, INPUT_SHARE = (3, 30), (3, 60), 0.4


# ---- workspace: tokenizer, random-weight model, data ---------------------------------------------------------

def prompt_template(has_input: bool) -> str:
    from qlora_kit.data import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT

    return ALPACA_PROMPT if has_input else ALPACA_PROMPT_NO_INPUT


def lexicon(n: int, reserved: set[str]) -> list[str]:
    """n distinct lowercase pseudo-words ('aaaa', 'aaab', ...), none of them a word of the prompt template."""
    words, i = [], 0
    while len(words) < n:
        word, k = "", i
        for _ in range(4):
            word, k = chr(97 + k % 26) + word, k // 26
        if word not in reserved:
            words.append(word)
        i += 1
    return words


def build_tokenizer(vocab_size: int):
    """A word-level fast tokenizer with exactly `vocab_size` ids that prepends <s>, as Llama's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()
    template = {w for t in (True, False) for w, _ in split.pre_tokenize_str(prompt_template(t).format(instruction="",
                                                                                                     input=""))}
    template = sorted(template)
    words = lexicon(vocab_size - len(SPECIALS) - len(template), set(template))
    vocab = {token: i for i, token in enumerate(SPECIALS + template + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = split
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>"), words


def make_rows(n: int, max_len: int, words: list[str], tokenizer, seed: int, lengths: str = "lognormal") -> list[dict]:
    """Alpaca rows whose token counts (with <s> and </s>) are log-normal, median max_len/3, capped at max_len; or
    with `lengths="uniform"` all max_len/3 (no padding in a padded batch: per-token speed alone)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    overhead = {t: len(tokenizer(prompt_template(t).format(instruction="", input=""))["input_ids"]) + 1
                for t in (True, False)}  # template, <s> and the </s> the trainer appends
    rows = []
    while len(rows) < n:
        has_input = bool(rng.random() < INPUT_SHARE)
        total = max_len // 3 if lengths == "uniform" else int(min(max_len, rng.lognormal(np.log(max_len / 3), 0.8)))
        n_instr = int(rng.integers(*INSTRUCTION_WORDS))
        n_input = int(rng.integers(*INPUT_WORDS)) if has_input else 0
        n_output = total - overhead[has_input] - n_instr - n_input
        if n_output < 1:
            continue
        text = lambda k: " ".join(rng.choice(words, k))  # noqa: E731
        rows.append({"instruction": text(n_instr), "input": text(n_input), "output": text(n_output)})
    return rows


def generated_model(work: Path, shape, name: str, weights: bool = True) -> tuple[Path, list[str]]:
    """work/name: a random-weight checkpoint of `shape` (or only its config.json, without `weights`) and the
    word-level tokenizer of its vocabulary, written once; returns the directory and the tokenizer's words."""
    import make_checkpoint

    model_dir = work / name
    tokenizer, words = build_tokenizer(shape.vocab)
    if not (model_dir / "tokenizer.json").is_file():
        config = make_checkpoint.build_config(shape)
        if weights:
            make_checkpoint.write_checkpoint(config, model_dir, force=True)
        else:
            config.architectures = ["LlamaForCausalLM"]
            config.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    return model_dir, words


def small_shape(hidden: int, layers: int, heads: int, intermediate: int, vocab: int):
    """(make_checkpoint Shape, directory name) of a small Llama: the CPU benchmarks' model."""
    import make_checkpoint

    shape = make_checkpoint.Shape("llama", hidden=hidden, layers=layers, heads=heads, kv_heads=heads,
                                  intermediate=intermediate, vocab=vocab)
    return shape, f"llama-h{hidden}-l{layers}-a{heads}-i{intermediate}-v{vocab}"


def prepare_workspace(args) -> tuple[Path, Path]:
    """(model dir, data file), built under --workdir unless they exist; --model / --data override each."""
    sys.path[:0] = [str(REPO), str(REPO / "tools")]
    import make_checkpoint

    args.workdir.mkdir(parents=True, exist_ok=True)
    words = None
    if args.model:
        model_dir = args.model
    else:
        shape, name = small_shape(args.hidden, args.layers, args.heads, args.intermediate, args.vocab)
        if args.preset:
            shape, name = make_checkpoint.PRESETS[args.preset], args.preset
        name += "-config-only" if args.no_weights else ""
        model_dir, words = generated_model(args.workdir, shape, name, weights=not args.no_weights)
    if args.data:
        return model_dir, args.data
    if words is None:
        raise SystemExit("--model needs --data: synthetic rows are written in the workspace tokenizer's words")
    data = args.workdir / f"rows-{args.rows}-len{args.max_seq_len}-{args.lengths}-{model_dir.name}-seed{args.seed}.jsonl"
    if not data.is_file():
        from transformers import AutoTokenizer

        rows = make_rows(args.rows, args.max_seq_len, words, AutoTokenizer.from_pretrained(model_dir), args.seed,
                         args.lengths)
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data


# ---- child: one training run in a fresh interpreter -----------------------------------------------------------

def _peak_memory_gib(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def build_random_4bit(model_dir: str, *, quant, lora, device, dtype, **_):
    """What load_quantized returns, built on `device` from random N(0, 0.02) weights one linear at a time, so the
    bf16 model never exists whole anywhere (peak: the 4-bit model plus one bf16 matrix)."""
    import torch

    from qlora_kit.loader import build_empty, quant_targets, read_config
    from qlora_kit.lora import QLinear, add_lora
    from qlora_kit.quant import QuantizedWeight

    model = build_empty(read_config(Path(model_dir)), dtype)
    gen = torch.Generator(device).manual_seed(0)
    for name in quant_targets(model):
        parent_name, _, child = name.rpartition(".")
        parent, meta = model.get_submodule(parent_name), model.get_submodule(name)
        w = torch.empty(meta.weight.shape, dtype=dtype, device=device).normal_(0, 0.02, generator=gen)
        setattr(parent, child, QLinear(QuantizedWeight.quantize(w, quant), compute_dtype=dtype))
        del w
    for module in model.modules():  # what is left: embeddings, norms, the head (bf16, as the loader keeps them)
        for key, p in module.named_parameters(recurse=False):
            value = torch.ones(p.shape, dtype=dtype, device=device) if p.dim() == 1 else \
                torch.empty(p.shape, dtype=dtype, device=device).normal_(0, 0.02, generator=gen)
            module._parameters[key] = torch.nn.Parameter(value, requires_grad=False)
    if getattr(model.config, "tie_word_embeddings", False):  # filled one by one above, so tie them again
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    model.to(device)  # buffers (rotary tables) were built real on the CPU
    model.requires_grad_(False)
    model.eval()
    add_lora(model, lora)
    model.qlora_quant = quant
    return model


def run_ours(args, packing: bool, strategy: str | None = None, padding_free: bool = True) -> dict:
    """One epoch through the product's Trainer; timing from its own metrics.jsonl (elapsed_s, tokens_seen).
    Under torchrun (`strategy`), every rank trains and rank 0's output directory and metrics are the ones read."""
    import torch

    from qlora_kit import train
    from qlora_kit.config import load_recipe
    from qlora_kit.metrics import read_metrics

    if args.no_weights:  # the Trainer as it is; only where the weights come from changes
        train.load_quantized = build_random_4bit
    out_dir = Path(args.workdir) / f"run-{os.environ.get('TORCHELASTIC_RUN_ID', os.getpid())}"
    with tempfile.TemporaryDirectory(prefix="bench-train-", dir=args.workdir) as tmp:
        out = str(out_dir) if strategy else tmp  # every rank must name the same directory
        recipe = load_recipe({
            "model": str(args.model), "dataset": {"path": str(args.data), "format": "alpaca"},
            "output_dir": out, "epochs": 1.0, "batch_size": args.batch_size, "max_seq_len": args.max_seq_len,
            "packing": packing, "padding_free": padding_free,
            "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": 0.0, "target_modules": "all-linear"},
            "optimizer": args.optimizer, "learning_rate": LEARNING_RATE, "lr_scheduler": "constant",
            "max_grad_norm": MAX_GRAD_NORM, "gradient_checkpointing": True, "compute_dtype": "bfloat16",
            "logging_steps": 1, "seed": args.seed, "distributed": {"strategy": strategy or "fsdp"},
        })
        trainer = train.Trainer(recipe, progress=False)
        slots, real = _epoch_slots(trainer.batches)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.run()
        if not trainer.dist.is_main:
            return {}
        steps = [r for r in read_metrics(Path(out)) if "tokens_seen" in r]
        if strategy:
            shutil.rmtree(out_dir, ignore_errors=True)  # past the run's last barrier: the other ranks are done
    first, last = steps[0], steps[-1]
    return {"tokens": last["tokens_seen"] - first["tokens_seen"], "seconds": last["elapsed_s"] - first["elapsed_s"],
            "steps": len(steps) - 1, "epoch_tokens": real, "epoch_slots": slots}


def _epoch_slots(batches) -> tuple[int, int]:
    """(row slots, real tokens) of one epoch of a BatchIterator, walked on a copy of its position and put back."""
    from qlora_kit.train import real_tokens

    state, it = batches.state_dict(), iter(batches)
    slots = real = 0
    for _ in range(len(batches)):
        b = next(it)
        slots, real = slots + b["input_ids"].numel(), real + real_tokens(b)
    batches.load_state_dict(state)
    return slots, real


def peer_dataset(tokenizer, path: Path, max_len: int) -> list[dict]:
    """alpaca-lora's generate_and_tokenize_prompt (train_on_inputs=False): ids of prompt + output + eos, labels
    -100 over the tokenized prompt."""
    data = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        prompt = prompt_template(bool(row["input"])).format_map(row)
        ids = tokenizer(prompt + row["output"])["input_ids"] + [tokenizer.eos_token_id]
        n_prompt = len(tokenizer(prompt)["input_ids"])
        if len(ids) > max_len:
            raise SystemExit(f"{path}: a row has {len(ids)} tokens > --max-seq-len {max_len}; the contenders would "
                             "truncate it differently")
        data.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                     "labels": [-100] * n_prompt + ids[n_prompt:]})
    return data


def flattened_batches(data: list[dict], token_budget: int, seed: int) -> list[list[dict]]:
    """The padding-free peer's steps: shuffled examples taken in order while their tokens fit `token_budget`
    (batch size x max length, the tokens a packed step of ours holds), each step flattened into one row by
    DataCollatorWithFlattening."""
    import torch

    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    steps, current, used = [], [], 0
    for i in order:
        n = len(data[i]["input_ids"])
        if current and used + n > token_budget:
            steps.append(current)
            current, used = [], 0
        current.append(data[i])
        used += n
    return steps + ([current] if current else [])


def run_peer(args, packed: bool = False) -> dict:
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from torch.utils.data import DataLoader
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForSeq2Seq,
                              DataCollatorWithFlattening)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map=args.device)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=LEARNING_RATE, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, **kwargs)
    else:  # bitsandbytes pages only on CUDA; elsewhere the same update unpaged, as qlora_kit.optim does
        cls = bnb.optim.PagedAdamW32bit if args.device == "cuda" else bnb.optim.AdamW32bit
        optimizer = cls(params, **kwargs)
    data = peer_dataset(tokenizer, args.data, args.max_seq_len)
    if packed:  # padding-free: one flattened row per step, position_ids restart per example, attention per example
        flatten = DataCollatorWithFlattening(return_position_ids=True)
        loader = [flatten([{k: v for k, v in ex.items() if k != "attention_mask"} for ex in step])
                  for step in flattened_batches(data, args.batch_size * args.max_seq_len, args.seed)]
    else:
        loader = DataLoader(data, batch_size=args.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(args.seed),
                            collate_fn=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    model.train()

    def step(batch) -> int:
        batch = {k: v.to(args.device) for k, v in batch.items()}
        with torch.autocast(args.device, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the loop logs its loss every step, as ours does
        return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    batches = iter(loader)
    first = next(batches)
    slots, real = first["input_ids"].numel(), step(first)
    tokens, steps, start = 0, 0, time.perf_counter()
    for batch in batches:
        n = step(batch)
        tokens, steps, slots, real = tokens + n, steps + 1, slots + batch["input_ids"].numel(), real + n
    if args.device == "cuda":
        torch.cuda.synchronize()
    return {"tokens": tokens, "seconds": time.perf_counter() - start, "steps": steps, "epoch_tokens": real,
            "epoch_slots": slots}


def run_child(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child in PEERS:
        result = run_peer(args, packed=args.child == "peer-packed")
    elif args.child in DISTRIBUTED:
        result = run_ours(args, packing=True, strategy=args.child.removeprefix("ours-"))
    else:
        result = run_ours(args, packing=args.child == "ours", padding_free=args.child != "ours-padded")
    # every rank reports its own peak (the other ranks only that); the parent reads them all from torchrun's stdout
    result.update(peak_gib=_peak_memory_gib(args.device), rank=int(os.environ.get("RANK", "0")))
    print(RESULT_MARK + json.dumps(result), flush=True)


# ---- parent: schedule children, summarize --------------------------------------------------------------------

def child_command(args, contender: str) -> list[str]:
    launch = [sys.executable]
    if contender in DISTRIBUTED:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}"]
    cmd = [*launch, __file__, "--child", contender, "--model", str(args.model), "--data", str(args.data),
           "--workdir", str(args.workdir), "--device", args.device, "--batch-size", str(args.batch_size),
           "--max-seq-len", str(args.max_seq_len), "--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha),
           "--optimizer", args.optimizer, "--seed", str(args.seed), "--threads", str(args.threads),
           "--lengths", args.lengths]
    return cmd + (["--no-weights"] if args.no_weights else [])


def measure(args, contender: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(child_command(args, contender), capture_output=True, text=True, env=env)
    ranks = [json.loads(line[len(RESULT_MARK):]) for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    result = next((r for r in ranks if r["rank"] == 0), None)
    if proc.returncode or result is None:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    peaks = [r["peak_gib"] for r in sorted(ranks, key=lambda r: r["rank"])]
    return {**result, "tokens_per_s": result["tokens"] / result["seconds"],
            **{f"peak_gib_rank{i}": g for i, g in enumerate(peaks)}}


def medians(results: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for contender, runs in results.items():
        ok = [r for r in runs if "error" not in r]
        if ok:
            out[contender] = {k: statistics.median(r[k] for r in ok) for k in ok[0]}
            out[contender]["runs"] = ok
    return out


def best_peer(med: dict[str, dict]) -> str | None:
    """The faster of the peers that ran: the peer at its best, which the goals are measured against."""
    ran = [p for p in PEERS if p in med]
    return max(ran, key=lambda p: med[p]["tokens_per_s"]) if ran else None


def table(results: dict[str, list[dict]], device: str) -> str:
    memory = "peak GPU memory GiB" if device == "cuda" else "peak RSS GiB"
    med = medians(results)
    best = best_peer(med)
    peer = med.get(best)
    rows = [f"| contender | runs | tokens/s | vs {best} | {memory} | vs {best} | timed steps | s/step | "
            "real tokens / row slots |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for contender, runs in results.items():
        m = med.get(contender)
        if m is None:
            rows.append(f"| {contender} | 0/{len(runs)} | failed: {runs[-1]['error']} |")
            continue
        spread = " (" + "-".join(f"{f(r['tokens_per_s'] for r in m['runs']):,.0f}" for f in (min, max)) + ")" \
            if len(m["runs"]) > 1 else ""
        speed = f"{m['tokens_per_s'] / peer['tokens_per_s']:.2f}x" if peer else "-"
        mem = f"{m['peak_gib'] / peer['peak_gib']:.2f}x" if peer else "-"
        rows.append(f"| {contender} | {len(m['runs'])}/{len(runs)} | {m['tokens_per_s']:,.0f}{spread} | {speed} | "
                    f"{m['peak_gib']:.3f} | {mem} | {m['steps']:.0f} | {m['seconds'] / m['steps']:.2f} | "
                    f"{m['epoch_tokens'] / m['epoch_slots']:.1%} |")
    return "\n".join(rows)


def scaling_table(results: dict[str, list[dict]], nproc: int, device: str) -> str:
    """tokens/s of ours on N processes against ours on one: N would be perfect scaling."""
    med = medians(results)
    one = med.get("ours")
    memory = "peak GPU memory GiB" if device == "cuda" else "peak RSS GiB"
    rows = [f"| contender | processes | runs | tokens/s (min-max) | vs 1 process | {memory} per rank |",
            "|---|---:|---|---:|---:|---:|"]
    for contender, runs in results.items():
        m = med.get(contender)
        n = 1 if contender == "ours" else nproc
        if m is None:
            rows.append(f"| {contender} | {n} | 0/{len(runs)} | failed: {runs[-1]['error']} |")
            continue
        ratio = f"{m['tokens_per_s'] / one['tokens_per_s']:.2f}x" if one else "-"
        spread = "-".join(f"{f(r['tokens_per_s'] for r in m['runs']):,.0f}" for f in (min, max))
        peaks = " / ".join(f"{m[f'peak_gib_rank{i}']:.3f}" for i in range(n) if f"peak_gib_rank{i}" in m)
        rows.append(f"| {contender} | {n} | {len(m['runs'])}/{len(runs)} | {m['tokens_per_s']:,.0f} ({spread}) | "
                    f"{ratio} | {peaks} |")
    return "\n".join(rows) + f"\n\nload average at the end: {_load()}"


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} CPUs"


def json_rows(results: dict[str, list[dict]], model: str, device: str, command: str, lengths: str) -> list[dict]:
    """Rows for tools/bench.py: ours (packing) and ours-nopack, speed and memory, against each peer that ran, the
    best-configured first (peer and ratio None when none ran)."""
    med = medians(results)
    memory = "peak GPU memory" if device == "cuda" else "peak RSS"
    peers = sorted((p for p in PEERS if p in med), key=lambda p: p != best_peer(med)) or [None]
    rows = []
    for contender, label in (("ours", "packing"), ("ours-nopack", "no packing")):
        m = med.get(contender)
        if m is None:
            continue
        for peer_name in peers:
            peer = med.get(peer_name)
            for what, key, unit, better in (("tokens/s", "tokens_per_s", "tokens/s", "higher"),
                                            (memory, "peak_gib", "GiB", "lower")):
                theirs = peer[key] if peer else None
                rows.append({"name": f"train {what}, {model}, {lengths} lengths, {device} ({label} vs {peer_name})",
                             "ours": m[key], "peer": theirs, "unit": unit, "better": better,
                             "ratio": m[key] / theirs if peer else None, "command": command})
    return rows


def data_line(data: Path, model_dir: Path, max_len: int) -> str:
    """Token counts of the rows, as qlora_kit tokenizes them (the peer's differ by nothing: same ids, same eos)."""
    from transformers import AutoTokenizer

    from qlora_kit.data import encode_row, load_rows

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lengths = sorted(len(encode_row(row, "alpaca", tokenizer)) for row in load_rows(str(data), "alpaca"))
    pick = lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))]  # noqa: E731
    return (f"data {data}: {len(lengths)} alpaca rows, tokens per row p10 {pick(0.1)}, median {pick(0.5)}, "
            f"p90 {pick(0.9)}, max {lengths[-1]} (of at most {max_len}), mean {sum(lengths) / len(lengths):.0f}")


def environment_line(device: str) -> str:
    gpu = ""
    if device == "cuda":
        import torch

        gpu = f"GPU: {torch.cuda.get_device_name()}; "
    return gpu + benchlib.environment_line(("torch", "transformers", "peft", "bitsandbytes", "accelerate"))


def add_shape_args(p: argparse.ArgumentParser) -> None:
    """The generated workspace model's shape, shared with tools/bench_multi_adapter.py."""
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1408,
                   help="a multiple of 64: bitsandbytes' CPU inference kernel fails on other widths (0.50)")
    p.add_argument("--vocab", type=int, default=8192)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "qlora-bench-train",
                   help="where the generated model, data and run outputs go")
    p.add_argument("--model", type=Path, help="an HF checkpoint with a tokenizer (default: generated)")
    p.add_argument("--data", type=Path, help="alpaca JSONL (default: generated for the generated model)")
    p.add_argument("--preset", help="a tools/make_checkpoint.py model shape (default: --hidden, --layers, ...)")
    p.add_argument("--no-weights", action="store_true",
                   help="write no weights: ours builds the model on the device in 4 bits (the peer is skipped)")
    add_shape_args(p)
    p.add_argument("--rows", type=int, default=128, help="synthetic rows: one epoch of them is timed")
    p.add_argument("--lengths", choices=("lognormal", "uniform"), default="lognormal",
                   help="synthetic row lengths: log-normal (median max-len/3) or all max-len/3")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--optimizer", choices=("adamw", "paged_adamw_32bit"), default="adamw",
                   help="adamw: torch.optim.AdamW for both; paged_adamw_32bit: bitsandbytes' for both")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads in every child (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="runs per contender, alternating; medians are shown")
    p.add_argument("--only", choices=CONTENDERS, action="append", help="run only these contenders")
    p.add_argument("--json", type=Path, help="also write the ratio rows (for tools/bench.py) here")
    p.add_argument("--nproc", type=int, default=0, metavar="N",
                   help="scaling: ours on 1 process against ours-fsdp and ours-ddp on N (torchrun); no peer")
    p.add_argument("--child", choices=CONTENDERS + DISTRIBUTED, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return 0
    command = "python tools/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.model, args.data = prepare_workspace(args)
    contenders = args.only or list(CONTENDERS)
    if args.nproc:
        contenders = ["ours", *DISTRIBUTED]
    if args.no_weights and set(PEERS) & set(contenders):
        print("peers skipped: with --no-weights there is no checkpoint on disk, and transformers + bitsandbytes "
              "load 4-bit models only from one (drop --no-weights to generate it, disk permitting, and compare)\n")
        contenders = [c for c in contenders if c not in PEERS]
    results = {c: [] for c in contenders}
    load_at_start = _load()
    for _ in range(args.repeats):
        for contender in contenders:
            results[contender].append(measure(args, contender))
    print(f"## QLoRA training on {args.device}: {args.model.name}, batch {args.batch_size}, max length "
          f"{args.max_seq_len}, LoRA r={args.lora_r} alpha={args.lora_alpha:g} all-linear, {args.optimizer}\n\n"
          f"median (min-max) of {args.repeats} run(s); one epoch each, first step untimed\n{data_line(args.data, args.model, args.max_seq_len)}\n")
    if args.nproc:
        print(f"load average at the start: {load_at_start}\n")
    print(scaling_table(results, args.nproc, args.device) if args.nproc else table(results, args.device))
    print("\ntokens/s: real (non-padding) tokens of the timed steps over their wall time. real tokens / row slots: "
          "the share of the epoch's batch\ncells holding data rather than padding. ours packs whole examples into rows "
          f"of {args.max_seq_len} (best fit), attention never crossing examples.")
    print(f"\ncommand: {command}\n{environment_line(args.device)}")
    if args.json:
        rows = json_rows(results, args.model.name, args.device, command, args.lengths)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 1 if any("error" in r for runs in results.values() for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
