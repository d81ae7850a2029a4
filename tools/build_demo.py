"""Build the embedded demo: a tiny Llama pretrained on WordNet glosses, plus a part-of-speech task to fine-tune.

    apt-get install wordnet-base          # WordNet 3.0 database files, installed under /usr/share/wordnet
    python tools/build_demo.py            # writes demo/model/ and demo/data/{train,eval}.jsonl (~10 min, 2 cores)
    python tools/build_demo.py --check    # the base model's held-out response loss and exact match ("before")
    python tools/build_demo.py --chat     # only rewrite demo/data/chat_{train,eval}.jsonl from the Alpaca split

Owns: reading WordNet, the gloss corpus, the tokenizer, CPU pretraining, the Alpaca split, and the same split as
chat messages for the real-model demo (recipes/smollm2-pos.yaml). Calls no qlora_kit code, so the demo's "before"
number never depends on the library it is meant to exercise.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDNET_DIR = Path("/usr/share/wordnet")
DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"
SEED = 0
THREADS = 2
MAX_BYTES = 25 * 1024 * 1024

# The Stanford Alpaca prompt with an input, verbatim, so qlora_kit's alpaca formatter produces the same tokens.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
INSTRUCTION = "What part of speech is this word? Answer noun, verb, adjective or adverb."
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
DATA_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
TRAIN_PER_POS, EVAL_PER_POS = 500, 50
# The same question as one chat turn, for an instruct model that answers through its chat template.
CHAT_QUESTION = 'What part of speech is the word "{input}"? Answer noun, verb, adjective or adverb.'

SPECIALS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2
VOCAB_SIZE = 4096
CHAT_TEMPLATE = (  # block tags eat the newline after them (trim_blocks), so newlines live inside expressions
    "{{ bos_token }}{% for m in messages %}{{ '### ' + m['role'] | capitalize + ':\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)

SEQ_LEN, BATCH, STEPS, WARMUP, PEAK_LR = 128, 32, 600, 40, 3e-3


@dataclass(frozen=True)
class Synset:
    pos: str  # "noun" | "verb" | "adjective" | "adverb"
    lemmas: tuple[str, ...]
    gloss: str  # definition, then WordNet's quoted examples, as WordNet writes them


def parse_data_line(line: str) -> Synset:
    """One line of a WordNet data.* file (format: wndb(5WN)): offset lex_filenum ss_type w_cnt word lex_id ... | gloss."""
    head, gloss = line.split(" | ", 1)
    fields = head.split()
    count = int(fields[3], 16)
    # Adjective lemmas may carry a syntactic marker such as "(p)"; it is not part of the word.
    words = [re.sub(r"\(\w+\)$", "", fields[4 + 2 * i]).replace("_", " ") for i in range(count)]
    return Synset(POS_NAMES[fields[2]], tuple(dict.fromkeys(words)), gloss.strip())


def read_wordnet(wn_dir: Path) -> list[Synset]:
    missing = [name for name in DATA_FILES if not (wn_dir / name).exists()]
    if missing:
        sys.exit(f"WordNet data not found in {wn_dir} ({', '.join(missing)}): run `apt-get install wordnet-base`.")
    synsets = []
    for name in DATA_FILES:
        with open(wn_dir / name, encoding="utf-8") as f:
            # The license header lines start with two spaces; every data line starts with its byte offset.
            synsets += [parse_data_line(line) for line in f if not line.startswith("  ")]
    return synsets


def corpus_lines(synsets: list[Synset]) -> list[str]:
    """The pretraining text: "word, synonym: gloss". Deliberately no part-of-speech labels and no prompt format."""
    return [f"{', '.join(s.lemmas)}: {s.gloss}" for s in synsets]


def pos_task(synsets: list[Synset], rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Balanced part-of-speech questions on one-word lemmas that have a single part of speech in WordNet.

    Each lemma is used once, so train and eval words are disjoint. Eval words do appear in the pretraining
    glosses: the task asks the model to surface what pretraining taught it, in a format it has never seen.
    """
    pos_of: dict[str, set[str]] = {}
    for s in synsets:
        for lemma in s.lemmas:
            # A capitalised lemma (a name, "KKK") marks its lowercased form as ambiguous too.
            pos_of.setdefault(lemma.lower(), set()).add(s.pos if lemma.islower() else "name")
    by_pos: dict[str, list[str]] = {}
    for word, tags in sorted(pos_of.items()):
        if len(tags) == 1 and word.isalpha() and word.isascii() and len(word) >= 3:
            by_pos.setdefault(next(iter(tags)), []).append(word)
    train, held_out = [], []
    for pos in ("noun", "verb", "adjective", "adverb"):
        words = rng.sample(by_pos[pos], TRAIN_PER_POS + EVAL_PER_POS)
        rows = [{"instruction": INSTRUCTION, "input": w, "output": pos} for w in words]
        train += rows[:TRAIN_PER_POS]
        held_out += rows[TRAIN_PER_POS:]
    rng.shuffle(train)
    rng.shuffle(held_out)
    return train, held_out


def chat_rows(rows: list[dict]) -> list[dict]:
    """The Alpaca rows as OpenAI-style messages: the same words, split and answers, one user turn each."""
    return [{"messages": [{"role": "user", "content": CHAT_QUESTION.format(**r)},
                          {"role": "assistant", "content": r["output"]}]} for r in rows]


def write_chat_split(demo_dir: Path) -> None:
    for part in ("train", "eval"):
        rows = read_jsonl(demo_dir / "data" / f"{part}.jsonl")
        write_jsonl(demo_dir / "data" / f"chat_{part}.jsonl", chat_rows(rows))


def train_tokenizer(lines: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style pre-tokenization), <s> prepended by the post-processor like Llama's."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        chat_template=CHAT_TEMPLATE, model_max_length=256,
    )


def model_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    # Untied embeddings so the LM head is a real 256x4096 linear for LoRA/QLoRA to wrap.
    return LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )


def pack(lines: list[str], tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """All lines as "<s> line </s>", concatenated and cut into SEQ_LEN blocks (the tail is dropped)."""
    ids = tokenizer(lines, add_special_tokens=True)["input_ids"]
    flat = torch.tensor([t for row in ids for t in row + [tokenizer.eos_token_id]])
    blocks = flat[: len(flat) // SEQ_LEN * SEQ_LEN].view(-1, SEQ_LEN)
    return blocks


def lr_at(step: int) -> float:
    if step < WARMUP:
        return PEAK_LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, STEPS - WARMUP)
    return PEAK_LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(model: LlamaForCausalLM, blocks: torch.Tensor, held: torch.Tensor) -> None:
    gen = torch.Generator().manual_seed(SEED)
    order = torch.randperm(len(blocks), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=(0.9, 0.95), weight_decay=0.1)
    start = time.time()
    for step in range(STEPS):
        idx = order[(step * BATCH) % len(order):][:BATCH]
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=blocks[idx], labels=blocks[idx]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == STEPS - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  lr {lr_at(step):.2e}  {time.time() - start:6.0f}s")
    model.eval()
    with torch.no_grad():
        print(f"held-out gloss loss {model(input_ids=held, labels=held).loss.item():.3f}")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def response_metrics(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, rows: list[dict]) -> dict:
    """Mean loss over response tokens (output + </s>) and greedy exact match, with the Alpaca prompt."""
    nll, count, correct = 0.0, 0, 0
    model.eval()
    for row in rows:
        prompt = tokenizer(ALPACA_PROMPT.format(**row))["input_ids"]
        answer = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + answer])
        labels = ids.clone()
        labels[0, : len(prompt)] = -100
        with torch.no_grad():
            nll += model(input_ids=ids, labels=labels).loss.item() * len(answer)
            out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
        count += len(answer)
        text = tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True).strip()
        correct += text == row["output"]
    return {"response_loss": nll / count, "exact_match": correct / len(rows), "n": len(rows)}


def check(demo_dir: Path) -> dict:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(demo_dir / "model")
    model = LlamaForCausalLM.from_pretrained(demo_dir / "model", dtype=torch.float32)
    metrics = response_metrics(model, tokenizer, read_jsonl(demo_dir / "data" / "eval.jsonl"))
    print(f"base model on eval.jsonl: {json.dumps(metrics)}")
    return metrics


def report_sizes(demo_dir: Path) -> None:
    files = sorted(p for p in demo_dir.rglob("*") if p.is_file())
    for p in files:
        print(f"{p.stat().st_size / 1024:10.1f} KiB  {p.relative_to(demo_dir.parent)}")
    total = sum(p.stat().st_size for p in files)
    print(f"{total / 1024 / 1024:10.2f} MiB  total")
    assert total <= MAX_BYTES, f"demo is {total} bytes, over the {MAX_BYTES}-byte budget"


def build(wn_dir: Path, demo_dir: Path) -> None:
    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    synsets = read_wordnet(wn_dir)
    lines = corpus_lines(synsets)
    rng.shuffle(lines)
    train, held_out = pos_task(synsets, rng)
    print(f"{len(synsets)} synsets; task: {len(train)} train / {len(held_out)} eval part-of-speech questions")
    write_jsonl(demo_dir / "data" / "train.jsonl", train)
    write_jsonl(demo_dir / "data" / "eval.jsonl", held_out)
    write_chat_split(demo_dir)

    tokenizer = train_tokenizer(lines)
    blocks = pack(lines, tokenizer)
    held, blocks = blocks[:64], blocks[64:]
    print(f"corpus: {blocks.numel()} tokens in {len(blocks)} blocks; {STEPS * BATCH * SEQ_LEN} tokens seen")
    model = LlamaForCausalLM(model_config(tokenizer))
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    pretrain(model, blocks, held)

    out = demo_dir / "model"
    model.to(torch.bfloat16).save_pretrained(out)  # transformers 5 always writes safetensors
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=64,
    ).save_pretrained(out)
    tokenizer.save_pretrained(out)
    assert (out / "model.safetensors").exists()
    report_sizes(demo_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only measure the built base model on eval.jsonl")
    parser.add_argument("--chat", action="store_true", help="only write chat_{train,eval}.jsonl from the Alpaca split")
    parser.add_argument("--wordnet", type=Path, default=WORDNET_DIR, help="directory holding WordNet's data.* files")
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help="demo directory to write")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    start = time.time()
    if args.chat:
        write_chat_split(args.out)
        return
    if not args.check:
        build(args.wordnet, args.out)
    check(args.out)
    print(f"done in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
