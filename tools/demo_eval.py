"""Held-out exact-match accuracy of the demo task, base model vs base + adapter, in one batched pass.

    python tools/demo_eval.py demo/model runs/tiny-cpu/adapter demo/data/eval.jsonl

Every eval prompt runs twice in the same batch — once on the bare 4-bit base, once with the adapter — through
`per_row_adapters`, so "before" and "after" come from one forward per token, on identical quantized weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qlora_kit.generate import Request, generate, load_model, render


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("adapter_dir")
    ap.add_argument("eval_file")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch", type=int, default=50)
    args = ap.parse_args()
    model, tok = load_model(args.model_dir, {"tuned": Path(args.adapter_dir)})
    rows = [json.loads(line) for line in Path(args.eval_file).read_text().splitlines()[: args.limit]]
    correct = {None: 0, "tuned": 0}
    for start in range(0, len(rows), args.batch):
        chunk = rows[start : start + args.batch]
        reqs = [Request(text, adapter, chat) for text, chat in map(lambda r: render(tok, r), chunk)
                for adapter in (None, "tuned")]
        outs = generate(model, tok, reqs, max_new_tokens=4)
        for req, out, row in zip(reqs, outs, [r for r in chunk for _ in range(2)]):
            correct[req.adapter] += out.strip().split()[:1] == [row["output"]]
    n = len(rows)
    print(f"held-out exact match on {n} words: base {correct[None] / n:.1%} -> with adapter {correct['tuned'] / n:.1%}")


if __name__ == "__main__":
    main()
