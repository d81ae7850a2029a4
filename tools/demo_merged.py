"""Answer the demo's prompts with the exported merged model, loaded as any user serves a merged checkpoint:
plain transformers, bf16, greedy.

    python tools/demo_merged.py runs/smollm2-pos/merged demo/chat_prompts.jsonl --max-new-tokens 16

Why not `qlora-kit generate MERGED`: that quantizes the merged weights to NF4 again, and a model merged into its
dequantized base is W' = dequant(quant(W)) + scale·B·A, whose entries sit within a small delta of NF4 levels;
re-quantizing rounds each back to its level wherever the delta is below half a level spacing, which is most of a
LoRA update. On SmolLM2 the re-quantized merge answers like the base. Serve a merged model in 16 bits, or the
4-bit base with the adapter.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("merged_dir", type=Path)
    ap.add_argument("prompts", type=Path, help="JSONL rows with a 'prompt' (rendered through the chat template)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.merged_dir)
    model = AutoModelForCausalLM.from_pretrained(args.merged_dir, dtype=torch.bfloat16, use_safetensors=True).eval()
    rows = [json.loads(line) for line in args.prompts.read_text().splitlines() if line.strip()]
    for i, row in enumerate(rows, 1):
        messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False)
        answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        print(f"[{i}] merged (bf16): {answer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
