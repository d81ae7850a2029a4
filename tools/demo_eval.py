"""Held-out score of a demo task, base model vs base + adapter, and both answers to the same prompts.

    python tools/demo_eval.py demo/model runs/tiny-cpu/adapter demo/data/eval.jsonl
    python tools/demo_eval.py ~/.cache/qlora-kit/SmolLM2-135M-Instruct runs/smollm2-pos/adapter \\
        demo/data/chat_eval.jsonl --prompts demo/chat_prompts.jsonl

Rows are Alpaca (`instruction`/`input`/`output`) or chat (`messages`, the last turn the assistant's answer),
tokenized by the library exactly as training tokenizes them. Greedy exact match is read from one
teacher-forced pass: greedy decoding reproduces the answer (and stops) exactly when every answer token, the
end-of-turn token included, is the model's top choice after the answer's own prefix. Every row runs twice in
the same batch — on the bare 4-bit base and with the adapter — through `per_row_adapters`, so "before" and
"after" come from identical quantized weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from qlora_kit.adapters import per_row_adapters
from qlora_kit.data import IGNORE_INDEX, encode_row
from qlora_kit.generate import Request, generate, load_model, render

ARMS = (None, "tuned")  # the bare base, then base + adapter


def row_format(row: dict) -> str:
    return "messages" if "messages" in row else "alpaca"


def padded(examples: list, pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), IGNORE_INDEX)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def score(model, tok, rows: list[dict], batch: int) -> dict[str | None, dict[str, float]]:
    """Exact match (and which rows hit) and mean response-token loss per arm, each row on both arms in one forward."""
    totals = {arm: {"hits": [], "nll": 0.0, "tokens": 0} for arm in ARMS}
    for start in range(0, len(rows), batch):
        chunk = [encode_row(r, row_format(r), tok) for r in rows[start : start + batch]]
        enc = padded([e for e in chunk for _ in ARMS], tok.pad_token_id)
        arms = [arm for _ in chunk for arm in ARMS]
        with per_row_adapters(model, arms), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False).logits
        logits, labels = logits[:, :-1].float(), enc["labels"][:, 1:]
        trained = labels != IGNORE_INDEX
        hit = ((logits.argmax(-1) == labels) | ~trained).all(1)
        nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none").sum(1)
        for i, arm in enumerate(arms):
            totals[arm]["hits"].append(bool(hit[i]))
            totals[arm]["nll"] += float(nll[i])
            totals[arm]["tokens"] += int(trained[i].sum())
    return {arm: {"exact_match": sum(t["hits"]) / len(rows), "response_loss": t["nll"] / t["tokens"],
                  "hits": t["hits"]} for arm, t in totals.items()}


def answers(model, tok, prompts: list[dict], max_new_tokens: int) -> list[tuple[str, str, str]]:
    """(prompt, base answer, adapter answer) for each prompt, all in one batched generation."""
    rendered = [render(tok, p) for p in prompts]
    reqs = [Request(text, arm, chat) for text, chat in rendered for arm in ARMS]
    outs = generate(model, tok, reqs, max_new_tokens=max_new_tokens)
    shown = [p.get("prompt") or p.get("input") or p["messages"][-1]["content"] for p in prompts]
    return [(shown[i], outs[2 * i].strip(), outs[2 * i + 1].strip()) for i in range(len(prompts))]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("adapter_dir", type=Path)
    ap.add_argument("eval_file", type=Path)
    ap.add_argument("--limit", type=int, default=200, help="score the first N rows")
    ap.add_argument("--batch", type=int, default=25, help="rows per forward (each runs twice: base and adapter)")
    ap.add_argument("--prompts", type=Path, help="JSONL prompts to answer with the base and with the adapter")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--json", type=Path, help="also write the scores here")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(args.model_dir, {"tuned": args.adapter_dir})
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    rows = read_jsonl(args.eval_file)[: args.limit]
    s = score(model, tok, rows, args.batch)
    base, tuned = s[None], s["tuned"]
    print(f"held-out exact match on {len(rows)} words: base {base['exact_match']:.1%} -> with adapter "
          f"{tuned['exact_match']:.1%}")
    print(f"held-out response loss: base {base['response_loss']:.3f} -> with adapter {tuned['response_loss']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"n": len(rows), "base": base, "adapter": tuned}, indent=2) + "\n")
    if args.prompts:
        for prompt, before, after in answers(model, tok, read_jsonl(args.prompts), args.max_new_tokens):
            print(f"\nprompt:  {prompt}\nbase:    {before}\nadapter: {after}")


if __name__ == "__main__":
    main()
